//! The control API between the CLI and a workspace's VMM process: one JSON object per line over
//! `api.sock`. A request gets zero or more `progress` lines, then exactly one final response.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// No message comes near this; a longer line is a broken or hostile peer.
pub const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Capture a snapshot. A running VM is paused for the capture and resumed after it unless
    /// `leave_paused`; a paused VM stays paused.
    Snapshot {
        tag: String,
        #[serde(default)]
        note: Option<String>,
        #[serde(default)]
        leave_paused: bool,
        /// Only the pages written since the previous capture (or the restored snapshot).
        #[serde(default)]
        diff: bool,
        /// The secrets delivered to the guest (at most their first `residue::WINDOW` bytes):
        /// the capture's files are scanned for them before the snapshot becomes visible.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        secrets: Vec<snapshot::residue::SecretValue>,
        /// Refuse (keeping nothing) a capture that holds any of them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        strict_secrets: bool,
        /// Copy memory while the guest runs and stop it only for the last pages (a full
        /// snapshot; `snapshot::live`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<LiveParams>,
    },
    Shutdown,
    /// Capture into the workspace's hibernation slot (memory and state; the disk stays as it
    /// is), then stop.
    Hibernate,
    /// Test only: make a system call outside every seccomp filter.
    #[cfg(feature = "test-hooks")]
    TestForbiddenSyscall,
    /// Test only: try to open a (host) path from inside the VMM and say what happened.
    #[cfg(feature = "test-hooks")]
    TestOpen {
        path: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Response {
    Status {
        paused: bool,
        pid: u32,
        vcpus: u8,
        mem_mib: u64,
        uptime_ms: u64,
        #[serde(default)]
        restored_from: Option<String>,
        /// How long the VM has been paused, while it is.
        #[serde(default)]
        paused_ms: Option<u64>,
    },
    Ok,
    Progress {
        done: u64,
        total: u64,
    },
    Snapshot {
        manifest: Box<snapshot::Manifest>,
        /// How the capture went for the guest (absent from older VMMs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capture: Option<CaptureReport>,
    },
    Error {
        code: String,
        message: String,
    },
    /// Test only: the outcome of a test request.
    #[cfg(feature = "test-hooks")]
    TestResult {
        ok: bool,
        detail: String,
    },
}

/// The bound of a live capture.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveParams {
    /// Stop the guest once what is left would take less than this to write (microseconds).
    pub max_pause_us: u64,
}

/// What a capture cost the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaptureReport {
    /// How long the vCPUs were stopped for it; `None` when the VM was paused already.
    #[serde(default)]
    pub pause_ms: Option<f64>,
    /// The rounds of a live capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<snapshot::live::LiveReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the VMM at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("VMM connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("VMM sent an invalid message: {0}")]
    Protocol(String),
    #[error("VMM closed the connection without an answer")]
    Closed,
}

pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one line-delimited JSON message; `Ok(None)` at a clean end of stream.
pub fn read_msg<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> Result<Option<T>, ApiError> {
    let mut line = Vec::new();
    let n = r.take(MAX_LINE + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(ApiError::Protocol(format!(
            "message of {} bytes without end of line",
            line.len()
        )));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| ApiError::Protocol(e.to_string()))
}

/// Connects to the VMM socket `sock` in a workspace directory, and makes sure the listener is
/// that workspace's VMM: the process its waiter recorded. The VMM is jailed because its guest may
/// take it over, and the directory is the VMM's to write: it could put a link to another
/// workspace's socket in place of its own, and a `halt` of it would stop another tenant's VM.
pub fn connect_vmm(sock: &Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(sock)?;
    check_vmm_peer(&stream, sock.parent().unwrap_or(Path::new(".")))?;
    Ok(stream)
}

/// Refuses a connected `stream` whose peer is not the VMM that workspace directory `dir`'s
/// record names (a socket path there may be a link to another workspace's socket).
pub fn check_vmm_peer(stream: &UnixStream, dir: &Path) -> std::io::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(stream)?
        .pid
        .as_raw_nonzero()
        .get();
    match crate::sandbox::record(dir) {
        Some(r) if i64::from(r.pid) == i64::from(peer) => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the process listening there (pid {peer}) is not this workspace's VMM"),
        )),
    }
}

/// Sends `req` and returns the final response, passing progress to `on_progress`.
pub fn request_with_progress(
    sock: &Path,
    req: &Request,
    timeout: Option<Duration>,
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<Response, ApiError> {
    let stream = connect_vmm(sock).map_err(|source| ApiError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let mut w = stream.try_clone()?;
    write_msg(&mut w, req)?;
    let mut r = BufReader::new(stream);
    loop {
        match read_msg::<Response>(&mut r)? {
            Some(Response::Progress { done, total }) => on_progress(done, total),
            Some(resp) => return Ok(resp),
            None => return Err(ApiError::Closed),
        }
    }
}

pub fn request(sock: &Path, req: &Request, timeout: Duration) -> Result<Response, ApiError> {
    request_with_progress(sock, req, Some(timeout), &mut |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json_lines() {
        let req = Request::Snapshot {
            tag: "t".into(),
            note: None,
            leave_paused: true,
            diff: false,
            secrets: Vec::new(),
            strict_secrets: false,
            live: None,
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &req).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "{\"op\":\"snapshot\",\"tag\":\"t\",\"note\":null,\"leave_paused\":true,\"diff\":false}\n"
        );
        let back: Request = read_msg(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn hostile_lines_are_errors_not_panics() {
        let long = vec![b'a'; (MAX_LINE + 10) as usize];
        assert!(read_msg::<Request>(&mut &long[..]).is_err());
        assert!(read_msg::<Request>(&mut &b"{\"op\":\"nope\"}\n"[..]).is_err());
        assert!(read_msg::<Request>(&mut &b"\xff\xfe\n"[..]).is_err());
        assert!(read_msg::<Request>(&mut &b"{\"op\":\"status\"}"[..]).is_err());
        assert!(read_msg::<Request>(&mut &b""[..]).unwrap().is_none());
    }
}
