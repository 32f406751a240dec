//! File digests: xxh3-128 for snapshot files (fast enough to check gigabytes of guest memory on
//! every restore; it detects corruption, not tampering), SHA-256 for the kernel identity.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha256};
use xxhash_rust::xxh3::Xxh3;

pub const FILE_DIGEST_PREFIX: &str = "xxh3-128:";
const BUF: usize = 1 << 20;

/// Incremental xxh3-128 in our string form.
#[derive(Default, Clone)]
pub struct FileDigest(Xxh3);

impl FileDigest {
    pub fn new() -> Self {
        Self(Xxh3::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(&self) -> String {
        format!("{FILE_DIGEST_PREFIX}{:032x}", self.0.digest128())
    }
}

fn stream(path: &Path, mut f: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        f(&buf[..n]);
        total += n as u64;
    }
}

/// The digest and size of a whole file.
pub fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut d = FileDigest::new();
    let size = stream(path, |b| d.update(b))?;
    Ok((d.finish(), size))
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    stream(path, |b| h.update(b))?;
    Ok(hex(&h.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn file_digest_changes_with_one_flipped_bit() {
        let p = std::env::temp_dir().join(format!("snap-digest-{}", std::process::id()));
        let mut data = vec![7u8; 3 << 20];
        std::fs::write(&p, &data).unwrap();
        let (a, size) = file_digest(&p).unwrap();
        assert_eq!(size, 3 << 20);
        assert!(a.starts_with(FILE_DIGEST_PREFIX) && a.len() == FILE_DIGEST_PREFIX.len() + 32);
        data[(2 << 20) + 5] ^= 1;
        std::fs::write(&p, &data).unwrap();
        assert_ne!(file_digest(&p).unwrap().0, a);
        let mut streamed = FileDigest::new();
        streamed.update(&data[..100]);
        streamed.update(&data[100..]);
        assert_eq!(streamed.finish(), file_digest(&p).unwrap().0);
        std::fs::remove_file(p).unwrap();
    }
}
