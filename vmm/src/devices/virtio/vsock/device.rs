//! The virtio-vsock device and its multiplexer of connections onto host Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::{Connection, State};
use super::packet::{self, Header, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
use crate::component_state::Persist;
use crate::devices::config::VsockConfig;
use crate::devices::virtio::chain;
use crate::devices::virtio::{
    drain_queue, VirtioCommon, VirtioDevice, COMMON_FEATURES, TYPE_VSOCK,
};
use crate::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Connections (established or being set up, host clients waiting for CONNECT included).
pub const MAX_CONNECTIONS: usize = 1024;
/// Queued RSTs for unknown connections beyond this are dropped.
const MAX_CONTROL_PACKETS: usize = 1024;
/// Host ports we hand out for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

// Event data tags.
const EV_QUEUE_BASE: u32 = 0; // + queue index
const EV_CONTROL: u32 = 3;
const EV_LISTENER: u32 = 4;
const EV_STREAM: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (use 3 or more)")]
    BadCid(u64),
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What a snapshot keeps: connections are not saved (restore resets them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<(u32, u32), Connection>,
    by_fd: HashMap<RawFd, (u32, u32)>,
    /// Host clients that have not finished their CONNECT line.
    pending_host: HashMap<RawFd, UnixStream>,
    /// Connections with something for the guest.
    rxq: VecDeque<(u32, u32)>,
    /// Packets that belong to no connection (RSTs).
    ctrl: VecDeque<Header>,
    next_local_port: u32,
    max_connections: usize,
}

pub struct Vsock {
    muxer: Muxer,
    common: VirtioCommon,
    control_evt: EventFd,
    transport_reset_requested: bool,
    kill_requested: bool,
    event_pending: bool,
    config: [u8; 8],
}

/// Binds the host socket, replacing a stale socket file but nothing else.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true).map_err(|source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(l)
}

/// Connects to a Unix socket without ever blocking (a full backlog is a refusal).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(ErrorKind::InvalidInput.into());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn stream_events(s: &UnixStream) -> Events {
    Events::with_data(
        s,
        EV_STREAM,
        EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
    )
}

impl Muxer {
    fn key_of(hdr: &Header) -> (u32, u32) {
        (hdr.dst_port, hdr.src_port)
    }

    fn total(&self) -> usize {
        self.conns.len() + self.pending_host.len()
    }

    fn queue_rx(&mut self, key: (u32, u32)) {
        if !self.rxq.contains(&key) {
            self.rxq.push_back(key);
        }
    }

    fn rst_to_guest(&mut self, hdr: &Header) {
        if self.ctrl.len() >= MAX_CONTROL_PACKETS {
            return;
        }
        self.ctrl.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    fn remove_conn(&mut self, key: (u32, u32), ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = ops.remove(stream_events(&c.stream));
            self.by_fd.remove(&fd);
        }
        self.rxq.retain(|k| *k != key);
    }

