//! The messages of protocol version 1.
//!
//! Compatibility rule: postcard is not self-describing, so a field or variant is never removed or
//! reordered. New variants go at the end of an enum and are sent only to peers whose handshake
//! version has them; an incompatible change bumps [`super::PROTOCOL_VERSION`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The client's first frame. Its layout is frozen: every version of the agent decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`super::HELLO_MAGIC`].
    pub magic: [u8; 4],
    /// The protocol version the client speaks.
    pub version: u32,
    /// Free text naming the client, for logs.
    pub client: String,
}

/// The agent's answer to [`Hello`]. Its layout is frozen too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The agent speaks `version`; requests may follow.
    Accepted {
        /// The version both sides use from now on.
        version: u32,
        /// The agent's build version (crate version).
        agent: String,
    },
    /// The agent refuses the connection and closes it.
    Rejected {
        /// The oldest version the agent accepts.
        min: u32,
        /// The newest version the agent accepts.
        max: u32,
        /// Why, for humans.
        message: String,
    },
}

/// One frame from the client after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// The request this frame belongs to (chosen by the client, never 0).
    pub id: u64,
    /// What it says.
    pub msg: ClientMsg,
}

/// Requests, and the stream pieces that follow some of them (same id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Answered by [`ServerMsg::Pong`].
    Ping,
    /// Answered by [`ServerMsg::Version`].
    Version,
    /// Runs a process. Answered by any number of [`ServerMsg::Stdout`] / [`ServerMsg::Stderr`]
    /// chunks, then [`ServerMsg::Exited`] (or [`ServerMsg::Error`] if it could not start).
    Exec(ExecRequest),
    /// Sends a signal to the process group of the running `Exec` with this id.
    Signal(i32),
    /// Reads a file. Answered by [`ServerMsg::FileStart`], [`ServerMsg::Data`] chunks, [`ServerMsg::End`].
    ReadFile(ReadFileRequest),
    /// Writes a file. Followed by the client's [`ClientMsg::Data`] chunks and [`ClientMsg::End`];
    /// answered by [`ServerMsg::Written`].
    WriteFile(WriteFileRequest),
    /// A chunk of the body of the `WriteFile` with this id.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the body of the `WriteFile` with this id.
    End,
    /// Abandons request `id`: an upload is discarded (answered with an error), a running process
    /// group is killed (SIGKILL).
    Cancel,
    /// Gets the guest ready for capture. Answered by [`ServerMsg::Prepared`].
    PrepareSnapshot(PrepareRequest),
    /// Brings the guest back after capture, restore or fork (and delivers secrets on first start).
    /// Answered by [`ServerMsg::Restored`].
    AfterRestore(AfterRestoreRequest),
}

/// A process to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment (or instead of it, with `clear_env`).
    pub env: Vec<(String, String)>,
    /// Start from an empty environment.
    pub clear_env: bool,
    /// Working directory (the agent's own when absent).
    pub cwd: Option<String>,
    /// Bytes fed to the process's stdin, which is then closed; stdin is `/dev/null` when absent.
    #[serde(with = "serde_bytes")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the process group (SIGKILL) after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when it was killed.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout expired.
    pub timed_out: bool,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            // The agent (a guest) chose the number: no real signal is near i32::MAX, but an
            // overflow must not panic the host.
            (None, Some(signal)) => signal.saturating_add(128),
            (None, None) => 255,
        }
    }
}

/// A file to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    pub path: String,
}

/// A file to write (atomically: a temporary file in the same directory, renamed over the target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits (for example `0o644`).
    pub mode: u32,
    /// Owner; unchanged (the agent's) when absent.
    pub uid: Option<u32>,
    /// Group; unchanged (the agent's) when absent.
    pub gid: Option<u32>,
    /// Create missing parent directories.
    pub create_dirs: bool,
}

