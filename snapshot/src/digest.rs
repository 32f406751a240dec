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

/// The next offset at or after `pos` where data (`SEEK_DATA`) or a hole (`SEEK_HOLE`) starts;
/// `None` when there is no more data, or the filesystem cannot tell (then all is data).
fn seek(file: &File, pos: u64, whence: i32) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(pos).ok()?;
    // SAFETY: lseek on a descriptor we own; it only moves the file offset, which nothing else
    // here relies on (reads are positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    u64::try_from(r).ok()
}

/// The digest and size of a whole file. The holes of a sparse file (most of a memory file) are
/// hashed as the zeros they read as, from a zero buffer: reading them would make the kernel
/// zero-fill and copy every byte, which was most of the time a pull or import spent verifying.
pub fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut d = FileDigest::new();
    let zeros = vec![0u8; BUF];
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < size {
        // Where data starts: ENXIO (no more data) means a hole to the end; a filesystem without
        // SEEK_DATA (EINVAL) is read as all data.
        let data = match seek(&file, pos, libc::SEEK_DATA) {
            Some(d) => d.clamp(pos, size),
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => size,
            None => pos,
        };
        let mut hole = data - pos;
        while hole > 0 {
            let n = hole.min(BUF as u64) as usize;
            d.update(&zeros[..n]);
            hole -= n as u64;
        }
        pos = data;
        if pos >= size {
            break;
        }
        let end = seek(&file, pos, libc::SEEK_HOLE)
            .map(|h| h.clamp(pos + 1, size))
            .unwrap_or(size);
        while pos < end {
            let n = (end - pos).min(BUF as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            d.update(&buf[..n]);
            pos += n as u64;
        }
    }
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

    #[test]
    fn sparse_files_hash_as_their_zeros() {
        use std::os::unix::fs::FileExt;
        let p = std::env::temp_dir().join(format!("snap-digest-sparse-{}", std::process::id()));
        let size = 9u64 << 20;
        let mut dense = vec![0u8; size as usize];
        dense[(4 << 20) + 3] = 9;
        dense[(8 << 20) + 100] = 1;
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[9], (4 << 20) + 3).unwrap();
        f.write_all_at(&[1], (8 << 20) + 100).unwrap();
        drop(f);
        let mut expect = FileDigest::new();
        expect.update(&dense);
        assert_eq!(file_digest(&p).unwrap(), (expect.finish(), size));
        // All hole, and empty.
        std::fs::write(&p, b"").unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let mut z = FileDigest::new();
        z.update(&vec![0u8; 3 << 20]);
        assert_eq!(file_digest(&p).unwrap().0, z.finish());
        std::fs::write(&p, b"").unwrap();
        assert_eq!(file_digest(&p).unwrap().0, FileDigest::new().finish());
        std::fs::remove_file(p).unwrap();
    }
}