    fn kill_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k, ops);
        }
        self.rxq.clear();
        self.ctrl.clear();
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    /// A packet from the guest.
    fn handle_tx(&mut self, mem: &GuestMemory, pkt: &packet::TxPacket, ops: &mut EventOps) {
        let hdr = &pkt.hdr;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.rst_to_guest(hdr);
            }
            return;
        }
        let key = Self::key_of(hdr);
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == OP_REQUEST {
                self.guest_connect(hdr, ops);
            } else if hdr.op != OP_RST {
                self.rst_to_guest(hdr);
            }
            return;
        };
        // A second REQUEST for a live connection is a protocol error too.
        if hdr.op == OP_REQUEST || conn.handle_tx(mem, hdr, &pkt.payload).is_err() {
            conn.reset();
        }
        if conn.is_dead() {
            self.remove_conn(key, ops);
        } else if conn.wants_rx() {
            self.queue_rx(key);
        }
    }

    /// The guest connects to host port `hdr.dst_port`: try `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header, ops: &mut EventOps) {
        if self.total() >= self.max_connections {
            self.rst_to_guest(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", { hdr.dst_port }));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                self.rst_to_guest(hdr);
                return;
            }
        };
        if ops.add(stream_events(&stream)).is_err() {
            self.rst_to_guest(hdr);
            return;
        }
        let key = Self::key_of(hdr);
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns
            .insert(key, Connection::guest_initiated(stream, hdr));
        self.queue_rx(key);
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.total() >= self.max_connections || s.set_nonblocking(true).is_err() {
                        continue; // dropped: the client sees EOF
                    }
                    if ops.add(stream_events(&s)).is_ok() {
                        self.pending_host.insert(s.as_raw_fd(), s);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` (without consuming what follows it).
    fn read_connect(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(s) = self.pending_host.get(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        // SAFETY: recv writes at most buf.len() bytes into our buffer.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let drop_it = |m: &mut Self, ops: &mut EventOps| {
            if let Some(s) = m.pending_host.remove(&fd) {
                let _ = ops.remove(stream_events(&s));
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() != ErrorKind::WouldBlock {
                drop_it(self, ops);
            }
            return;
        }
        let n = n as usize;
        let Some(eol) = buf[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == buf.len() {
                drop_it(self, ops); // EOF, or a line too long to be a CONNECT
            }
            return;
        };
        let port = std::str::from_utf8(&buf[..eol])
            .ok()
            .map(|l| l.trim_end_matches('\r'))
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let mut line = vec![0u8; eol + 1];
        use std::io::Read;
        let consumed = (&*s).read_exact(&mut line).is_ok();
        let Some(port) = port.filter(|_| consumed) else {
            drop_it(self, ops);
            return;
        };
        let Some(stream) = self.pending_host.remove(&fd) else {
            return;
        };
        let local = self.alloc_local_port();
        let mut conn = Connection::host_initiated(stream, self.guest_cid, local, port);
        // Data may already follow the line; the edge for it has been consumed.
        conn.host_readable = true;
        self.by_fd.insert(fd, (local, port));
        self.conns.insert((local, port), conn);
        self.queue_rx((local, port));
    }

    fn stream_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        if self.pending_host.contains_key(&fd) {
            self.read_connect(fd, ops);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.host_readable = true;
        }
        if set.contains(EventSet::OUT) && conn.flush_to_host().is_err() {
            conn.reset();
        }
        if conn.state == State::LocalInit && set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The host client left before the guest answered.
            conn.reset();
        }
        if conn.is_dead() {
            self.remove_conn(key, ops);
        } else if conn.wants_rx() {
            self.queue_rx(key);
        }
    }

    /// Fills RX buffers with whatever is waiting for the guest; returns whether any was used.
    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemory, ops: &mut EventOps) -> bool {
        let mut used_any = false;
        let mut rechecked = false;
        while !self.ctrl.is_empty() || !self.rxq.is_empty() {
            let Some(c) = q.pop_descriptor_chain(mem) else {
                // Out of buffers: ask for a kick when the guest adds some, and look once more in
                // case it did meanwhile (only once: a bogus avail index must not spin us).
                if !rechecked && matches!(q.enable_notification(mem), Ok(true)) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            let head = c.head_index();
            let checked = chain::collect(c, mem, usize::from(QUEUE_SIZE))
                .ok()
                .and_then(|c| packet::rx_capacity(&c).ok().map(|cap| (c, cap)));
            let Some((c, cap)) = checked else {
                let _ = q.add_used(mem, head, 0);
                used_any = true;
                continue;
            };
            let mut written = None;
            if let Some(hdr) = self.ctrl.pop_front() {
                if packet::write_rx_header(&c, mem, &hdr).is_ok() {
                    written = Some(0);
                }
            } else {
                let payload = packet::rx_payload_bufs(&c);
                while let Some(key) = self.rxq.pop_front() {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    let hdr = conn.next_rx(mem, &payload, cap);
                    let (dead, more) = (conn.is_dead(), conn.wants_rx());
                    if dead {
                        self.remove_conn(key, ops);
                    } else if more {
                        self.rxq.push_back(key);
                    }
                    if let Some(hdr) = hdr {
                        if packet::write_rx_header(&c, mem, &hdr).is_ok() {
                            written = Some(hdr.len);
                        }
                        break;
                    }
                }
            }
            match written {
                Some(len) => {
                    let _ = q.add_used(mem, head, packet::HDR_LEN as u32 + len);
                    used_any = true;
                }
                None => {
                    q.go_to_previous_position();
                    break;
                }
            }
        }
        used_any
    }
}

impl Vsock {
    /// Binds `uds_path`; a path that exists and is not a socket is an error here, at start-up.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listener = bind(uds_path)?;
        Ok(Self {
            muxer: Muxer {
                guest_cid,
                uds_path: uds_path.to_path_buf(),
                listener,
                conns: HashMap::new(),
                by_fd: HashMap::new(),
                pending_host: HashMap::new(),
                rxq: VecDeque::new(),
                ctrl: VecDeque::new(),
                next_local_port: FIRST_LOCAL_PORT,
                max_connections: MAX_CONNECTIONS,
            },
            common: VirtioCommon::new(COMMON_FEATURES, 3).map_err(VsockError::EventFd)?,
            control_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            transport_reset_requested: false,
            kill_requested: false,
            event_pending: false,
            config: guest_cid.to_le_bytes(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid
    }

    /// Number of live connections (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.muxer.conns.len()
    }

    /// Drops every connection and tells the guest with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (its
    /// sockets are reset, listeners stay). For snapshot restore. Takes effect on the event loop.
    pub fn transport_reset(&mut self) {
        self.transport_reset_requested = true;
        let _ = self.control_evt.write(1);
    }

    fn process_control(&mut self, ops: &mut EventOps) {
        if self.kill_requested || self.transport_reset_requested {
            self.kill_requested = false;
            self.muxer.kill_all(ops);
        }
        if self.transport_reset_requested {
            self.transport_reset_requested = false;
            self.event_pending = true;
        }
    }

    fn process_tx(&mut self, ops: &mut EventOps) -> bool {
        let Some(a) = self.common.active.as_mut() else {
            return false;
        };
        let mem = &a.mem;
        let muxer = &mut self.muxer;
        let drained = drain_queue(&mut a.queues[TXQ], mem, |c| {
            let Ok(c) = chain::collect(c, mem, usize::from(QUEUE_SIZE)) else {
                return Some(0);
            };
            match packet::parse_tx(&c, mem) {
                Ok(pkt) => muxer.handle_tx(mem, &pkt, ops),
                Err((Some(hdr), _)) => {
                    // A bad packet on a connection resets it.
                    let key = Muxer::key_of(&hdr);
                    if let Some(conn) = muxer.conns.get_mut(&key) {
                        conn.reset();
                        muxer.queue_rx(key);
                    } else if hdr.op != OP_RST && hdr.src_cid == muxer.guest_cid {
                        muxer.rst_to_guest(&hdr);
                    }
                }
                Err((None, _)) => {}
            }
            Some(0)
        });
        if drained.notify {
            a.interrupt.signal_used_queue();
        }
        drained.notify
    }

    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(a) = self.common.active.as_mut() else {
            return;
        };
        if self.muxer.fill_rx(&mut a.queues[RXQ], &a.mem, ops)
            && a.queues[RXQ].needs_notification(&a.mem).unwrap_or(true)
        {
            a.interrupt.signal_used_queue();
        }
    }

    fn process_evq(&mut self) {
        if !self.event_pending {
            return;
        }
        let Some(a) = self.common.active.as_mut() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queues[EVQ];
        while let Some(c) = q.pop_descriptor_chain(mem) {
            let head = c.head_index();
            let len = match chain::collect(c, mem, usize::from(QUEUE_SIZE)) {
                Ok(c) if c.readable.is_empty() && c.writable_len() >= 4 => {
                    let at = c.writable[0].addr;
                    if c.writable[0].len >= 4
                        && mem
                            .write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, at)
                            .is_ok()
                    {
                        4
                    } else {
                        0
                    }
                }
                _ => 0,
            };
            let _ = q.add_used(mem, head, len);
            if len == 4 {
                self.event_pending = false;
                break;
            }
        }
        if q.needs_notification(mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }

    /// Runs everything that may be pending (after an activation, a reset, or in tests).
    fn process_all(&mut self, ops: &mut EventOps) {
        self.process_control(ops);
        self.process_tx(ops);
        self.process_evq();
        self.process_rx(ops);
    }
}

/// Constructor argument: the vsock as configured now. The guest keeps the CID it was saved with
/// (`config.guest_cid` is for a new device); `config.uds_path` may be a fork's new one.
impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs<'a> = &'a VsockConfig;
    type Error = VsockError;

    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            guest_cid: self.muxer.guest_cid,
        })
    }

    fn restore(config: &VsockConfig, state: &VsockState) -> Result<Self, VsockError> {
        let mut dev = Self::new(state.guest_cid, &config.uds_path)?;
        // Packets of connections from before the snapshot may still sit in the guest's rings,
        // and the guest answers them with RST: new host ports must not reuse those numbers.
        let mut r = [0u8; 4];
        // SAFETY: getrandom writes at most the buffer's length.
        let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        let offset = if n == 4 {
            u32::from_ne_bytes(r) % (1 << 29)
        } else {
            1 << 28
        };
        dev.muxer.next_local_port = FIRST_LOCAL_PORT + offset;
        Ok(dev)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn config_space(&self) -> &[u8] {
        &self.config
    }
    fn common(&self) -> &VirtioCommon {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
    /// Everything pending (host data, a transport reset) waits on the loop's next turn.
    fn activated(&mut self) {
        let _ = self.control_evt.write(1);
    }
    fn reset(&mut self) {
        self.common.reset();
        self.event_pending = false;
        self.kill_requested = true;
        let _ = self.control_evt.write(1);
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |e: Events, what: &str| {
            if let Err(e) = ops.add(e) {
                tracing::error!("virtio-vsock: cannot watch {what}: {e:?}");
            }
        };
        for (i, evt) in self.common.queue_evts.iter().enumerate() {
            add(
                Events::with_data(evt, EV_QUEUE_BASE + i as u32, EventSet::IN),
                "a queue",
            );
        }
        add(
            Events::with_data(&self.control_evt, EV_CONTROL, EventSet::IN),
            "its control eventfd",
        );
        add(
            Events::with_data(&self.muxer.listener, EV_LISTENER, EventSet::IN),
            "its host socket",
        );
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            d if d < EV_CONTROL => {
                let _ = self.common.queue_evts[d as usize].read();
                if d as usize == TXQ {
                    self.process_tx(ops);
                } else if d as usize == EVQ {
                    self.process_evq();
                }
            }
            EV_CONTROL => {
                let _ = self.control_evt.read();
                self.process_all(ops);
            }
            EV_LISTENER => self.muxer.accept(ops),
            EV_STREAM => self
                .muxer
                .stream_event(events.fd(), events.event_set(), ops),
            _ => {}
        }
        self.process_rx(ops);
    }
}

#[cfg(test)]
impl Vsock {
    pub(crate) fn set_max_connections(&mut self, n: usize) {
        self.muxer.max_connections = n;
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.muxer.conns.values().map(|c| c.buffered()).sum()
    }
}
