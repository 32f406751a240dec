//! The remote layout of a snapshot: content-addressed chunks and one index per snapshot.
//!
//! Every file of a snapshot (the manifest too) is cut into fixed 4 MiB chunks. A chunk is stored
//! once per remote under `chunks/<sha256 of its bytes>`, zstd-compressed; an all-zero chunk is
//! not stored at all (the index says `null`), so the holes of a sparse memory file cost nothing.
//! The index (`snapshots/<name>/<tag>.json`) lists each file's size and chunk digests and is
//! written last, so a snapshot is visible on a remote only once every chunk is there.
//!
//! Everything here is pure: an index read from a remote is hostile until `validate` accepted it,
//! and a chunk is only ever used after `decode_chunk` checked it against its digest.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const INDEX_VERSION: u32 = 1;
/// Fixed chunk size: large enough that a 1 GiB memory file is 256 requests, small enough that a
/// diff or a second snapshot re-uploads little.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// An index of the largest snapshot we accept is well under this (16 files of 1 TiB at 4 MiB
/// chunks would be ~17 MB of digests; no sane snapshot comes near).
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
/// The largest file an index may describe.
pub const MAX_FILE_BYTES: u64 = 1 << 40;
pub const MAX_FILES: usize = 16;
/// A compressed chunk can exceed its input only by zstd's small frame overhead; anything larger
/// is not one of ours and is refused before it is read.
pub const MAX_COMPRESSED: u64 = CHUNK_SIZE + (CHUNK_SIZE >> 7) + 4096;
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub format_version: u32,
    pub name: String,
    pub tag: String,
    pub chunk_size: u64,
    pub files: Vec<IndexFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub name: String,
    pub size: u64,
    /// One per chunk, in order: the sha256 of the chunk's bytes, or `None` for all zeros.
    pub chunks: Vec<Option<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("the index is not valid JSON: {0}")]
    Parse(String),
    #[error(
        "index format version {found} is not supported (this build reads version {INDEX_VERSION})"
    )]
    Version { found: u32 },
    #[error("the index is not valid: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk {digest} does not decompress: {detail}")]
    Undecodable { digest: String, detail: String },
    #[error("chunk {digest} is {actual} bytes, the index says {expected}")]
    Length {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("chunk {digest} is corrupt: its content has digest {actual}")]
    Digest { digest: String, actual: String },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn is_zero(bytes: &[u8]) -> bool {
    // OR-fold fixed blocks (which the compiler vectorizes) and stop at the first non-zero one:
    // memory files are mostly zeros and this runs over every byte of them.
    let mut blocks = bytes.chunks_exact(256);
    blocks.all(|b| b.iter().fold(0u8, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// Chunks of a file of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The length of chunk `i` of a file of `size` bytes.
pub fn chunk_len(size: u64, i: u64) -> u64 {
    size.saturating_sub(i * CHUNK_SIZE).min(CHUNK_SIZE)
}

pub fn encode_chunk(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(bytes, ZSTD_LEVEL)
}

/// Decompresses a chunk fetched from a remote and checks it is exactly `expected_len` bytes
/// with digest `digest`. Never allocates more than `expected_len` (at most one chunk).
pub fn decode_chunk(
    digest: &str,
    compressed: &[u8],
    expected_len: u64,
) -> Result<Vec<u8>, ChunkError> {
    let cap = usize::try_from(expected_len.min(CHUNK_SIZE)).unwrap_or(0);
    let bytes = zstd::bulk::decompress(compressed, cap).map_err(|e| ChunkError::Undecodable {
        digest: digest.to_string(),
        detail: e.to_string(),
    })?;
    if bytes.len() as u64 != expected_len {
        return Err(ChunkError::Length {
            digest: digest.to_string(),
            expected: expected_len,
            actual: bytes.len() as u64,
        });
    }
    let actual = sha256_hex(&bytes);
    if actual != digest {
        return Err(ChunkError::Digest {
            digest: digest.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

impl Index {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and validates an index from a remote; `name`/`tag` are what we asked for.
    pub fn parse(bytes: &[u8], name: &str, tag: &str) -> Result<Index, IndexError> {
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(IndexError::Invalid(format!("{} bytes", bytes.len())));
        }
        // Read the version alone first, so a newer index is refused by version, not by shape.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version =
            serde_json::from_slice(bytes).map_err(|e| IndexError::Parse(e.to_string()))?;
        if v.format_version != INDEX_VERSION {
            return Err(IndexError::Version {
                found: v.format_version,
            });
        }
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| IndexError::Parse(e.to_string()))?;
        index.validate(name, tag)?;
        Ok(index)
    }

    /// Every bound a hostile index could break: names that could leave the staging directory,
    /// sizes that would make us allocate or write without limit, digests that are not digests.
    pub fn validate(&self, name: &str, tag: &str) -> Result<(), IndexError> {
        let bad = |s: String| Err(IndexError::Invalid(s));
        if self.name != name || self.tag != tag {
            return bad(format!(
                "it describes {}:{}, not {name}:{tag}",
                self.name, self.tag
            ));
        }
        if self.chunk_size != CHUNK_SIZE {
            return bad(format!(
                "chunk size {} is not {CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return bad(format!("{} files", self.files.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.files {
            if !snapshot::manifest::is_safe_name(&f.name) || !seen.insert(f.name.as_str()) {
                return bad(format!(
                    "file name {:?} is not a plain, unique name",
                    f.name
                ));
            }
            if f.size > MAX_FILE_BYTES {
                return bad(format!("{} is {} bytes", f.name, f.size));
            }
            if f.chunks.len() as u64 != chunk_count(f.size) {
                return bad(format!(
                    "{} has {} chunks for {} bytes",
                    f.name,
                    f.chunks.len(),
                    f.size
                ));
            }
            if let Some(d) = f.chunks.iter().flatten().find(|d| !is_digest(d)) {
                return bad(format!("{:?} is not a sha256 digest", d));
            }
        }
        if !seen.contains(snapshot::manifest::MANIFEST) {
            return bad(format!("no {}", snapshot::manifest::MANIFEST));
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> Option<&IndexFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Distinct non-zero chunk digests, with the length each one has.
    pub fn distinct_chunks(&self) -> Vec<(String, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for f in &self.files {
            for (i, d) in f.chunks.iter().enumerate() {
                if let Some(d) = d {
                    if seen.insert(d.clone()) {
                        out.push((d.clone(), chunk_len(f.size, i as u64)));
                    }
                }
            }
        }
        out
    }

    pub fn total_chunks(&self) -> u64 {
        self.files.iter().map(|f| f.chunks.len() as u64).sum()
    }

    pub fn zero_chunks(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.chunks.iter().filter(|c| c.is_none()).count() as u64)
            .sum()
    }

    pub fn logical_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index {
            format_version: INDEX_VERSION,
            name: "a".into(),
            tag: "t".into(),
            chunk_size: CHUNK_SIZE,
            files: vec![
                IndexFile {
                    name: "manifest.json".into(),
                    size: 10,
                    chunks: vec![Some(sha256_hex(b"0123456789"))],
                },
                IndexFile {
                    name: "memory.bin".into(),
                    size: CHUNK_SIZE + 1,
                    chunks: vec![None, Some(sha256_hex(&[1]))],
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_counts() {
        let i = index();
        let back = Index::parse(&i.to_json(), "a", "t").unwrap();
        assert_eq!(back, i);
        assert_eq!(back.total_chunks(), 3);
        assert_eq!(back.zero_chunks(), 1);
        assert_eq!(back.distinct_chunks().len(), 2);
        assert_eq!(back.distinct_chunks()[1].1, 1);
    }

    #[test]
    fn hostile_indexes_are_refused() {
        let mut i = index();
        i.files[1].name = "../escape".into();
        assert!(Index::parse(&i.to_json(), "a", "t").is_err());
        let mut i = index();
        i.files[1].size = u64::MAX;
        assert!(Index::parse(&i.to_json(), "a", "t").is_err());
        let mut i = index();
        i.files[1].chunks.push(None);
        assert!(Index::parse(&i.to_json(), "a", "t").is_err());
        let mut i = index();
        i.files[0].chunks[0] = Some("../../x".into());
        assert!(Index::parse(&i.to_json(), "a", "t").is_err());
        let mut i = index();
        i.files.push(i.files[1].clone());
        assert!(Index::parse(&i.to_json(), "a", "t").is_err());
        let mut i = index();
        i.format_version = 2;
        assert_eq!(
            Index::parse(&i.to_json(), "a", "t"),
            Err(IndexError::Version { found: 2 })
        );
        assert!(Index::parse(&index().to_json(), "b", "t").is_err());
    }

    #[test]
    fn chunks_are_verified() {
        let data = vec![7u8; 5000];
        let d = sha256_hex(&data);
        let z = encode_chunk(&data).unwrap();
        assert!(z.len() < 100, "compressed");
        assert_eq!(decode_chunk(&d, &z, 5000).unwrap(), data);
        assert!(matches!(
            decode_chunk(&d, &z, 4999),
            Err(ChunkError::Undecodable { .. } | ChunkError::Length { .. })
        ));
        let other = encode_chunk(&[8u8; 5000]).unwrap();
        assert!(matches!(
            decode_chunk(&d, &other, 5000),
            Err(ChunkError::Digest { .. })
        ));
        assert!(decode_chunk(&d, b"garbage", 5000).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_len(CHUNK_SIZE + 5, 1), 5);
    }
}
