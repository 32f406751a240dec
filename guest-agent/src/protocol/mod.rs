//! The wire protocol between the host and the agent.
//!
//! # Framing
//! Every message travels in one frame: a `u32` big-endian payload length followed by that many bytes of
//! payload. A payload is at most [`MAX_FRAME_LEN`] bytes; a peer announcing more is in error and the
//! connection is closed. File contents and process output larger than that travel as a stream of
//! chunks of at most [`CHUNK_LEN`] bytes.
//!
//! # Encoding
//! Payloads are [`postcard`]-encoded serde values (compact, not self-describing). The schema is
//! therefore versioned by [`PROTOCOL_VERSION`]: new message kinds are only ever appended to the end of
//! an enum, and a peer sends them only when the handshake agreed on a version that has them.
//!
//! # Handshake
//! The first frame on a connection is the client's [`messages::Hello`] (its layout is frozen for all
//! versions); the agent answers with [`messages::HelloReply`]: `Accepted` with the version both will
//! speak, or `Rejected` (the agent then closes the connection).
//!
//! # Requests
//! After the handshake the client sends [`messages::ClientFrame`]s and the agent sends
//! [`messages::ServerFrame`]s. Each carries the request id the client chose (unique per connection,
//! never 0: id 0 is reserved for errors about the connection itself), so several requests run at once
//! on one connection and their responses and stream chunks interleave.

pub mod codec;
pub mod frame;
pub mod messages;

pub use codec::{decode, encode_frame, CodecError};
pub use frame::{read_frame, FrameError};

/// The protocol version this build speaks (and the newest it accepts).
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The magic bytes opening every [`messages::Hello`].
pub const HELLO_MAGIC: [u8; 4] = *b"MAGT";
/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The largest payload of one frame, in bytes.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The largest data chunk (file contents, process output) carried by one frame, in bytes. It leaves
/// room under [`MAX_FRAME_LEN`] for the message around it.
pub const CHUNK_LEN: usize = 256 * 1024;
/// The largest amount of entropy accepted in one `after-restore` request, in bytes.
pub const MAX_ENTROPY_LEN: usize = 64 * 1024;

/// A failure to receive one message: the frame or its payload.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frame itself was bad (too large, cut short, or the connection failed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame was fine but its payload is not a valid message.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Reads one frame and decodes it as a `T`. `Ok(None)` is a clean end of stream between frames.
pub fn read_message<T, R>(reader: &mut R) -> Result<Option<T>, ProtocolError>
where
    T: serde::de::DeserializeOwned,
    R: std::io::Read,
{
    match read_frame(reader, MAX_FRAME_LEN)? {
        None => Ok(None),
        Some(payload) => Ok(Some(decode(&payload)?)),
    }
}

/// Encodes `message` into one frame and writes it with a single `write_all`.
pub fn write_message<T, W>(writer: &mut W, message: &T) -> Result<(), ProtocolError>
where
    T: serde::Serialize,
    W: std::io::Write,
{
    let frame = encode_frame(message)?;
    writer.write_all(&frame).map_err(FrameError::Io)?;
    writer.flush().map_err(FrameError::Io)?;
    Ok(())
}
