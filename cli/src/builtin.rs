//! Guests embedded in the binary, named `builtin:<name>` wherever a kernel path is accepted.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

pub const PREFIX: &str = "builtin:";

/// A kernel image ready to load: either the user's path, or an embedded image held in a memfd
/// (kept open for as long as this lives) so nothing is left on disk.
pub struct KernelImage {
    pub path: PathBuf,
    _memfd: Option<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error("unknown built-in kernel {0:?}; available: builtin:testguest")]
    Unknown(String),
    #[error("cannot stage the built-in kernel: {0}")]
    Stage(#[from] std::io::Error),
}

/// The bytes of a built-in kernel named `builtin:<name>`.
pub fn bytes(kernel: &str) -> Result<&'static [u8], BuiltinError> {
    match kernel.strip_prefix(PREFIX) {
        Some("testguest") => Ok(testguest_elf::ELF),
        _ => Err(BuiltinError::Unknown(kernel.to_string())),
    }
}

pub fn resolve(kernel: &str) -> Result<KernelImage, BuiltinError> {
    let Some(name) = kernel.strip_prefix(PREFIX) else {
        return Ok(KernelImage {
            path: PathBuf::from(kernel),
            _memfd: None,
        });
    };
    let bytes = bytes(kernel)?;
    let memfd = memfd(name)?;
    (&memfd).write_all(bytes)?;
    Ok(KernelImage {
        path: PathBuf::from(format!("/proc/self/fd/{}", memfd.as_raw_fd())),
        _memfd: Some(memfd),
    })
}

fn memfd(name: &str) -> std::io::Result<File> {
    let cname = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid NUL-terminated name; the returned fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}
