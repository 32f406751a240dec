//! Message encoding: postcard payloads inside frames.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::frame::HEADER_LEN;
use super::MAX_FRAME_LEN;

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The encoded message does not fit in one frame.
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The frame limit.
        max: usize,
    },
    /// Serialisation failed.
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    /// The payload holds a valid message followed by extra bytes.
    #[error("malformed message: {0} bytes after the end of the message")]
    Trailing(usize),
}

/// Encodes `message` as a complete frame (header and payload), ready for one `write_all`.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    let mut buf = postcard::to_extend(message, buf).map_err(CodecError::Encode)?;
    let len = buf.len() - HEADER_LEN;
    let len32 = u32::try_from(len).map_err(|_| CodecError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    buf[..HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(buf)
}

/// Decodes one message that must fill `payload` exactly.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (message, rest) = postcard::take_from_bytes(payload).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(message)
}
