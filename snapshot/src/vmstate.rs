//! `vmstate.bin`: the VM's KVM and device state. Layout (little endian):
//! magic (8 bytes) | format version (u32) | payload length (u64) | postcard payload | CRC32 (u32)
//! The CRC covers everything before it. Loading refuses any other magic, version or CRC.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: [u8; 8] = *b"MAVMSTAT";
/// Bump on any incompatible change of the state encoding; loaders refuse other versions.
pub const STATE_FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8;
const TRAILER: usize = 4;
/// No VM state comes near this; a larger length field is corruption or hostility.
pub const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("vmstate.bin is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("vmstate.bin has a wrong magic number")]
    BadMagic,
    #[error("vmstate.bin has format version {found}; this build reads version {supported}")]
    UnknownVersion { found: u32, supported: u32 },
    #[error("vmstate.bin claims a {0}-byte payload, more than the file or the limit holds")]
    BadLength(u64),
    #[error("vmstate.bin CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("vmstate.bin payload does not decode: {0}")]
    Decode(String),
    #[error("cannot encode VM state: {0}")]
    Encode(String),
}

pub fn encode<S: Serialize>(state: &S) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_allocvec(state).map_err(|e| StateError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks magic, version, length and CRC without decoding the payload.
pub fn validate(bytes: &[u8]) -> Result<(), StateError> {
    payload(bytes).map(|_| ())
}

pub fn decode<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, StateError> {
    postcard::from_bytes(payload(bytes)?).map_err(|e| StateError::Decode(e.to_string()))
}

fn payload(bytes: &[u8]) -> Result<&[u8], StateError> {
    if bytes.len() < HEADER + TRAILER {
        return Err(StateError::Truncated(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != STATE_FORMAT_VERSION {
        return Err(StateError::UnknownVersion {
            found: version,
            supported: STATE_FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let available = (bytes.len() - HEADER - TRAILER) as u64;
    if len > MAX_PAYLOAD || len != available {
        return Err(StateError::BadLength(len));
    }
    let end = HEADER + len as usize;
    let stored = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(StateError::Crc { stored, computed });
    }
    Ok(&bytes[HEADER..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 42,
            b: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let s: S = decode(&sample()).unwrap();
        assert_eq!(
            s,
            S {
                a: 42,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                decode::<S>(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn refuses_unknown_version_naming_both() {
        let mut bad = sample();
        bad[8] = 9;
        assert_eq!(
            decode::<S>(&bad).unwrap_err(),
            StateError::UnknownVersion {
                found: 9,
                supported: STATE_FORMAT_VERSION
            }
        );
    }

    #[test]
    fn hostile_lengths_and_truncation() {
        let good = sample();
        for n in 0..good.len() {
            assert!(decode::<S>(&good[..n]).is_err(), "truncated to {n}");
        }
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode::<S>(&huge).unwrap_err(),
            StateError::BadLength(u64::MAX)
        );
    }
}
