//! The userfaultfd ABI (from `linux/userfaultfd.h`, up to Linux 6.x) and the Unix seqpacket
//! socket with SCM_RIGHTS, as thin safe wrappers over raw syscalls.
//!
//! Raw ioctls rather than the `userfaultfd` crate: that crate needs libclang at build time on every
//! machine, fixes the feature set at compile time (so it cannot probe a newer kernel), and folds a
//! negative `copy` result into a byte count on EAGAIN; here every outcome of a fill is explicit.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

pub const PAGE: u64 = 4096;

pub const UFFD_API: u64 = 0xAA;

pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_SIGBUS: u64 = 1 << 7;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_POISON: u64 = 1 << 14;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const FEATURE_MOVE: u64 = 1 << 16;

/// Names of the feature bits, for reports.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (FEATURE_PAGEFAULT_FLAG_WP, "pagefault-flag-wp"),
    (FEATURE_EVENT_FORK, "event-fork"),
    (FEATURE_EVENT_REMAP, "event-remap"),
    (FEATURE_EVENT_REMOVE, "event-remove"),
    (FEATURE_MISSING_HUGETLBFS, "missing-hugetlbfs"),
    (FEATURE_MISSING_SHMEM, "missing-shmem"),
    (FEATURE_EVENT_UNMAP, "event-unmap"),
    (FEATURE_SIGBUS, "sigbus"),
    (FEATURE_THREAD_ID, "thread-id"),
    (FEATURE_MINOR_HUGETLBFS, "minor-hugetlbfs"),
    (FEATURE_MINOR_SHMEM, "minor-shmem"),
    (FEATURE_EXACT_ADDRESS, "exact-address"),
    (FEATURE_WP_HUGETLBFS_SHMEM, "wp-hugetlbfs-shmem"),
    (FEATURE_WP_UNPOPULATED, "wp-unpopulated"),
    (FEATURE_POISON, "poison"),
    (FEATURE_WP_ASYNC, "wp-async"),
    (FEATURE_MOVE, "move"),
];

pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const EVENT_FORK: u8 = 0x13;
pub const EVENT_REMAP: u8 = 0x14;
pub const EVENT_REMOVE: u8 = 0x15;
pub const EVENT_UNMAP: u8 = 0x16;

pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

pub const REGISTER_MODE_MISSING: u64 = 1 << 0;

const NR_REGISTER: u64 = 0x00;
const NR_UNREGISTER: u64 = 0x01;
const NR_WAKE: u64 = 0x02;
const NR_COPY: u64 = 0x03;
const NR_ZEROPAGE: u64 = 0x04;
const NR_API: u64 = 0x3F;

/// The range ioctls a MISSING-mode registration must offer.
pub const NEEDED_RANGE_IOCTLS: u64 = (1 << NR_WAKE) | (1 << NR_COPY) | (1 << NR_ZEROPAGE);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, NR_API, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_REGISTER,
    size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, NR_UNREGISTER, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, NR_WAKE, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, NR_COPY, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    NR_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);
/// `/dev/userfaultfd`'s one ioctl: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new userfaultfd (close-on-exec, non-blocking reads), able to handle faults raised by the
/// kernel on the process's behalf (KVM's), so not `UFFD_USER_MODE_ONLY`. Tries the syscall first,
/// then `/dev/userfaultfd` (Linux 6.1+), which is how an unprivileged process gets one when
/// `vm.unprivileged_userfaultfd` is 0.
pub fn new_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r >= 0 {
        // SAFETY: the kernel just returned this fd to us.
        return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
    }
    let first = io::Error::last_os_error();
    if !matches!(first.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) {
        return Err(first);
    }
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(d) => d,
        Err(_) => return Err(first),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and returns a new fd.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// UFFDIO_API: enables `features` on `uffd`; returns every feature the kernel supports. Only
/// one call per uffd is allowed.
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api we own.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut a) })?;
    Ok(a.features)
}

/// UFFDIO_REGISTER; returns the range ioctls the kernel offers on it.
pub fn register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: reads and writes a uffdio_register we own; the range is the caller's mapping.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) })?;
    Ok(r.ioctls)
}

pub fn unregister(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: reads a uffdio_range we own.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) }).map(|_| ())
}

/// Wakes threads waiting on faults in the range.
pub fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: reads a uffdio_range we own.
    cvt(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) }).map(|_| ())
}

