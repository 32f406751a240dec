//! Client errors, and which of them a reconnect may cure.

use std::io;
use std::time::Duration;

use crate::protocol::messages::ErrorKind;
use crate::protocol::{FrameError, ProtocolError};
use crate::transport::hybrid::HybridError;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM's hybrid vsock socket did not connect us to the guest port.
    #[error(transparent)]
    Hybrid(#[from] HybridError),
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The agent sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The agent refused our hello.
    #[error("the agent refused the connection (it speaks protocol {min} to {max}): {message}")]
    Rejected {
        /// Oldest version the agent accepts.
        min: u32,
        /// Newest version the agent accepts.
        max: u32,
        /// Its reason.
        message: String,
    },
    /// The agent closed the connection instead of answering our hello.
    #[error("the agent closed the connection during the handshake")]
    HandshakeClosed,
    /// The agent picked a version this client does not speak.
    #[error("the agent answered with protocol version {0}, which this client does not speak")]
    BadVersion(u32),
    /// The request failed in the guest.
    #[error("{kind}: {message}")]
    Remote {
        /// Category.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The connection ended while the call was in flight (for example a snapshot restore reset it).
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
    /// No frame within the client's timeout.
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// The agent answered out of turn.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    /// Reading the local data to upload failed.
    #[error("reading the data to send: {0}")]
    Source(io::Error),
    /// Writing the downloaded data locally failed.
    #[error("writing the received data: {0}")]
    Sink(io::Error),
    /// Every attempt of a retried connect failed.
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// A failure that a new connection attempt may not repeat: the VMM or the agent not (yet)
    /// there, a connection reset by a restore or fork.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Hybrid(HybridError::BadReply { .. } | HybridError::Peer { .. }) => false,
            ClientError::Hybrid(_) => true,
            ClientError::Io(e) => io_transient(e),
            ClientError::Protocol(ProtocolError::Frame(FrameError::Io(e))) => io_transient(e),
            ClientError::Protocol(ProtocolError::Frame(FrameError::Truncated { .. })) => true,
            ClientError::HandshakeClosed | ClientError::Disconnected(_) => true,
            _ => false,
        }
    }
}

fn io_transient(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::NotFound
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::TimedOut
            | K::WouldBlock
            | K::NotConnected
            | K::Interrupted
    )
}
