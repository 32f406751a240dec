//! What a VMM calls to have its guest memory served lazily by a page server.
//!
//! Before any vCPU runs (and before anything reads or writes guest memory):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mem: vm_memory::GuestMemoryMmap = unimplemented!();
//! use snapshot::pageserver::{Client, ClientOptions};
//! // `mem`: fresh anonymous guest RAM (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE), never touched.
//! let client = Client::connect_guest_memory(
//!     std::path::Path::new("/run/microagent/snap.sock"),
//!     &mem,
//!     &ClientOptions::labelled("ws-1"),
//! )?;
//! client.watchdog().on_gone(|gone| {
//!     eprintln!("error: {gone}");
//!     // Exit the whole process: vCPU threads blocked on a fault cannot be joined.
//!     std::process::exit(70);
//! });
//! // ... register memory with KVM, restore vCPU state, start vCPUs ...
//! // At the end, once every thread that touches guest memory has stopped:
//! client.finish()?;
//! # Ok(()) }
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lock;
use super::protocol::{
    Accept, Hello, Layout, Message, ProtocolError, RefuseCode, SessionStats, MAX_FRAME,
};
use super::sys::{self, EventFd, Seqpacket, PAGE};

/// userfaultfd features: what the kernel supports and what this client enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub supported: u64,
    pub enabled: u64,
}

impl Features {
    /// Names of the bits in `bits`.
    pub fn names(bits: u64) -> Vec<&'static str> {
        sys::FEATURE_NAMES
            .iter()
            .filter(|(b, _)| bits & b != 0)
            .map(|(_, n)| *n)
            .collect()
    }
    pub fn remove_events(&self) -> bool {
        self.enabled & sys::FEATURE_EVENT_REMOVE != 0
    }
    pub fn unmap_events(&self) -> bool {
        self.enabled & sys::FEATURE_EVENT_UNMAP != 0
    }
}

/// The userfaultfd features this kernel supports (UFFDIO_API on a throwaway descriptor).
pub fn probe() -> Result<u64, ClientError> {
    let fd = sys::new_uffd().map_err(ClientError::Unavailable)?;
    sys::api(fd.as_fd(), 0).map_err(ClientError::Api)
}

/// A new userfaultfd with `wanted` features, those the kernel lacks left out.
pub fn create_uffd(wanted: u64) -> Result<(OwnedFd, Features), ClientError> {
    let supported = probe()?;
    let enabled = wanted & supported;
    let fd = sys::new_uffd().map_err(ClientError::Unavailable)?;
    sys::api(fd.as_fd(), enabled).map_err(ClientError::Api)?;
    Ok((fd, Features { supported, enabled }))
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shown in the server's statistics (e.g. the workspace name). At most 128 bytes.
    pub label: String,
    /// Ask for remove events (MADV_DONTNEED / MADV_REMOVE, e.g. a balloon), so the server
    /// serves those pages again (as zeros by default) in chunks. Off, such pages are still served
    /// correctly, one fault at a time. While enabled, an madvise on guest memory waits for the
    /// server to read the event.
    pub remove_events: bool,
    /// Ask for unmap events (munmap of guest memory). Off by default: with it, munmap of guest
    /// memory waits for the server, and hangs if the server is gone while this client still
    /// holds its userfaultfd.
    pub unmap_events: bool,
    /// How long to wait for the server's answer to the handshake.
    pub reply_timeout: Duration,
    /// Refuse guest memory in which any page is already present: the server would never
    /// serve it, so the guest would see whatever is there instead of the snapshot.
    pub require_unpopulated: bool,
    /// Also report a server that is alive but no longer answers: every `heartbeat` the
    /// watchdog asks for statistics, and fires if no answer came within the next `heartbeat`.
    /// Off by default: a loaded host can stall a healthy server, and a false alarm stops the VM.
    pub heartbeat: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            label: String::new(),
            remove_events: true,
            unmap_events: false,
            reply_timeout: Duration::from_secs(10),
            require_unpopulated: true,
            heartbeat: None,
        }
    }
}