/// What the agent knows about a file it is about to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Size in bytes when the read started.
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Options of `prepare-snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// Freeze every writable filesystem that supports it.
    pub freeze: bool,
    /// Scrub the secrets directory.
    pub scrub_secrets: bool,
    /// Thaw by itself after this many milliseconds if no `after-restore` came (a host that died
    /// mid-capture must not leave the guest frozen for ever).
    pub auto_thaw_ms: Option<u64>,
}

impl Default for PrepareRequest {
    fn default() -> Self {
        Self {
            freeze: true,
            scrub_secrets: true,
            auto_thaw_ms: Some(60_000),
        }
    }
}

/// A scrubbed secret file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubbedFile {
    /// Path relative to the secrets directory.
    pub name: String,
    /// Bytes overwritten with zeros.
    pub bytes: u64,
}

/// A mount that was not frozen, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedMount {
    /// Where it is mounted.
    pub mount_point: String,
    /// Its filesystem type.
    pub fstype: String,
    /// Why it was skipped (pseudo filesystem, read-only, no freeze support, error).
    pub reason: String,
}

/// What `prepare-snapshot` did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PrepareReport {
    /// Secret files zeroed and removed.
    pub scrubbed: Vec<ScrubbedFile>,
    /// Mount points frozen, in the order they were frozen.
    pub frozen: Vec<String>,
    /// Mounts considered and left alone.
    pub skipped: Vec<SkippedMount>,
}

/// A new identity for a fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The new hostname (set in the kernel and in `/etc/hostname`).
    pub hostname: String,
    /// The new `/etc/machine-id` (32 lowercase hex digits); generated from the freshly reseeded RNG
    /// when absent.
    pub machine_id: Option<String>,
}

/// Bytes that must not linger in memory: zeroed when dropped, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretBytes(#[serde(with = "serde_bytes")] Vec<u8>);

impl SecretBytes {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        crate::zeroize(&mut self.0);
    }
}

/// A secret to place in the secrets directory (mode 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// File name (no slashes).
    pub name: String,
    /// Contents.
    pub data: SecretBytes,
}

/// Options of `after-restore`. Every part is optional, so the same request also delivers secrets on
/// first start (`thaw: false`, no entropy, no identity).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AfterRestoreRequest {
    /// Thaw what `prepare-snapshot` froze (or every freezable filesystem if the agent does not know).
    pub thaw: bool,
    /// Bytes to mix into the kernel RNG (credited as entropy), followed by a CRNG reseed.
    pub entropy: SecretBytes,
    /// A new identity (forks only).
    pub identity: Option<Identity>,
    /// Secrets to write back into the secrets directory.
    pub secrets: Vec<Secret>,
}

/// What `after-restore` did. Failures of single steps are listed in `warnings`; the host decides
/// whether they are fatal (for example a fork whose RNG was not reseeded).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Mount points thawed.
    pub thawed: Vec<String>,
    /// Bytes of entropy added to the kernel pool.
    pub entropy_added: u32,
    /// The CRNG was reseeded (RNDRESEEDCRNG).
    pub crng_reseeded: bool,
    /// The hostname now in force, when changed.
    pub hostname: Option<String>,
    /// The machine-id now in force, when changed.
    pub machine_id: Option<String>,
    /// Secret names written.
    pub secrets_written: Vec<String>,
    /// Steps that failed.
    pub warnings: Vec<String>,
}

/// The agent's build and protocol versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Crate version of the agent.
    pub agent: String,
    /// Protocol version in use on this connection.
    pub protocol: u32,
    /// Oldest protocol version the agent accepts.
    pub min_protocol: u32,
    /// Newest protocol version the agent accepts.
    pub max_protocol: u32,
}

/// One frame from the agent after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The request it answers; 0 for errors about the connection itself (the agent then closes it).
    pub id: u64,
    /// What it says.
    pub msg: ServerMsg,
}

/// Responses and stream pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to `Ping`.
    Pong,
    /// Answer to `Version`.
    Version(VersionInfo),
    /// A chunk of a process's stdout.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A chunk of a process's stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended; the last frame of an `Exec`.
    Exited(ExitStatus),
    /// The first frame of a `ReadFile`.
    FileStart(FileInfo),
    /// A chunk of a file being read.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The last frame of a `ReadFile`: the total bytes sent.
    End(u64),
    /// Answer to `WriteFile`: bytes written.
    Written(u64),
    /// Answer to `PrepareSnapshot`.
    Prepared(PrepareReport),
    /// Answer to `AfterRestore`.
    Restored(RestoreReport),
    /// The request failed (the last frame of that request), or with id 0 the connection did.
    Error(ErrorReply),
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Category, for programs.
    pub kind: ErrorKind,
    /// Details, for humans.
    pub message: String,
}

/// Categories of [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peer broke the protocol; the connection is closed.
    Protocol,
    /// The request is malformed or contradicts itself.
    InvalidRequest,
    /// A path or program does not exist.
    NotFound,
    /// The agent is not allowed to do it.
    PermissionDenied,
    /// Too many requests or connections at once.
    Busy,
    /// Another system error.
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Protocol => "protocol error",
            ErrorKind::InvalidRequest => "invalid request",
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Busy => "busy",
            ErrorKind::Io => "i/o error",
        };
        f.write_str(s)
    }
}

impl ErrorKind {
    /// The category of an I/O error.
    pub fn from_io(err: &std::io::Error) -> Self {
        match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            std::io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
            _ => ErrorKind::Io,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, encode_frame};

    fn round_trip<T>(v: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let frame = encode_frame(v).unwrap();
        decode(&frame[4..]).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let req = ClientFrame {
            id: 7,
            msg: ClientMsg::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                clear_env: false,
                cwd: Some("/tmp".into()),
                stdin: Some(b"input".to_vec()),
                timeout_ms: Some(5),
            }),
        };
        assert_eq!(round_trip(&req), req);
        let data = ServerFrame {
            id: u64::MAX,
            msg: ServerMsg::Data(vec![0xab; 1000]),
        };
        let frame = encode_frame(&data).unwrap();
        // Header 4, id varint 10, variant 1, length varint 2, then the bytes as they are.
        assert_eq!(frame.len(), 4 + 10 + 1 + 2 + 1000);
        assert_eq!(round_trip(&data), data);
        let restore = ClientMsg::AfterRestore(AfterRestoreRequest {
            thaw: true,
            entropy: vec![1, 2, 3].into(),
            identity: Some(Identity {
                hostname: "fork-1".into(),
                machine_id: None,
            }),
            secrets: vec![Secret {
                name: "token".into(),
                data: b"s3cret".to_vec().into(),
            }],
        });
        assert_eq!(round_trip(&restore), restore);
        assert!(!format!("{restore:?}").contains("s3cret"));
    }

    /// The frame a hostile agent sends (crafted against the `agent_protocol` fuzz target): a
    /// process "killed by signal i32::MAX", which overflowed `128 + signal`.
    #[test]
    fn exit_status_with_a_huge_signal_does_not_overflow() {
        let payload = [1, 4, 0, 1, 0xfe, 0xff, 0xff, 0xff, 0x0f, 0];
        let frame: ServerFrame = decode(&payload).unwrap();
        let ServerMsg::Exited(status) = frame.msg else {
            panic!("{frame:?}");
        };
        assert_eq!(status.signal, Some(i32::MAX));
        assert_eq!(status.shell_code(), i32::MAX);
        let low = ExitStatus {
            code: None,
            signal: Some(i32::MIN),
            timed_out: false,
        };
        assert_eq!(low.shell_code(), i32::MIN + 128);
    }

    #[test]
    fn hello_layout_is_frozen() {
        let hello = Hello {
            magic: *b"MAGT",
            version: 1,
            client: "t".into(),
        };
        let frame = encode_frame(&hello).unwrap();
        assert_eq!(
            &frame[..],
            &[0, 0, 0, 7, b'M', b'A', b'G', b'T', 1, 1, b't']
        );
    }
}
