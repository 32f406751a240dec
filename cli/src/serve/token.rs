//! The API token: 32 random bytes, hex, in `<state root>/serve-token`, mode 0600, created on
//! the first `serve` and reused after, so scripts keep working across restarts.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::exit::{Code, Failure};

pub const FILE: &str = "serve-token";
const BYTES: usize = 32;

pub fn path(root: &Path) -> PathBuf {
    root.join(FILE)
}

pub fn load_or_create(root: &Path) -> Result<String, Failure> {
    let p = path(root);
    let fail = |e: std::io::Error| Failure::new(Code::Error, format!("token {}: {e}", p.display()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
    {
        Ok(mut f) => {
            let token = random_hex()?;
            f.write_all(token.as_bytes()).map_err(fail)?;
            f.sync_all().map_err(fail)?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(&p).map_err(fail)?;
            // A token others could read (or a link planted in its place) guards nothing.
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if !meta.file_type().is_file() || meta.uid() != me {
                return Err(Failure::new(
                    Code::Error,
                    format!("{} is not a regular file owned by this user", p.display()),
                ));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .map_err(fail)?;
            }
            let mut s = String::new();
            std::fs::File::open(&p)
                .map_err(fail)?
                .take(256)
                .read_to_string(&mut s)
                .map_err(fail)?;
            let s = s.trim().to_string();
            if s.len() < 32 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(Failure::new(
                    Code::Error,
                    format!(
                        "{} holds no valid token: remove it to get a new one",
                        p.display()
                    ),
                ));
            }
            Ok(s)
        }
        Err(e) => Err(fail(e)),
    }
}

fn random_hex() -> Result<String, Failure> {
    let mut buf = [0u8; BYTES];
    let mut filled = 0;
    while filled < BYTES {
        // SAFETY: getrandom writes at most the given length into our buffer.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), BYTES - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Failure::new(Code::Error, format!("getrandom: {e}")));
        }
        filled += n as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without an early exit, so timing tells nothing about how much of a guess matched.
pub fn matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("ma-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = load_or_create(&dir).unwrap();
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(&dir).unwrap(), t);
        assert!(matches(&t, &t));
        assert!(!matches(&t, &t[1..]));
        assert!(!matches(&t, &"0".repeat(64)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