impl ClientOptions {
    pub fn labelled(label: &str) -> Self {
        Self {
            label: label.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "userfaultfd is not available: {0} (it needs root or CAP_SYS_PTRACE, \
         vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd)"
    )]
    Unavailable(#[source] std::io::Error),
    #[error("UFFDIO_API failed: {0}")]
    Api(#[source] std::io::Error),
    #[error("the memory layout is not valid: {0}")]
    Layout(#[source] ProtocolError),
    #[error(
        "guest memory at {addr:#x} is already populated: lazy restore needs fresh, untouched \
         anonymous memory (nothing may read or write it before registration)"
    )]
    Populated { addr: u64 },
    #[error("cannot check guest memory residency: {0}")]
    Mincore(#[source] std::io::Error),
    #[error("cannot register guest memory {start:#x}+{len:#x} with userfaultfd: {source}")]
    Register {
        start: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error(
        "userfaultfd on guest memory {start:#x}+{len:#x} lacks copy/zeropage/wake \
         (is it anonymous private memory?)"
    )]
    MissingIoctls { start: u64, len: u64 },
    #[error("cannot connect to the page server at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the page server refused this VM ({code}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("the page server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("page server protocol error: {0}")]
    Protocol(String),
    #[error("page server I/O error: {0}")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Gone(#[from] ServerGone),
}

/// Why the watchdog fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoneReason {
    /// The server closed the connection (it stopped, crashed or was killed).
    Closed,
    /// The server said it cannot serve this VM any more.
    Fatal(String),
    /// The server sent something this client cannot understand.
    Protocol(String),
    /// Reading the socket failed.
    Io(String),
    /// The server did not answer a heartbeat within this long.
    Unresponsive(Duration),
}

impl std::fmt::Display for GoneReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GoneReason::Closed => f.write_str("connection closed"),
            GoneReason::Fatal(r) => write!(f, "server error: {r}"),
            GoneReason::Protocol(r) => write!(f, "protocol error: {r}"),
            GoneReason::Io(r) => write!(f, "socket error: {r}"),
            GoneReason::Unresponsive(d) => {
                write!(
                    f,
                    "no answer to a heartbeat within {:.1} s",
                    d.as_secs_f64()
                )
            }
        }
    }
}

/// The page server serving this VM is gone: memory not yet loaded can never arrive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the userfaultfd page server at {} went away {:.1} s into this VM's restore ({reason}): \
     guest memory not yet loaded can never arrive, so the VM must stop",
    socket.display(),
    after.as_secs_f64()
)]
pub struct ServerGone {
    pub socket: PathBuf,
    pub reason: GoneReason,
    /// Time from the accepted handshake to the loss.
    pub after: Duration,
}

type Callback = Box<dyn FnOnce(&ServerGone) + Send>;

struct WatchState {
    gone: Option<ServerGone>,
    callbacks: Vec<Callback>,
}

struct WatchInner {
    state: Mutex<WatchState>,
    cv: Condvar,
    fd: EventFd,
}

/// Reports the server going away. Cloneable; every clone sees the same event.
#[derive(Clone)]
pub struct Watchdog(Arc<WatchInner>);

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("gone", &self.gone())
            .finish()
    }
}

impl Watchdog {
    fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(WatchInner {
            state: Mutex::new(WatchState {
                gone: None,
                callbacks: Vec::new(),
            }),
            cv: Condvar::new(),
            fd: EventFd::new()?,
        })))
    }

    /// The loss, if the server is gone.
    pub fn gone(&self) -> Option<ServerGone> {
        lock(&self.0.state).gone.clone()
    }

    /// Waits until the server is gone or `timeout` passes (`None`: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ServerGone> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = lock(&self.0.state);
        loop {
            if let Some(x) = &g.gone {
                return Some(x.clone());
            }
            match deadline {
                None => g = self.0.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    g = self
                        .0
                        .cv
                        .wait_timeout(g, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Calls `f` once when the server goes away (on the watchdog thread), or right now if it
    /// already has. Keep it short, or make it end the process.
    pub fn on_gone(&self, f: impl FnOnce(&ServerGone) + Send + 'static) {
        let mut g = lock(&self.0.state);
        if let Some(x) = g.gone.clone() {
            drop(g);
            f(&x);
        } else {
            g.callbacks.push(Box::new(f));
        }
    }

    /// An eventfd that becomes (and stays) readable when the server is gone, for an epoll loop.
    pub fn eventfd(&self) -> BorrowedFd<'_> {
        self.0.fd.fd()
    }

    fn fire(&self, gone: ServerGone) {
        let callbacks = {
            let mut g = lock(&self.0.state);
            if g.gone.is_some() {
                return;
            }
            g.gone = Some(gone.clone());
            std::mem::take(&mut g.callbacks)
        };
        self.0.fd.signal();
        self.0.cv.notify_all();
        for c in callbacks {
            c(&gone);
        }
    }
}

/// A VMM's connection to its page server. Keep it for the life of the VM.
///
/// Dropping it without [`Client::finish`] keeps the userfaultfd open and the memory registered
/// until the process exits, so no pending fault is ever answered with zeros; only the process
/// exiting ends it.
pub struct Client {
    uffd: Option<OwnedFd>,
    sock: Arc<Seqpacket>,
    layout: Layout,
    features: Features,
    accept: Accept,
    watchdog: Watchdog,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    stats_rx: Mutex<Receiver<SessionStats>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("layout", &self.layout)
            .field("features", &self.features)
            .field("accept", &self.accept)
            .finish()
    }
}

