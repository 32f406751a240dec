//! The API's errors: one JSON shape, `{"error": {"code", "message"}}`, whose `code` is the
//! CLI's stable error code (`not-found`, `conflict`, ...) or one of the server's own
//! (`unauthorized`, `forbidden-origin`, `too-large`, `unsupported-media-type`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::exit::Code;
use crate::output::code_name;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `usage`, `not-found`, `conflict`, `snapshot-refused`,
    /// `host-unsupported`, `guest-failed`, `error`, `unauthorized`, `forbidden-origin`,
    /// `too-large`, `unsupported-media-type`, `no-route`.
    pub code: String,
    /// One line for people.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The error for a CLI failure code: the same stable code, and the HTTP status it means.
    pub fn from_code(code: Code, message: impl Into<String>) -> Self {
        Self::new(status_for(code), code_name(code), message)
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::from_code(Code::Usage, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::from_code(Code::Error, message)
    }
}

impl From<crate::exit::Failure> for ApiError {
    fn from(f: crate::exit::Failure) -> Self {
        Self::from_code(f.code, f.message)
    }
}

/// The HTTP status each CLI exit code maps to; stable, documented in the OpenAPI document.
pub fn status_for(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Error => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Usage => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Conflict => StatusCode::CONFLICT,
        Code::SnapshotRefused => StatusCode::UNPROCESSABLE_ENTITY,
        Code::HostUnsupported => StatusCode::SERVICE_UNAVAILABLE,
        Code::GuestFailed => StatusCode::BAD_GATEWAY,
        // An upstream (the object store) failed or refused us: a gateway's errors, not ours.
        Code::RemoteUnreachable => StatusCode::GATEWAY_TIMEOUT,
        Code::RemoteAccess => StatusCode::BAD_GATEWAY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_code_has_a_status_and_its_cli_name() {
        for (c, s, name) in [
            (Code::Error, 500, "error"),
            (Code::Usage, 400, "usage"),
            (Code::NotFound, 404, "not-found"),
            (Code::Conflict, 409, "conflict"),
            (Code::SnapshotRefused, 422, "snapshot-refused"),
            (Code::HostUnsupported, 503, "host-unsupported"),
            (Code::GuestFailed, 502, "guest-failed"),
            (Code::RemoteUnreachable, 504, "remote-unreachable"),
            (Code::RemoteAccess, 502, "remote-access"),
        ] {
            let e = ApiError::from_code(c, "x");
            assert_eq!(e.status.as_u16(), s);
            assert_eq!(e.code, name);
            assert_eq!(Code::from_exit(c as i32), Some(c));
        }
    }
}