/// What a UFFDIO_COPY or UFFDIO_ZEROPAGE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled (and its waiters woken).
    Done,
    /// Only this many bytes from the start were filled (the next page exists, or an event
    /// interrupted): continue after them.
    Partial(u64),
    /// The first page is already populated.
    Exists,
    /// The client's address space is changing (a remove/unmap event is pending): read events,
    /// then retry.
    Again,
    /// No registered mapping there any more (ENOENT).
    NoMapping,
    /// The client process is gone (ESRCH).
    NoProcess,
    /// Any other error (errno).
    Failed(i32),
}

fn fill_result(ret: libc::c_int, done: i64) -> Fill {
    if ret == 0 {
        return Fill::Done;
    }
    let errno = io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO);
    let code = if done > 0 {
        return Fill::Partial(done as u64);
    } else if done < 0 {
        (-done) as i32
    } else {
        errno
    };
    match code {
        libc::EEXIST => Fill::Exists,
        libc::EAGAIN => Fill::Again,
        libc::ENOENT => Fill::NoMapping,
        libc::ESRCH => Fill::NoProcess,
        e => Fill::Failed(e),
    }
}

/// UFFDIO_COPY of `len` bytes from `src` (in this process) to `dst` (in the uffd's process).
///
/// # Safety
/// `src..src+len` must be readable memory of this process.
pub unsafe fn copy(uffd: BorrowedFd<'_>, dst: u64, src: *const u8, len: u64) -> Fill {
    let mut c = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    // SAFETY: reads and writes a uffdio_copy we own; the kernel reads `src` (caller's promise)
    // and writes only into the other process's registered range.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    fill_result(r, c.copy)
}

/// UFFDIO_ZEROPAGE: maps the shared zero page over `len` bytes at `dst`.
pub fn zeropage(uffd: BorrowedFd<'_>, dst: u64, len: u64) -> Fill {
    let mut z = UffdioZeropage {
        range: UffdioRange { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: reads and writes a uffdio_zeropage we own.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
    fill_result(r, z.zeropage)
}

/// One `struct uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    PageFault {
        address: u64,
        flags: u64,
    },
    /// MADV_DONTNEED / MADV_REMOVE: `start..end` is no longer populated.
    Remove {
        start: u64,
        end: u64,
    },
    /// munmap: `start..end` is gone.
    Unmap {
        start: u64,
        end: u64,
    },
    /// mremap: `from..from+len` moved to `to`.
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// fork: the kernel installed the child's new uffd as descriptor `ufd` in the reader.
    Fork {
        ufd: u32,
    },
    /// A future event.
    Other(u8),
}

pub const MSG_SIZE: usize = 32;

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

pub fn parse_msg(b: &[u8; MSG_SIZE]) -> Msg {
    match b[0] {
        EVENT_PAGEFAULT => Msg::PageFault {
            flags: u64_at(b, 8),
            address: u64_at(b, 16),
        },
        EVENT_REMOVE => Msg::Remove {
            start: u64_at(b, 8),
            end: u64_at(b, 16),
        },
        EVENT_UNMAP => Msg::Unmap {
            start: u64_at(b, 8),
            end: u64_at(b, 16),
        },
        EVENT_REMAP => Msg::Remap {
            from: u64_at(b, 8),
            to: u64_at(b, 16),
            len: u64_at(b, 24),
        },
        EVENT_FORK => Msg::Fork {
            ufd: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        },
        e => Msg::Other(e),
    }
}

/// Reads pending messages without blocking; an empty vector means none were pending.
pub fn read_msgs(uffd: BorrowedFd<'_>, max: usize, out: &mut Vec<Msg>) -> io::Result<()> {
    let mut buf = vec![[0u8; MSG_SIZE]; max.max(1)];
    // SAFETY: reads at most buf's size into buf.
    let n = unsafe {
        libc::read(
            uffd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len() * MSG_SIZE,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
            _ => Err(e),
        };
    }
    for m in buf.iter().take(n as usize / MSG_SIZE) {
        out.push(parse_msg(m));
    }
    Ok(())
}

/// Whether `fd` is a userfaultfd (its /proc link names the anon inode class).
pub fn is_uffd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

/// Readiness of one fd after `poll`.
pub struct Ready {
    pub readable: bool,
    pub hangup: bool,
}

/// Polls `fds` for input; `timeout_ms` < 0 waits forever. EINTR counts as nothing ready.
pub fn poll_in(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<Ready>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
        p.iter_mut().for_each(|x| x.revents = 0);
    }
    Ok(p.iter()
        .map(|x| Ready {
            readable: x.revents & libc::POLLIN != 0,
            hangup: x.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL | libc::POLLRDHUP)
                != 0,
        })
        .collect())
}

