//! Opening files a less trusted process can replace (the jailed VMM and page servers write their
//! workspace and snapshot directories; root reads them): never through a link, only a regular
//! file, and without blocking on a FIFO. One mechanism for every such read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for reading: refuses a symbolic link (ELOOP) and anything but a regular file.
pub fn open(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// The first `max` bytes (at most) of `path`, opened as [`open`] does.
pub fn read(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `max` bytes (at most) of a log another process writes to, opened as [`open`] does,
/// as text: where its latest lines are.
pub fn tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regular file opens; a link to it, a directory and a FIFO do not (the FIFO at once).
    #[test]
    fn only_a_regular_file_opens() {
        let dir = std::env::temp_dir().join(format!("untrusted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read(&file, 4).unwrap(), b"0123");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open(&link).is_err());
        assert!(open(&dir).is_err());
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.clone().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open(&fifo).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The tail of a log is its last bytes; a link to a log is refused.
    #[test]
    fn a_log_tail_is_its_last_bytes_and_never_through_a_link() {
        let dir = std::env::temp_dir().join(format!("untrusted-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        let text: String = (0..500).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let t = tail(&log, 20).unwrap();
        assert_eq!(t, text[text.len() - 20..]);
        assert!(t.ends_with("line 499\n"));
        assert_eq!(tail(&log, 1 << 20).unwrap(), text);
        let link = dir.join("linked.log");
        std::os::unix::fs::symlink(&log, &link).unwrap();
        assert!(tail(&link, 1 << 20).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
