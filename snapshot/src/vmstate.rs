//! `vmstate.bin`: the VM's KVM and device state. Layout (little endian):
//! magic (8 bytes) | format version (u32) | payload length (u64) | payload | CRC32 (u32)
//! The CRC covers everything before it. Loading refuses any other magic or CRC, and any version
//! outside `OLDEST_STATE_FORMAT_VERSION..=STATE_FORMAT_VERSION`, naming both.
//!
//! # Compatibility rule
//! Version 2 payloads are CBOR ([`ciborium`]): self-describing, with field and variant names, so
//! a state struct can change without breaking the snapshots already on users' disks:
//! - adding a field is compatible and does NOT bump the version, provided the field carries
//!   `#[serde(default)]` (a snapshot written before it loads with the default) and the default
//!   reproduces the behaviour of the code that did not have it;
//! - a field that is no longer needed stays readable: a decoder ignores fields it does not know,
//!   so older code also loads a newer snapshot of the same version;
//! - renaming a field or variant, changing a field's type or meaning, or removing a variant is
//!   incompatible: bump `STATE_FORMAT_VERSION`, keep reading the old version (convert on load),
//!   and add a golden snapshot of the new version (`scripts/make-golden.sh`); `tests/golden.rs`
//!   restores every golden with the current code.
//!
//! Version 1 payloads were postcard: positional, so they load only into the exact struct layout
//! that wrote them, which is today's. They are read, never written. The first change to a state
//! struct breaks that (the version 1 golden in `tests/golden.rs` fails): then either keep frozen
//! copies of the version 1 structs and convert, or raise `OLDEST_STATE_FORMAT_VERSION` to 2 and
//! say so in the release notes. Format 2 has no such limit.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const MAGIC: [u8; 8] = *b"MAVMSTAT";
/// The version this build writes. See the module's compatibility rule before changing it.
pub const STATE_FORMAT_VERSION: u32 = 2;
/// The oldest version this build still reads.
pub const OLDEST_STATE_FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8;
const TRAILER: usize = 4;
/// No VM state comes near this; a larger length field is corruption or hostility.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// CBOR nests one level per struct or sequence; our state is a few levels deep. A hostile payload
/// of nested arrays must not exhaust the stack.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("vmstate.bin is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("vmstate.bin has a wrong magic number")]
    BadMagic,
    #[error(
        "vmstate.bin has state format version {found}; this build reads versions {oldest} to {supported}"
    )]
    UnknownVersion {
        found: u32,
        oldest: u32,
        supported: u32,
    },
    #[error("vmstate.bin claims a {0}-byte payload, more than the file or the limit holds")]
    BadLength(u64),
    #[error("vmstate.bin CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("vmstate.bin (state format version {version}) does not decode: {why}")]
    Decode { version: u32, why: String },
    #[error("cannot encode VM state: {0}")]
    Encode(String),
}

pub fn encode<S: Serialize>(state: &S) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::with_capacity(64 << 10);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    ciborium::into_writer(state, &mut out).map_err(|e| StateError::Encode(e.to_string()))?;
    let len = (out.len() - HEADER) as u64;
    if len > MAX_PAYLOAD {
        return Err(StateError::Encode(format!(
            "{len}-byte payload exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    out[12..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks magic, version, length and CRC without decoding the payload.
pub fn validate(bytes: &[u8]) -> Result<(), StateError> {
    payload(bytes).map(|_| ())
}

/// The format version a valid `vmstate.bin` was written in.
pub fn version(bytes: &[u8]) -> Result<u32, StateError> {
    payload(bytes).map(|(version, _)| version)
}

pub fn decode<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, StateError> {
    let (version, payload) = payload(bytes)?;
    let why = match version {
        1 => match postcard::from_bytes(payload) {
            Ok(s) => return Ok(s),
            Err(e) => e.to_string(),
        },
        _ => match ciborium::de::from_reader_with_recursion_limit(payload, MAX_DEPTH) {
            Ok(s) => return Ok(s),
            Err(e) => e.to_string(),
        },
    };
    Err(StateError::Decode { version, why })
}

fn payload(bytes: &[u8]) -> Result<(u32, &[u8]), StateError> {
    if bytes.len() < HEADER + TRAILER {
        return Err(StateError::Truncated(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if !(OLDEST_STATE_FORMAT_VERSION..=STATE_FORMAT_VERSION).contains(&version) {
        return Err(StateError::UnknownVersion {
            found: version,
            oldest: OLDEST_STATE_FORMAT_VERSION,
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
    Ok((version, &bytes[HEADER..end]))
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
                oldest: OLDEST_STATE_FORMAT_VERSION,
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

    /// The same struct as `S` after a release added a field (with a default, as the rule says).
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct SPlus {
        a: u64,
        b: Vec<u8>,
        #[serde(default)]
        c: Option<u32>,
    }

    #[test]
    fn an_added_field_loads_both_ways() {
        let old: SPlus = decode(&sample()).unwrap();
        assert_eq!(
            old,
            SPlus {
                a: 42,
                b: vec![1, 2, 3],
                c: None
            }
        );
        let newer = encode(&SPlus {
            a: 7,
            b: vec![9],
            c: Some(5),
        })
        .unwrap();
        let s: S = decode(&newer).unwrap();
        assert_eq!(s, S { a: 7, b: vec![9] });
    }

    /// Version 1 files (postcard) are still read.
    #[test]
    fn reads_a_version_1_file() {
        let payload = postcard::to_allocvec(&S {
            a: 3,
            b: vec![4, 5],
        })
        .unwrap();
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        v1.extend_from_slice(&payload);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(version(&v1).unwrap(), 1);
        assert_eq!(
            decode::<S>(&v1).unwrap(),
            S {
                a: 3,
                b: vec![4, 5]
            }
        );
        assert_eq!(version(&sample()).unwrap(), STATE_FORMAT_VERSION);
    }

    /// A CRC-valid file with a hostile payload is an error, never a panic or a deep recursion.
    #[test]
    fn hostile_payloads_are_errors() {
        let wrap = |payload: &[u8]| {
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC);
            f.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
            f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            f.extend_from_slice(payload);
            let crc = crc32fast::hash(&f);
            f.extend_from_slice(&crc.to_le_bytes());
            f
        };
        // 100,000 nested one-element arrays (0x81), then a 0.
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0);
        assert!(matches!(
            decode::<S>(&wrap(&deep)),
            Err(StateError::Decode { version: 2, .. })
        ));
        // A byte string claiming 2^63 bytes.
        let huge = [0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(decode::<S>(&wrap(&huge)).is_err());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [1usize, 7, 64, 4096] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(decode::<S>(&wrap(&junk)).is_err());
        }
    }
}