impl Client {
    /// [`Client::connect`] with the layout of `mem` restored from a memory file written by
    /// [`crate::memfile::write_memory`] (its regions back to back).
    pub fn connect_guest_memory<M: vm_memory::GuestMemoryBackend>(
        socket: &Path,
        mem: &M,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        Self::connect(socket, &Layout::from_guest_memory(mem), opts)
    }

    /// Creates a userfaultfd (probing the kernel's features), registers every region of
    /// `layout` in MISSING mode, hands the descriptor and layout to the server at `socket` and
    /// waits for it to accept. From then on every first touch of guest memory is served by the
    /// server, and the watchdog reports the server going away.
    pub fn connect(
        socket: &Path,
        layout: &Layout,
        opts: &ClientOptions,
    ) -> Result<Self, ClientError> {
        layout.validate(None).map_err(ClientError::Layout)?;
        if opts.require_unpopulated {
            for r in &layout.regions {
                if let Some(addr) =
                    sys::first_resident(r.host_addr, r.len).map_err(ClientError::Mincore)?
                {
                    return Err(ClientError::Populated { addr });
                }
            }
        }
        let mut wanted = 0;
        if opts.remove_events {
            wanted |= sys::FEATURE_EVENT_REMOVE;
        }
        if opts.unmap_events {
            wanted |= sys::FEATURE_EVENT_UNMAP;
        }
        let (uffd, features) = create_uffd(wanted)?;
        let registered = Registered::new(&uffd, layout)?;
        let sock = Seqpacket::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let hello = Message::Hello(Hello {
            page_size: PAGE as u32,
            features: features.enabled,
            label: opts.label.clone(),
            layout: layout.clone(),
        });
        sock.send(&hello.encode(), &[uffd.as_fd()])
            .map_err(ClientError::Io)?;
        let ready = sys::poll_in(
            &[sock.fd()],
            opts.reply_timeout.as_millis().min(i32::MAX as u128) as i32,
        )
        .map_err(ClientError::Io)?;
        if !ready[0].readable && !ready[0].hangup {
            return Err(ClientError::Timeout(opts.reply_timeout));
        }
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let got = sock
            .recv(&mut buf)
            .map_err(ClientError::Io)?
            .ok_or_else(|| ClientError::Protocol("the server closed the connection".into()))?;
        if got.truncated {
            return Err(ClientError::Protocol("oversized reply".into()));
        }
        let accept = match Message::decode(&buf[..got.len]) {
            Ok(Message::Accept(a)) => a,
            Ok(Message::Refuse { code, reason }) => {
                return Err(ClientError::Refused { code, reason })
            }
            Ok(m) => return Err(ClientError::Protocol(format!("unexpected reply {m:?}"))),
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        registered.keep();

        let sock = Arc::new(sock);
        let watchdog = Watchdog::new().map_err(ClientError::Io)?;
        let stop = Arc::new(EventFd::new().map_err(ClientError::Io)?);
        let (tx, rx) = channel();
        let thread = {
            let (sock, watchdog, stop) = (sock.clone(), watchdog.clone(), stop.clone());
            let path = socket.to_path_buf();
            let started = Instant::now();
            let heartbeat = opts.heartbeat.filter(|d| !d.is_zero());
            std::thread::Builder::new()
                .name("pageserver-watchdog".into())
                .spawn(move || watch(&sock, &stop, &watchdog, tx, path, started, heartbeat))
                .map_err(ClientError::Io)?
        };
        Ok(Self {
            uffd: Some(uffd),
            sock,
            layout: layout.clone(),
            features,
            accept,
            watchdog,
            stop,
            thread: Some(thread),
            stats_rx: Mutex::new(rx),
        })
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// What the server said when it accepted this VM (client id, chunk size, prefetch).
    pub fn session(&self) -> Accept {
        self.accept
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn watchdog(&self) -> Watchdog {
        self.watchdog.clone()
    }

    /// This VM's counters, from the server.
    pub fn stats(&self, timeout: Duration) -> Result<SessionStats, ClientError> {
        if let Some(g) = self.watchdog.gone() {
            return Err(g.into());
        }
        let rx = lock(&self.stats_rx);
        while rx.try_recv().is_ok() {}
        self.sock
            .send(&Message::StatsRequest.encode(), &[])
            .map_err(ClientError::Io)?;
        match rx.recv_timeout(timeout) {
            Ok(s) => Ok(s),
            Err(RecvTimeoutError::Timeout) => Err(ClientError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(match self.watchdog.gone() {
                Some(g) => g.into(),
                None => ClientError::Protocol("the watchdog stopped".into()),
            }),
        }
    }

    /// Ends the session cleanly: unregisters guest memory, tells the server, closes both
    /// descriptors. Call only once no thread touches guest memory any more (vCPUs and devices
    /// stopped). If the server is already gone the registration is left in place and the
    /// userfaultfd open (so nothing is ever zero-filled) and the loss is returned.
    pub fn finish(mut self) -> Result<(), ClientError> {
        self.stop_watchdog();
        if let Some(g) = self.watchdog.gone() {
            return Err(g.into());
        }
        if let Some(uffd) = self.uffd.take() {
            for r in &self.layout.regions {
                let _ = sys::unregister(uffd.as_fd(), r.host_addr, r.len);
            }
            let _ = self.sock.send(&Message::Bye.encode(), &[]);
            self.sock.shutdown();
            drop(uffd);
        }
        Ok(())
    }

    fn stop_watchdog(&mut self) {
        self.stop.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop_watchdog();
        if let Some(uffd) = self.uffd.take() {
            // Never unregister or close here: a thread may still be waiting on a fault, and
            // either would let the kernel answer it with a zero page.
            std::mem::forget(uffd);
        }
        self.sock.shutdown();
    }
}

/// Registrations undone on an error before the server accepted.
struct Registered<'a> {
    uffd: &'a OwnedFd,
    done: Vec<(u64, u64)>,
}

impl<'a> Registered<'a> {
    fn new(uffd: &'a OwnedFd, layout: &Layout) -> Result<Self, ClientError> {
        let mut me = Self {
            uffd,
            done: Vec::new(),
        };
        for r in &layout.regions {
            let ioctls =
                sys::register(uffd.as_fd(), r.host_addr, r.len, sys::REGISTER_MODE_MISSING)
                    .map_err(|source| ClientError::Register {
                        start: r.host_addr,
                        len: r.len,
                        source,
                    })?;
            me.done.push((r.host_addr, r.len));
            if ioctls & sys::NEEDED_RANGE_IOCTLS != sys::NEEDED_RANGE_IOCTLS {
                return Err(ClientError::MissingIoctls {
                    start: r.host_addr,
                    len: r.len,
                });
            }
        }
        Ok(me)
    }

    fn keep(mut self) {
        self.done.clear();
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for (s, l) in &self.done {
            let _ = sys::unregister(self.uffd.as_fd(), *s, *l);
        }
    }
}

fn watch(
    sock: &Seqpacket,
    stop: &EventFd,
    wd: &Watchdog,
    stats: Sender<SessionStats>,
    socket: PathBuf,
    started: Instant,
    heartbeat: Option<Duration>,
) {
    let gone = |reason| ServerGone {
        socket: socket.clone(),
        reason,
        after: started.elapsed(),
    };
    let mut buf = vec![0u8; MAX_FRAME + 1];
    // Heartbeat: when the next request goes out, and when the one outstanding was sent.
    let mut next_ping = heartbeat.map(|h| Instant::now() + h);
    let mut outstanding: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let (Some(h), Some(sent)) = (heartbeat, outstanding) {
            if now.duration_since(sent) >= h {
                return wd.fire(gone(GoneReason::Unresponsive(h)));
            }
        }
        if let (Some(h), Some(at)) = (heartbeat, next_ping) {
            if now >= at && outstanding.is_none() {
                if sock.send(&Message::StatsRequest.encode(), &[]).is_ok() {
                    outstanding = Some(now);
                }
                next_ping = Some(now + h);
            }
        }
        let wake = match (heartbeat, outstanding, next_ping) {
            (Some(h), Some(sent), _) => Some(sent + h),
            (Some(_), None, Some(at)) => Some(at),
            _ => None,
        };
        let timeout = wake.map_or(-1, |w| {
            w.saturating_duration_since(now)
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32
        });
        let ready = match sys::poll_in(&[sock.fd(), stop.fd()], timeout) {
            Ok(r) => r,
            Err(e) => return wd.fire(gone(GoneReason::Io(e.to_string()))),
        };
        if ready[1].readable {
            return;
        }
        if !ready[0].readable && !ready[0].hangup {
            continue;
        }
        let got = match sock.recv(&mut buf) {
            Ok(Some(g)) => g,
            Ok(None) => return wd.fire(gone(GoneReason::Closed)),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                return wd.fire(gone(GoneReason::Closed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return wd.fire(gone(GoneReason::Io(e.to_string()))),
        };
        if got.truncated {
            return wd.fire(gone(GoneReason::Protocol("oversized message".into())));
        }
        match Message::decode(&buf[..got.len]) {
            Ok(Message::Stats(s)) => {
                outstanding = None;
                let _ = stats.send(s);
            }
            Ok(Message::Fatal(r)) => return wd.fire(gone(GoneReason::Fatal(r))),
            Ok(m) => {
                return wd.fire(gone(GoneReason::Protocol(format!(
                    "unexpected message {m:?}"
                ))))
            }
            Err(e) => return wd.fire(gone(GoneReason::Protocol(e.to_string()))),
        }
    }
}
