//! Where a virtio-net device's frames go: a `passt` process (qemu stream protocol over a Unix
//! socket pair: 4-byte big-endian length, then the frame) or a tap interface.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Largest Ethernet frame we move (64 KiB IP packet plus link header).
pub const MAX_FRAME: usize = 65_550;
/// Output bytes we hold for a passt that does not read fast enough; frames beyond are dropped
/// (like a full NIC ring).
const MAX_PENDING_OUT: usize = 1 << 20;
/// Input bytes we read ahead from passt.
const READ_CHUNK: usize = 128 * 1024;

/// How long a refused or missing passt socket is retried before the connection fails.
const DIAL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("passt is not installed (Debian package `passt`): no `passt` in PATH")]
    PasstNotInPath,
    #[error("passt binary {0} does not exist")]
    PasstMissing(PathBuf),
    #[error("cannot start passt ({path}): {source}")]
    PasstSpawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("passt ({path}) exited at start-up: {status}")]
    PasstExited {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("cannot connect to passt at {path}: {source}")]
    PasstConnect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this passt back end cannot be reconnected")]
    PasstNotReconnectable,
    #[error("cannot create the socket pair for passt: {0}")]
    SocketPair(#[source] std::io::Error),
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    TapName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to tap {name}: {source}")]
    TunSetIff {
        name: String,
        source: std::io::Error,
    },
}

/// Finds `passt` in PATH.
pub fn find_passt() -> Result<PathBuf, BackendError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("passt"))
        .find(|p| p.is_file())
        .ok_or(BackendError::PasstNotInPath)
}

pub enum Backend {
    Passt(Passt),
    Tap(Tap),
}

impl Backend {
    pub fn fd(&self) -> RawFd {
        match self {
            Backend::Passt(p) => p.stream.as_raw_fd(),
            Backend::Tap(t) => t.file.as_raw_fd(),
        }
    }

    /// The next frame from the network into `buf`; `Ok(None)` when nothing is there now.
    pub fn recv(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
        match self {
            Backend::Passt(p) => p.recv(buf),
            Backend::Tap(t) => t.recv(buf),
        }
    }

    /// Sends a frame; `Ok(false)` when it was dropped because the back end is full.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        match self {
            Backend::Passt(p) => p.send(frame),
            Backend::Tap(t) => t.send(frame),
        }
    }

    /// Writes out anything held back (on EPOLLOUT).
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Backend::Passt(p) => p.flush(),
            Backend::Tap(_) => Ok(()),
        }
    }
}

/// passt, either a process of our own on a socket pair, or one started (and supervised) by
/// someone else, listening on a Unix socket we connect to: the way a jailed VMM reaches a passt
/// that must stay in the host's network namespace.
pub struct Passt {
    stream: UnixStream,
    child: Option<Child>,
    /// The listening socket, for a passt that is not ours: reconnected to when it restarts.
    path: Option<PathBuf>,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
}

