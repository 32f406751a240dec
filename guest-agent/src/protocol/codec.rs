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
///
/// The buffer grows without leaving copies behind: every buffer it outgrows is zeroed before it is
/// freed, since frames carry command output, file contents and secrets (the caller zeroes the
/// final one).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    let mut buf =
        postcard::serialize_with_flavor(message, ZeroizingVec(buf)).map_err(CodecError::Encode)?;
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

/// A postcard output that zeroes each buffer it outgrows (a plain `Vec` leaves the old one's bytes
/// in freed memory on every reallocation).
struct ZeroizingVec(Vec<u8>);

impl ZeroizingVec {
    fn reserve(&mut self, more: usize) {
        let need = self.0.len().saturating_add(more);
        if need <= self.0.capacity() {
            return;
        }
        let mut bigger = Vec::with_capacity(need.max(self.0.capacity().saturating_mul(2)));
        bigger.extend_from_slice(&self.0);
        let mut old = std::mem::replace(&mut self.0, bigger);
        zeroize::Zeroize::zeroize(&mut old);
    }
}

impl postcard::ser_flavors::Flavor for ZeroizingVec {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.reserve(data.len());
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.reserve(1);
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Decodes one message that must fill `payload` exactly.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (message, rest) = postcard::take_from_bytes(payload).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::read_frame;
    use crate::protocol::messages::{ServerFrame, ServerMsg};

    #[test]
    fn frames_of_every_size_round_trip_through_the_zeroizing_buffer() {
        // Sizes across several growth steps of the buffer (64, 128, ... bytes).
        for len in [0usize, 1, 59, 60, 61, 200, 4096, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let frame = encode_frame(&ServerFrame {
                id: 7,
                msg: ServerMsg::Stdout(data.clone()),
            })
            .unwrap();
            let payload = read_frame(&mut &frame[..], MAX_FRAME_LEN).unwrap().unwrap();
            let back: ServerFrame = decode(&payload).unwrap();
            assert_eq!(back.id, 7);
            match back.msg {
                ServerMsg::Stdout(b) => assert_eq!(b, data, "len {len}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
