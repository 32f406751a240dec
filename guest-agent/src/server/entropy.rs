//! Reseeding the kernel RNG with host-provided entropy, so forks of one snapshot do not share their
//! random state.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOW('R', 0x03, int[2])`: add entropy and credit it (needs CAP_SYS_ADMIN).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Adds `entropy` to the pool behind `device`, credited in full. Returns the bytes added.
pub(crate) fn add_entropy(device: &Path, entropy: &[u8]) -> io::Result<u32> {
    let len = i32::try_from(entropy.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    let bits = len
        .checked_mul(8)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in u32 words
    // so the buffer is aligned for it.
    let words = 2 + entropy.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = bits as u32;
    info[1] = len as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    let dev = OpenOptions::new().write(true).open(device)?;
    // SAFETY: info is a rand_pool_info whose buf holds buf_size bytes.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    let result = if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as u32)
    };
    info.fill(0);
    std::hint::black_box(&info);
    result
}

/// Makes the CRNG reseed from the pool now, so the entropy just added takes effect at once.
pub(crate) fn reseed_crng(device: &Path) -> io::Result<()> {
    let dev = OpenOptions::new().write(true).open(device)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
