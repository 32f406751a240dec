//! Exit codes scripts can rely on. Documented in `--help` and the README; never renumber.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// Any failure without a more specific code.
    Error = 1,
    /// Bad command-line usage or invalid input (clap also uses 2).
    Usage = 2,
    /// A named thing (kernel, workspace, snapshot) does not exist.
    NotFound = 3,
    /// The target is in the wrong state for the request.
    Conflict = 4,
    /// A snapshot was refused: kernel mismatch, unknown format, corrupt file, or it holds
    /// delivered secrets (`snapshot create --secrets strict`, `snapshot export`).
    SnapshotRefused = 5,
    /// The host cannot run this: no KVM, a missing capability.
    HostUnsupported = 6,
    /// The guest crashed: triple fault, KVM internal error.
    GuestFailed = 7,
    /// A remote (S3-compatible object storage, an image registry) could not be reached.
    RemoteUnreachable = 8,
    /// A remote refused us: wrong credentials, no permission, or a missing bucket.
    RemoteAccess = 9,
}

impl Code {
    /// The code a child `microagent` exited with; `None` for a number this build never uses.
    pub fn from_exit(n: i32) -> Option<Code> {
        Some(match n {
            0 => Code::Ok,
            1 => Code::Error,
            2 => Code::Usage,
            3 => Code::NotFound,
            4 => Code::Conflict,
            5 => Code::SnapshotRefused,
            6 => Code::HostUnsupported,
            7 => Code::GuestFailed,
            8 => Code::RemoteUnreachable,
            9 => Code::RemoteAccess,
            _ => return None,
        })
    }
}

impl From<Code> for ExitCode {
    fn from(c: Code) -> Self {
        ExitCode::from(c as u8)
    }
}

pub const HELP: &str = "\
Exit codes:
  0  success
  1  error without a more specific code
  2  bad usage or invalid input
  3  not found (kernel, workspace, snapshot)
  4  conflict: wrong state for the request
  5  snapshot refused (kernel mismatch, unknown format, corrupt, holds secrets)
  6  host unsupported (no /dev/kvm, missing KVM capability)
  7  guest failed (triple fault, KVM internal error)
  8  remote unreachable (object storage endpoint down or not answering)
  9  remote refused: wrong credentials, no permission, or missing bucket";

/// A failure with the exit code it maps to; the message is one line.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
