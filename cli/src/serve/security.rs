//! What stands between a request and a handler: the Origin check (403), the body bound (413),
//! the token (401), and the headers every answer carries (CSP, no sniffing, no framing).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};

use super::error::ApiError;
use super::{token, Shared, MAX_BODY};

pub const COOKIE: &str = "microagent_session";

/// Everything the dashboard loads comes from this server; no inline script, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Paths reachable without a token: the login page and the assets it needs.
fn is_public(path: &str) -> bool {
    path == "/login" || path.starts_with("/assets/")
}

/// Adds the security headers to every response, errors included.
pub async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// Refuses requests a page of another origin made: a browser always sends `Origin` on those
/// (and on every POST), so it must name this very host. Clients without one (curl, scripts)
/// are not browsers and pass to the token check.
pub async fn origin(req: Request, next: Next) -> Response {
    if let Err(e) = check_origin(req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

fn check_origin(h: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |why: &str| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden-origin",
            format!("cross-origin request refused: {why}"),
        )
    };
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return Err(forbidden("Sec-Fetch-Site is cross-site"));
    }
    let Some(origin) = h.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    if host.is_empty() || origin != format!("http://{host}") {
        return Err(forbidden(&format!(
            "Origin {origin:?} is not this server ({host})"
        )));
    }
    Ok(())
}

/// Refuses a declared body above [`MAX_BODY`] before a handler reads it; a chunked body is cut
/// by [`read_bounded`] at the same size.
pub async fn body_limit(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_BODY as u64) {
        if n <= DRAIN_MAX as u64 {
            let _ = read_bounded(req.into_body()).await;
        }
        return too_large().into_response();
    }
    next.run(req).await
}

/// Bytes of a refused body still read (and dropped) before the answer: a server that answers
/// and closes while the client is still sending resets the connection, and the client can lose
/// the 413 to that reset (hyper has no lingering close). Beyond this the client is cut off.
const DRAIN_MAX: usize = 1 << 20;

/// The request body, at most [`MAX_BODY`] bytes (else `too-large`, after draining up to
/// [`DRAIN_MAX`] so the answer reaches the client).
pub async fn read_bounded(body: axum::body::Body) -> Result<axum::body::Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::usage(e.to_string()))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_BODY {
            buf.extend_from_slice(&chunk);
        } else if seen > DRAIN_MAX {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(too_large());
    }
    Ok(buf.into())
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("request body over {MAX_BODY} bytes"),
    )
}

/// The token, from `Authorization: Bearer` (API clients) or the session cookie (the dashboard).
pub async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) || authorized(&state, req.headers()) {
        return next.run(req).await;
    }
    // A person opening the dashboard gets the login form; everything else a JSON 401.
    if req.method() == Method::GET && req.uri().path() == "/" {
        return (StatusCode::UNAUTHORIZED, Html(login_page(false))).into_response();
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong token",
    )
    .into_response()
}

pub fn authorized(state: &Shared, h: &HeaderMap) -> bool {
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        return token::matches(&state.token, t.trim());
    }
    cookie(h).is_some_and(|t| token::matches(&state.token, &t))
}

fn cookie(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The session cookie: the browser sends it back only to this server, never to scripts, never
/// on a request another site started.
pub fn session_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
}

pub fn login_page(wrong: bool) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>microagent: sign in</title><link rel="stylesheet" href="/assets/app.css"></head>
<body class="login"><main class="login-box"><h1>microagent</h1>
<p>Paste the token from <code>serve-token</code> in the state directory (printed by <code>microagent serve</code>).</p>
{}<form method="post" action="/login"><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Sign in</button></form></main></body></html>"#,
        if wrong {
            r#"<p class="error" role="alert">That token is not right.</p>"#
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn origins() {
        assert!(check_origin(&h(&[("host", "127.0.0.1:1")])).is_ok());
        assert!(check_origin(&h(&[
            ("host", "127.0.0.1:1"),
            ("origin", "http://127.0.0.1:1")
        ]))
        .is_ok());
        assert!(check_origin(&h(&[
            ("host", "127.0.0.1:1"),
            ("origin", "http://evil.test")
        ]))
        .is_err());
        assert!(check_origin(&h(&[("host", "127.0.0.1:1"), ("origin", "null")])).is_err());
        assert!(check_origin(&h(&[("host", "a"), ("sec-fetch-site", "cross-site")])).is_err());
    }

    #[test]
    fn cookies() {
        let m = h(&[("cookie", "a=b; microagent_session=xyz; c=d")]);
        assert_eq!(cookie(&m).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h(&[("cookie", "a=b")])), None);
    }
}