/// An eventfd used as a level-triggered "stop" flag: once signalled it stays readable.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall returning a new fd.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: the fd is new and ours.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }
}

/// A connected or listening `AF_UNIX` `SOCK_SEQPACKET` socket: message boundaries are kept, file
/// descriptors travel with SCM_RIGHTS, and the peer closing is seen as end of file.
#[derive(Debug)]
pub struct Seqpacket(OwnedFd);

/// Most descriptors one message may carry before it is refused (more are closed on arrival).
const MAX_FDS: usize = 4;

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= a.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is empty or longer than {} bytes",
                path.display(),
                a.sun_path.len() - 1
            ),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((a, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new fd.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: the fd is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Seqpacket {
    /// Binds and listens on `path` (owner-only permissions: whoever connects can read the
    /// snapshot's memory).
    pub fn listen(path: &Path) -> io::Result<Self> {
        let (addr, len) = sockaddr(path)?;
        let fd = new_socket()?;
        // SAFETY: addr/len describe a valid sockaddr_un.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        // SAFETY: plain syscall on our fd.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(Self(fd))
    }

    pub fn connect(path: &Path) -> io::Result<Self> {
        let (addr, len) = sockaddr(path)?;
        let fd = new_socket()?;
        // SAFETY: addr/len describe a valid sockaddr_un.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        Ok(Self(fd))
    }

    /// Accepts one connection (blocking unless the socket is non-blocking).
    pub fn accept(&self) -> io::Result<Self> {
        // SAFETY: we pass no address buffer.
        let fd = cvt(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: the fd is new and ours.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }

    /// The peer's process id (SO_PEERCRED).
    pub fn peer_pid(&self) -> Option<u32> {
        // SAFETY: ucred is plain data.
        let mut c: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most len bytes into c.
        let r = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut c as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (r == 0 && c.pid > 0).then_some(c.pid as u32)
    }

    /// Receive timeout (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_RCVTIMEO, t)
    }

    /// Send timeout (`None`: block forever): a peer that never reads cannot stall the sender.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_SNDTIMEO, t)
    }

    fn set_timeout(&self, opt: libc::c_int, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_usec: d.subsec_micros().max(u32::from(d.is_zero())) as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: setsockopt reads a timeval we own.
        cvt(unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .map(|_| ())
    }

    /// Sends one message, with `fds` attached as SCM_RIGHTS.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let data_len = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        if !raw.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one
            // header with `data_len` bytes of payload.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    data_len,
                );
            }
        }
        loop {
            // SAFETY: msg points at live buffers set up above.
            let r = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if r >= 0 {
                return if r as usize == bytes.len() {
                    Ok(())
                } else {
                    Err(io::Error::other("short send on a seqpacket socket"))
                };
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Receives one message into `buf`. `Ok(None)`: the peer closed the connection.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space =
            unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            // SAFETY: msg points at live buffers set up above.
            let r = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into cbuf; every SCM_RIGHTS
        // payload holds whole fds that are now ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        if fd >= 0 {
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 && fds.is_empty() && msg.msg_flags & libc::MSG_TRUNC == 0 {
            return Ok(None);
        }
        Ok(Some(Received {
            len: n,
            fds,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        }))
    }

    /// Shuts both directions down: the peer sees end of file even while other references to
    /// the socket are alive.
    pub fn shutdown(&self) {
        // SAFETY: plain syscall on our fd.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer.
    pub truncated: bool,
    /// More descriptors came than fit (the kernel closed the rest).
    pub fds_truncated: bool,
}

/// Which pages of `addr..addr+len` (page-aligned, anonymous or file memory of this process) are
/// resident: the first such page's address.
pub fn first_resident(addr: u64, len: u64) -> io::Result<Option<u64>> {
    const STEP: u64 = 1 << 30;
    let mut done = 0;
    let mut vec = Vec::new();
    while done < len {
        let n = (len - done).min(STEP);
        vec.resize((n / PAGE) as usize, 0u8);
        // SAFETY: mincore writes one byte per page of the range into vec, which is sized for it.
        cvt(unsafe {
            libc::mincore(
                (addr + done) as *mut libc::c_void,
                n as usize,
                vec.as_mut_ptr(),
            )
        })?;
        if let Some(i) = vec.iter().position(|b| b & 1 != 0) {
            return Ok(Some(addr + done + i as u64 * PAGE));
        }
        done += n;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }
}
