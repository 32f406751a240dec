//! Length-prefixed frames: a `u32` big-endian payload length, then the payload.

use std::io::{self, ErrorKind, Read};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a payload longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced payload length.
        len: u32,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes of the frame (header included) received before the end.
        got: usize,
        /// Bytes the frame should have had (header included).
        expected: usize,
    },
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 4;

/// Reads one frame's payload, refusing payloads longer than `max` before allocating anything.
///
/// Returns `Ok(None)` when the stream ends cleanly at a frame boundary.
pub fn read_frame<R: Read>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    let len = u32::from_be_bytes(header);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    if len_usize > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len_usize];
    let got = read_full(reader, &mut payload)?;
    if got < len_usize {
        return Err(FrameError::Truncated {
            got: HEADER_LEN + got,
            expected: HEADER_LEN + len_usize,
        });
    }
    Ok(Some(payload))
}

/// Fills `buf` as far as the stream allows; returns how many bytes were read (less than `buf.len()`
/// only at end of stream).
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_frames_back_to_back_then_eof() {
        let mut bytes = frame(b"one");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"three"));
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r, 16).unwrap().unwrap(), b"one");
        assert_eq!(read_frame(&mut r, 16).unwrap().unwrap(), b"");
        assert_eq!(read_frame(&mut r, 16).unwrap().unwrap(), b"three");
        assert!(read_frame(&mut r, 16).unwrap().is_none());
    }

    #[test]
    fn refuses_oversized_length_without_reading_payload() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = read_frame(&mut &bytes[..], 1 << 20).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len: u32::MAX, .. }),
            "{err}"
        );
    }

    #[test]
    fn truncated_header_and_payload_are_errors() {
        let err = read_frame(&mut &[0u8, 0][..], 16).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    got: 2,
                    expected: 4
                }
            ),
            "{err}"
        );
        let mut bytes = frame(b"hello");
        bytes.truncate(6);
        let err = read_frame(&mut &bytes[..], 16).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    got: 6,
                    expected: 9
                }
            ),
            "{err}"
        );
    }
}
