//! The host side of the VMM's hybrid vsock socket (the Firecracker convention).
//!
//! The VMM listens on a Unix socket (`<workspace>/vsock.sock`). A host program connects, writes
//! `CONNECT <guest port>\n`, and the VMM opens a vsock connection to that port in the guest and
//! answers `OK <host port>\n` (the ephemeral port it used on the host side); from then on the Unix
//! stream carries the guest connection's bytes. If the guest does not accept, the VMM closes the
//! socket without answering.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the VMM's hybrid vsock socket in a workspace directory.
pub const VSOCK_SOCKET_NAME: &str = "vsock.sock";
/// The longest answer line accepted from the VMM.
const MAX_REPLY_LEN: usize = 64;

/// Why the hybrid vsock handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    /// Could not reach the VMM's socket.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The process listening on the socket is not the one the caller expects (its check of the
    /// connected peer failed): nothing was sent to it.
    #[error("{path}: {source}")]
    Peer {
        /// The socket path.
        path: PathBuf,
        /// Why the peer was refused.
        source: io::Error,
    },
    /// The connection failed during the handshake.
    #[error("vsock handshake with {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The VMM closed the socket without answering: nothing listens on that port in the guest (yet).
    #[error("the VMM closed {path} without answering CONNECT {port}: is the agent listening?")]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// The VMM answered something other than `OK <port>`.
    #[error("unexpected answer to CONNECT {port} on {path}: {reply:?}")]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// What came back.
        reply: String,
    },
}

/// The path of the hybrid vsock socket in a workspace directory.
pub fn socket_path(workspace_dir: &Path) -> PathBuf {
    workspace_dir.join(VSOCK_SOCKET_NAME)
}

/// Connects to guest port `port` through the VMM's hybrid vsock socket at `path`. Returns the stream
/// (positioned right after the `OK` line) and the host-side port the VMM reported.
pub fn connect(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), HybridError> {
    connect_checked(path, port, timeout, &|_| Ok(()))
}

/// Who may be at the other end of the socket: checked on the connected stream (for example its
/// `SO_PEERCRED`) before anything is sent. The socket's path lies in a directory another,
/// less trusted, process can write: it could be a link to someone else's socket.
pub type PeerCheck<'a> = &'a dyn Fn(&UnixStream) -> io::Result<()>;

/// [`connect`], refusing a peer that `check` refuses ([`HybridError::Peer`]) before the
/// `CONNECT` line is written.
pub fn connect_checked(
    path: &Path,
    port: u32,
    timeout: Duration,
    check: PeerCheck<'_>,
) -> Result<(UnixStream, u32), HybridError> {
    let mut stream = UnixStream::connect(path).map_err(|source| HybridError::Connect {
        path: path.to_owned(),
        source,
    })?;
    check(&stream).map_err(|source| HybridError::Peer {
        path: path.to_owned(),
        source,
    })?;
    let io_err = |source| HybridError::Io {
        path: path.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    // Read byte by byte: anything after the newline already belongs to the guest connection.
    let mut line = Vec::with_capacity(MAX_REPLY_LEN);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(HybridError::Refused {
                    path: path.to_owned(),
                    port,
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_REPLY_LEN {
                    return Err(bad_reply(path, port, &line));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HybridError::Refused {
                    path: path.to_owned(),
                    port,
                })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let host_port = std::str::from_utf8(&line)
        .ok()
        .and_then(|s| s.strip_prefix("OK "))
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| bad_reply(path, port, &line))?;
    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok((stream, host_port))
}

fn bad_reply(path: &Path, port: u32, line: &[u8]) -> HybridError {
    HybridError::BadReply {
        path: path.to_owned(),
        port,
        reply: String::from_utf8_lossy(line).into_owned(),
    }
}