impl Passt {
    /// Starts `binary` (or `passt` from PATH) with one end of a socket pair (`--fd`), in the
    /// foreground so it dies with us.
    pub fn spawn(binary: Option<&Path>, args: &[String]) -> Result<Self, BackendError> {
        let path = match binary {
            Some(p) if p.is_file() => p.to_path_buf(),
            Some(p) => return Err(BackendError::PasstMissing(p.to_path_buf())),
            None => find_passt()?,
        };
        let (ours, theirs) = UnixStream::pair().map_err(BackendError::SocketPair)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&path);
        cmd.args(["--foreground", "--quiet", "--fd", &fd.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Let the child keep its end of the pair across exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| BackendError::PasstSpawn {
            path: path.clone(),
            source,
        })?;
        drop(theirs);
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BackendError::PasstExited { path, status });
        }
        ours.set_nonblocking(true)
            .map_err(BackendError::SocketPair)?;
        Ok(Self {
            stream: ours,
            child: Some(child),
            path: None,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
        })
    }

    /// Connects to a passt listening on `path` (qemu stream protocol).
    pub fn connect(path: &Path) -> Result<Self, BackendError> {
        let stream = Self::dial(path)?;
        Ok(Self {
            stream,
            child: None,
            path: Some(path.to_path_buf()),
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
        })
    }

    fn dial(path: &Path) -> Result<UnixStream, BackendError> {
        let connect = |source| BackendError::PasstConnect {
            path: path.to_path_buf(),
            source,
        };
        // passt binds its socket before it listens (and its supervisor restarts a passt that
        // died): on a loaded host a VMM started right after can find the socket bound but not yet
        // accepting. Refused or missing is retried for a few seconds; anything else is final.
        let deadline = std::time::Instant::now() + DIAL_PATIENCE;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(connect(e)),
            }
        };
        stream.set_nonblocking(true).map_err(connect)?;
        Ok(stream)
    }

    /// For a passt we connect to: a fresh connection (after it restarted). Partial frames of
    /// the old one are dropped.
    pub fn reconnect(&mut self) -> Result<(), BackendError> {
        let Some(path) = self.path.clone() else {
            return Err(BackendError::PasstNotReconnectable);
        };
        self.stream = Self::dial(&path)?;
        self.rbuf.clear();
        self.rpos = 0;
        self.wbuf.clear();
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The passt process id, when it is ours (for diagnostics and tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn take_frame(&mut self, buf: &mut Vec<u8>) -> Option<usize> {
        let avail = &self.rbuf[self.rpos..];
        if avail.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if avail.len() < 4 + len {
            return None;
        }
        buf.clear();
        buf.extend_from_slice(&avail[4..4 + len]);
        self.rpos += 4 + len;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        Some(len)
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
        loop {
            if let Some(n) = self.take_frame(buf) {
                if n > MAX_FRAME {
                    continue; // too large for any guest buffer: drop
                }
                return Ok(Some(n));
            }
            // Compact, then read more.
            if self.rpos > 0 {
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
            }
            let start = self.rbuf.len();
            self.rbuf.resize(start + READ_CHUNK, 0);
            match self.stream.read(&mut self.rbuf[start..]) {
                Ok(0) => {
                    self.rbuf.truncate(start);
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                Ok(n) => self.rbuf.truncate(start + n),
                Err(e) => {
                    self.rbuf.truncate(start);
                    match e.kind() {
                        ErrorKind::WouldBlock => return Ok(None),
                        ErrorKind::Interrupted => {}
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        if self.wbuf.len() + 4 + frame.len() > MAX_PENDING_OUT {
            self.flush()?;
            if self.wbuf.len() + 4 + frame.len() > MAX_PENDING_OUT {
                return Ok(false);
            }
        }
        self.wbuf
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.wbuf.extend_from_slice(frame);
        self.flush()?;
        Ok(true)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        let r = loop {
            if done == self.wbuf.len() {
                break Ok(());
            }
            match self.stream.write(&self.wbuf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.wbuf.drain(..done);
        r
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tap interface (IFF_TAP | IFF_NO_PI: plain Ethernet frames, no offloads).
pub struct Tap {
    file: File,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl Tap {
    pub fn open(name: &str) -> Result<Self, BackendError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(BackendError::TapName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(BackendError::OpenTun)?;
        // struct ifreq: 16-byte name, then the flags (short) in a 24-byte union.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads (and may update) a 40-byte struct ifreq we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if r < 0 {
            return Err(BackendError::TunSetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn recv(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
        buf.resize(MAX_FRAME, 0);
        loop {
            match self.file.read(buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        match self.file.write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            // The interface is down or has no carrier: the frame is lost, as on a wire.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    fn temp_sock(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("passt-dial-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A Unix stream socket bound to `path` and not listening: what a VMM finds between
    /// passt's bind and its listen.
    fn bound_not_listening(path: &Path) -> OwnedFd {
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: just created, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: addr is a valid sockaddr_un of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        fd
    }

    #[test]
    fn a_socket_that_appears_late_is_dialed() {
        let path = temp_sock("late");
        let p = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
            l.accept().map(|_| ())
        });
        let started = Instant::now();
        Passt::connect(&path).expect("dial a socket made 300 ms later");
        assert!(started.elapsed() >= Duration::from_millis(300));
        server.join().unwrap().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_bound_before_it_listens_is_dialed() {
        let path = temp_sock("bound");
        let fd = bound_not_listening(&path);
        // Refused now: the case the retry is for.
        let refused = std::os::unix::net::UnixStream::connect(&path).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: listen on the socket this test bound.
            assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 4) }, 0);
            fd
        });
        Passt::connect(&path).expect("dial a socket that listens 300 ms after its bind");
        drop(server.join().unwrap());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_that_never_comes_is_an_error_after_the_patience() {
        let path = temp_sock("never");
        let started = Instant::now();
        let err = Passt::connect(&path)
            .err()
            .expect("no socket, no connection");
        assert!(matches!(err, BackendError::PasstConnect { .. }), "{err}");
        assert!(started.elapsed() >= DIAL_PATIENCE);
    }
}
