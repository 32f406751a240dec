//! Content digests (`sha256:<64 hex>`, `sha512:<128 hex>`), computed here for every blob whatever
//! the transport already checked.

use std::fmt;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256, Sha512};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

/// A validated digest: the hex part is safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub algorithm: Algorithm,
    pub hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| format!("invalid digest {s:?}: want ALGORITHM:HEX"))?;
        let (algorithm, len) = match alg {
            "sha256" => (Algorithm::Sha256, 64),
            "sha512" => (Algorithm::Sha512, 128),
            _ => {
                return Err(format!(
                    "unsupported digest algorithm {alg:?} (sha256 or sha512)"
                ))
            }
        };
        if hex.len() != len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "invalid digest {s:?}: want {len} lowercase hex digits"
            ));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    pub fn algorithm_name(&self) -> &'static str {
        match self.algorithm {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Self::of_algorithm(bytes, Algorithm::Sha256)
    }

    pub fn of_algorithm(bytes: &[u8], a: Algorithm) -> Digest {
        let mut h = Hasher::new(a);
        h.update(bytes);
        h.finish()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm_name(), self.hex)
    }
}

/// An incremental hash of either algorithm.
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Box<Sha512>),
}

impl Hasher {
    pub fn new(a: Algorithm) -> Self {
        match a {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Box::default()),
        }
    }

    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, bytes) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (Algorithm::Sha512, h.finalize().to_vec()),
        };
        Digest {
            algorithm,
            hex: to_hex(&bytes),
        }
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, a: Algorithm) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(a),
            count: 0,
        }
    }

    /// Reads what is left, then returns the digest and byte count of the whole stream.
    pub fn drain(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.hasher.finish(), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes a whole stream, refusing to read more than `limit` bytes.
pub fn hash_stream(r: impl Read, a: Algorithm, limit: u64) -> io::Result<(Digest, u64)> {
    let mut h = HashingReader::new(r.take(limit.saturating_add(1)), a);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = h.read(&mut buf)?;
        if n == 0 {
            break;
        }
    }
    let count = h.count;
    Ok((h.hasher.finish(), count))
}

/// A writer that hashes and counts what goes through to `inner`.
pub struct HashingWriter<W> {
    pub inner: W,
    hasher: Hasher,
    pub count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W, a: Algorithm) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(a),
            count: 0,
        }
    }

    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, self.hasher.finish(), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hasher.update(&b[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_and_hash() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(Digest::of(b""), d);
        assert_eq!(d.to_string(), EMPTY);
        for bad in [
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../etc/passwd",
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "e3b0c442",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn streams() {
        let (d, n) = hash_stream(&b"hello"[..], Algorithm::Sha256, 100).unwrap();
        assert_eq!(n, 5);
        assert_eq!(d, Digest::of(b"hello"));
        // The limit stops an endless stream one byte past it.
        let (_, n) = hash_stream(io::repeat(0), Algorithm::Sha256, 10).unwrap();
        assert_eq!(n, 11);
        let mut w = HashingWriter::new(Vec::new(), Algorithm::Sha512);
        w.write_all(b"x").unwrap();
        let (v, d, n) = w.finish();
        assert_eq!((v.len(), n, d.hex.len()), (1, 1, 128));
    }
}
