//! A new identity for a fork: hostname (kernel and `/etc/hostname`) and `/etc/machine-id`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why an identity could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error("invalid hostname {0:?}: 1 to 64 letters, digits, '-' or '.'")]
    BadHostname(String),
    #[error("invalid machine-id {0:?}: 32 lowercase hex digits, not all zero")]
    BadMachineId(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

pub(crate) fn validate_hostname(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadHostname(name.to_owned()))
    }
}

pub(crate) fn validate_machine_id(id: &str) -> Result<(), IdentityError> {
    let ok = id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadMachineId(id.to_owned()))
    }
}

/// A random machine-id (a version 4 UUID, as systemd makes them) from the kernel RNG.
pub(crate) fn generate_machine_id() -> Result<String, IdentityError> {
    let mut id = [0u8; 16];
    let mut filled = 0;
    while filled < id.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `id`.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(IdentityError::Io {
                what: "getrandom",
                source: e,
            });
        }
        filled += n as usize;
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Sets the kernel's hostname.
pub(crate) fn set_kernel_hostname(name: &str) -> Result<(), IdentityError> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if r < 0 {
        return Err(IdentityError::Io {
            what: "sethostname",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Replaces `dir/name` with `contents` atomically (temporary file and rename), falling back to an
/// in-place rewrite where the file cannot be replaced (a bind mount, for example).
pub(crate) fn replace_file(
    dir: &Path,
    name: &str,
    contents: &str,
    what: &'static str,
) -> Result<(), IdentityError> {
    let io_err = |source| IdentityError::Io { what, source };
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.agent-tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let atomic = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &target)
    })();
    if atomic.is_ok() {
        return Ok(());
    }
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(&target)
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}
