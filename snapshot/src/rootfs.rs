//! Private rootfs copies: a reflink (FICLONE) where the filesystem shares extents, else a copy
//! that keeps holes (SEEK_DATA/SEEK_HOLE), so a mostly empty image stays small.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `_IOW(0x94, 9, int)`
const FICLONE: libc::c_ulong = 0x4004_9409;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

/// Copies `src` to a new file `dst` (which must not exist).
pub fn copy_image(src: &Path, dst: &Path) -> std::io::Result<CopyMethod> {
    copy_from(&File::open(src)?, dst)
}

/// [`copy_image`] of a file a less trusted process can replace (a workspace's disk, a snapshot's
/// copy of it: the jailed VMM writes both): never through a link, only a regular file, so the
/// copy cannot be led to another host file (which a guest would then read as its disk).
pub fn copy_image_untrusted(src: &Path, dst: &Path) -> std::io::Result<CopyMethod> {
    copy_from(&crate::untrusted::open(src)?, dst)
}

fn copy_from(input: &File, dst: &Path) -> std::io::Result<CopyMethod> {
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // SAFETY: both descriptors are open files owned by this function.
    if unsafe { libc::ioctl(output.as_raw_fd(), FICLONE as _, input.as_raw_fd()) } == 0 {
        return Ok(CopyMethod::Reflink);
    }
    sparse_copy(input, &output)?;
    Ok(CopyMethod::Sparse)
}

fn sparse_copy(input: &File, output: &File) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    let fd = input.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            input.read_exact_at(&mut buf[..n], off)?;
            output.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        pos = hole;
    }
    output.set_len(len)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("snap-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.img");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"superblock", 1024).unwrap();
        f.write_all_at(&[9u8; 8192], 40 << 20).unwrap();
        drop(f);
        let dst = dir.join("dst.img");
        let how = copy_image(&src, &dst).unwrap();
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&dst).unwrap(),
            "{how:?}"
        );
        assert!(copy_image(&src, &dst).is_err(), "never overwrites");
        // A link (to a readable image) or a FIFO is refused by the untrusted copy, and no
        // destination is made.
        let link = dir.join("link.img");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let out = dir.join("from-link.img");
        assert!(copy_image_untrusted(&link, &out).is_err());
        assert!(!out.exists());
        let fifo = dir.join("fifo.img");
        let c = std::ffi::CString::new(fifo.clone().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(copy_image_untrusted(&fifo, &out).is_err());
        assert!(!out.exists());
        assert_eq!(
            copy_image_untrusted(&src, &out).unwrap(),
            copy_image(&src, &dir.join("again.img")).unwrap()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
