//! `mode=vsock`: a polling virtio-vsock driver at CPL3 (stream sockets only).
//!
//! * Listens on `vsock_port` (default 5000; `vsock_listen=0`: not at all) and echoes every byte
//!   of every connection back, several connections at once or in sequence, until the peer
//!   closes.
//! * `vsock_connect=<port>`: first connects to the host (CID 2) on that port, sends
//!   `hello from guest cid=<cid>\n`, prints the first line it gets back, and closes
//!   (SHUTDOWN, then the host's RST). Without a listener the guest then resets.
//! * Handles VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (sent after a snapshot restore): every
//!   connection is dropped, the listener stays, the CID is read again. RX packets that were
//!   already in the used ring when the event was handled were sent before the reset (the
//!   snapshot holds them) and are dropped without a reply: answering them with RST, as for
//!   any packet on an unknown connection, can kill a new connection, because the restored
//!   device hands out host ports from the same start again.
//!
//! Credit (virtio 1.x §5.10.6.3): each connection has a 256 KiB echo ring, advertised as
//! `buf_alloc`; `fwd_cnt` counts bytes taken out of it (echoed). We send at most the peer's
//! free credit, `buf_alloc - (tx_cnt - fwd_cnt)` from its latest header, and ask with
//! CREDIT_REQUEST when it is zero. Every packet we send carries our current credit; a peer's
//! CREDIT_REQUEST is answered with CREDIT_UPDATE. A peer that sends past our credit is reset.
//!
//! Buffers: RX and TX packets are one descriptor each (44-byte header + up to 64 KiB), with a
//! fixed descriptor per buffer; RX buffers are re-posted as soon as they are handled (data is
//! copied into the connection's ring), TX buffers return to a free list when used.

use core::fmt::Write as _;

use crate::cpu::{self, pause, rdtsc};
use crate::virtio::{self, Device, Queue, DESC_F_WRITE};
use crate::{alloc, fail, println};

const RXQ: u32 = 0;
const TXQ: u32 = 1;
const EVQ: u32 = 2;

const HOST_CID: u64 = 2;
const HDR: usize = 44;
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Bytes per packet buffer (header + payload, rounded up).
const PKT_STRIDE: u64 = 0x11000;
const RX_BUFS: u16 = 32;
const TX_BUFS: u16 = 32;
const EV_BUFS: u16 = 4;
const MAX_CONNS: usize = 8;
/// Echo buffer per connection, advertised as our buf_alloc.
const RING: u32 = 256 * 1024;
const MAX_PENDING_RST: usize = 16;
const FIRST_LOCAL_PORT: u32 = 49152;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

// What a connection still has to send (bits of `Conn::want`).
const W_RST: u32 = 1;
const W_REQUEST: u32 = 2;
const W_RESPONSE: u32 = 4;
const W_HELLO: u32 = 8;
const W_CREDIT_REQUEST: u32 = 16;
const W_CREDIT_UPDATE: u32 = 32;
const W_SHUTDOWN: u32 = 64;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

const _: () = assert!(core::mem::size_of::<Hdr>() == HDR);

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    /// Client: REQUEST sent, waiting for RESPONSE.
    Connecting,
    Open,
    /// The peer sent SHUTDOWN (echo: finish what it allows, then RST), or we did (client:
    /// waiting for the peer's RST).
    Closing,
}

#[derive(Clone, Copy)]
struct Conn {
    st: St,
    client: bool,
    local: u32,
    peer: u32,
    ring: u64,
    rd: u32,
    len: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    peer_shutdown: u32,
    want: u32,
    credit_requested: bool,
    rx_bytes: u64,
    tx_bytes: u64,
    /// TSC at the last state change (timeouts).
    since: u64,
    line: [u8; 120],
    line_len: usize,
}

impl Conn {
    const FREE: Conn = Conn {
        st: St::Free,
        client: false,
        local: 0,
        peer: 0,
        ring: 0,
        rd: 0,
        len: 0,
        fwd_cnt: 0,
        last_fwd_sent: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        peer_shutdown: 0,
        want: 0,
        credit_requested: false,
        rx_bytes: 0,
        tx_bytes: 0,
        since: 0,
        line: [0; 120],
        line_len: 0,
    };

    /// Bytes the peer can still take from us.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

struct Vsock {
    dev: Device,
    cid: u64,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    rx_base: u64,
    tx_base: u64,
    ev_base: u64,
    tx_free: [u16; TX_BUFS as usize],
    tx_nfree: usize,
    conns: [Conn; MAX_CONNS],
    rst: [(u32, u32); MAX_PENDING_RST],
    nrst: usize,
    listen: Option<u32>,
    next_local: u32,
    /// Set once the `vsock_connect` connection is over.
    client_done: bool,
    /// After a transport reset: RX entries before this used index were sent before the reset,
    /// for connections the host no longer has; they are dropped without a reply (an RST could
    /// hit a new connection that reuses the port pair).
    rx_stale_until: Option<u16>,
    stall: u64,
}

fn hdr_at(addr: u64) -> Hdr {
    unsafe { (addr as *const Hdr).read_volatile() }
}

impl Vsock {
    fn open() -> Vsock {
        let Some(mut dev) = virtio::find(virtio::TYPE_VSOCK, 0) else {
            fail(format_args!("mode=vsock: no virtio-vsock device"));
        };
        dev.negotiate(0);
        let rxq = dev.setup_queue(RXQ, 64);
        let txq = dev.setup_queue(TXQ, 64);
        let evq = dev.setup_queue(EVQ, 8);
        if rxq.size < RX_BUFS || txq.size < TX_BUFS || evq.size < EV_BUFS {
            fail(format_args!("vsock queues too small"));
        }
        let rx_base = alloc(PKT_STRIDE * RX_BUFS as u64, 4096);
        let tx_base = alloc(PKT_STRIDE * TX_BUFS as u64, 4096);
        let ev_base = alloc(8 * EV_BUFS as u64, 64);
        let mut conns = [Conn::FREE; MAX_CONNS];
        for c in conns.iter_mut() {
            c.ring = alloc(RING as u64, 4096);
        }
        let mut v = Vsock {
            dev,
            cid: 0,
            rxq,
            txq,
            evq,
            rx_base,
            tx_base,
            ev_base,
            tx_free: [0; TX_BUFS as usize],
            tx_nfree: TX_BUFS as usize,
            conns,
            rst: [(0, 0); MAX_PENDING_RST],
            nrst: 0,
            listen: None,
            next_local: FIRST_LOCAL_PORT,
            client_done: false,
            rx_stale_until: None,
            stall: virtio::ticks_ms(crate::run().cfg.rescue_ms),
        };
        for i in 0..TX_BUFS {
            v.tx_free[i as usize] = i;
        }
        // Buffers go in before DRIVER_OK: the device may send (e.g. a transport reset) at once.
        for i in 0..RX_BUFS {
            v.rxq.set_desc(i, rx_base + PKT_STRIDE * i as u64, (HDR as u32) + MAX_PAYLOAD, DESC_F_WRITE, 0);
            v.rxq.publish(i);
        }
        for i in 0..EV_BUFS {
            v.evq.set_desc(i, ev_base + 8 * i as u64, 8, DESC_F_WRITE, 0);
            v.evq.publish(i);
        }
        v.dev.driver_ok();
        v.cid = v.dev.config_u64(0);
        v.rxq.kick();
        v.evq.kick();
        v
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|c| c.st != St::Free && c.local == local && c.peer == peer)
    }

    fn tx_alloc(&mut self) -> Option<u16> {
        if self.tx_nfree == 0 {
            return None;
        }
        self.tx_nfree -= 1;
        Some(self.tx_free[self.tx_nfree])
    }

    /// Queues one packet; its payload is already at `buffer + HDR`.
    fn send_buf(&mut self, i: u16, h: Hdr) {
        let buf = self.tx_base + PKT_STRIDE * i as u64;
        unsafe { (buf as *mut Hdr).write_volatile(h) };
        self.txq.set_desc(i, buf, (HDR as u32) + h.len, 0, 0);
        self.txq.publish(i);
    }

    #[allow(clippy::too_many_arguments)]
    fn header(cid: u64, local: u32, peer: u32, op: u16, len: u32, flags: u32, fwd_cnt: u32) -> Hdr {
        Hdr {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: peer,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: RING,
            fwd_cnt,
        }
    }

    /// A control packet (no payload) on connection `ci`; false when no TX buffer is free.
    fn send_ctrl(&mut self, ci: usize, op: u16, flags: u32) -> bool {
        let Some(i) = self.tx_alloc() else { return false };
        let c = &mut self.conns[ci];
        c.last_fwd_sent = c.fwd_cnt;
        let h = Self::header(self.cid, c.local, c.peer, op, 0, flags, c.fwd_cnt);
        self.send_buf(i, h);
        true
    }

    fn queue_rst(&mut self, local: u32, peer: u32) {
        if self.nrst < MAX_PENDING_RST {
            self.rst[self.nrst] = (local, peer);
            self.nrst += 1;
        }
    }

    fn close(&mut self, ci: usize, why: &str) {
        let c = self.conns[ci];
        println!(
            "testguest: vsock closed port={} peer={} rx={} tx={} why={} kicks={} rescue_kicks={}",
            c.local,
            c.peer,
            c.rx_bytes,
            c.tx_bytes,
            why,
            virtio::KICKS.load(core::sync::atomic::Ordering::Relaxed),
            virtio::RESCUE_KICKS.load(core::sync::atomic::Ordering::Relaxed)
        );
        if c.client {
            self.client_done = true;
        }
        let ring = c.ring;
        self.conns[ci] = Conn { ring, ..Conn::FREE };
    }

    fn new_conn(&mut self, client: bool, local: u32, peer: u32) -> Option<usize> {
        let ci = self.conns.iter().position(|c| c.st == St::Free)?;
        let ring = self.conns[ci].ring;
        self.conns[ci] = Conn { ring, client, local, peer, since: rdtsc(), ..Conn::FREE };
        Some(ci)
    }

    // ------------------------------------------------------------ receive

    fn on_event(&mut self, id: u16, len: u32) {
        let ev = unsafe { ((self.ev_base + 8 * id as u64) as *const u32).read_volatile() };
        if len >= 4 && ev == EVENT_TRANSPORT_RESET {
            let mut dropped = 0;
            for ci in 0..MAX_CONNS {
                if self.conns[ci].st != St::Free {
                    dropped += 1;
                    self.close(ci, "transport_reset");
                }
            }
            self.nrst = 0;
            self.rx_stale_until = Some(self.rxq.used_idx());
            self.cid = self.dev.config_u64(0);
            println!("testguest: vsock transport reset dropped={} cid={}", dropped, self.cid);
        }
        self.evq.publish(id);
    }

    fn on_rx(&mut self, id: u16, used_len: u32) {
        let buf = self.rx_base + PKT_STRIDE * id as u64;
        if (used_len as usize) < HDR {
            return;
        }
        let h = hdr_at(buf);
        if h.src_cid != HOST_CID || h.dst_cid != self.cid {
            return;
        }
        let (local, peer, op) = (h.dst_port, h.src_port, h.op);
        if h.type_ != TYPE_STREAM {
            if op != OP_RST {
                self.queue_rst(local, peer);
            }
            return;
        }
        let mut ci = self.find(local, peer);
        if op == OP_REQUEST {
            if let Some(old) = ci {
                // The host reuses a port pair we still hold (it forgot the old one): drop it.
                self.close(old, "replaced");
                ci = None;
            }
        }
        let Some(ci) = ci else {
            match op {
                OP_REQUEST if self.listen == Some(local) => match self.new_conn(false, local, peer) {
                    Some(ci) => {
                        let c = &mut self.conns[ci];
                        c.st = St::Open;
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        c.want |= W_RESPONSE;
                        println!("testguest: vsock accepted port={} peer={}", local, peer);
                    }
                    None => self.queue_rst(local, peer),
                },
                OP_RST => {}
                _ => self.queue_rst(local, peer),
            }
            return;
        };
        let c = &mut self.conns[ci];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.peer_free() > 0 {
            c.credit_requested = false;
        }
        match op {
            OP_RESPONSE if c.st == St::Connecting => {
                c.st = St::Open;
                c.since = rdtsc();
                c.want |= W_HELLO;
                println!("testguest: vsock connected port={} local={}", peer, local);
            }
            OP_RW if c.st == St::Open || c.st == St::Closing => {
                let n = h.len;
                if n as usize > used_len as usize - HDR {
                    c.want = W_RST;
                    return;
                }
                c.rx_bytes += n as u64;
                let src = (buf + HDR as u64) as *const u8;
                if c.client {
                    // Keep the first line; everything is consumed (credit) at once.
                    for k in 0..n as usize {
                        let b = unsafe { src.add(k).read() };
                        if c.line_len < c.line.len() && !c.line[..c.line_len].contains(&b'\n') {
                            c.line[c.line_len] = b;
                            c.line_len += 1;
                        }
                    }
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                    if c.line[..c.line_len].contains(&b'\n') && c.st == St::Open {
                        self.client_reply(ci);
                    }
                } else if c.st == St::Closing && c.peer_shutdown & SHUT_RCV != 0 {
                    // The peer will not take an echo any more: drop it.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                } else {
                    if n > RING - c.len {
                        // Past the credit we gave.
                        c.want = W_RST;
                        return;
                    }
                    let wr = (c.rd + c.len) % RING;
                    let first = n.min(RING - wr);
                    unsafe {
                        core::ptr::copy_nonoverlapping(src, (c.ring + wr as u64) as *mut u8, first as usize);
                        core::ptr::copy_nonoverlapping(
                            src.add(first as usize),
                            c.ring as *mut u8,
                            (n - first) as usize,
                        );
                    }
                    c.len += n;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.want |= W_CREDIT_UPDATE,
            OP_SHUTDOWN => {
                c.peer_shutdown |= h.flags & (SHUT_RCV | SHUT_SEND);
                if c.client && c.st == St::Open && c.line_len > 0 {
                    self.client_reply(ci);
                    return;
                }
                let c = &mut self.conns[ci];
                if c.st != St::Closing {
                    c.st = St::Closing;
                    c.since = rdtsc();
                }
            }
            OP_RST => {
                let why = if c.st == St::Connecting { "refused" } else { "rst" };
                if c.st == St::Connecting {
                    println!("testguest: vsock connect refused port={}", peer);
                }
                self.close(ci, why);
            }
            _ => c.want = W_RST,
        }
    }

    /// The client got its line (or the host closed): print it and close our side.
    fn client_reply(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        let end = c.line[..c.line_len].iter().position(|&b| b == b'\n').unwrap_or(c.line_len);
        let text = core::str::from_utf8(&c.line[..end]).unwrap_or("<not utf-8>");
        let mut l = crate::serial::Line::new();
        let _ = writeln!(l, "testguest: vsock reply {}", text);
        c.st = St::Closing;
        c.since = rdtsc();
        c.want |= W_SHUTDOWN;
        crate::serial::emit(&l);
    }

    // ------------------------------------------------------------ send

    /// Sends whatever connection `ci` owes the peer, as far as TX buffers and credit allow.
    fn pump(&mut self, ci: usize) {
        if self.conns[ci].st == St::Free {
            return;
        }
        if self.conns[ci].want & W_RST != 0 {
            if self.send_ctrl(ci, OP_RST, 0) {
                self.close(ci, "error");
            }
            return;
        }
        for (bit, op) in [(W_REQUEST, OP_REQUEST), (W_RESPONSE, OP_RESPONSE)] {
            if self.conns[ci].want & bit != 0 {
                if !self.send_ctrl(ci, op, 0) {
                    return;
                }
                self.conns[ci].want &= !bit;
            }
        }
        if self.conns[ci].want & W_HELLO != 0 {
            let Some(i) = self.tx_alloc() else { return };
            let mut l = crate::serial::Line::new();
            let _ = writeln!(l, "hello from guest cid={}", self.cid);
            let msg = l.bytes();
            let buf = self.tx_base + PKT_STRIDE * i as u64;
            unsafe { core::ptr::copy_nonoverlapping(msg.as_ptr(), (buf + HDR as u64) as *mut u8, msg.len()) };
            let c = &mut self.conns[ci];
            c.want &= !W_HELLO;
            c.tx_cnt = c.tx_cnt.wrapping_add(msg.len() as u32);
            c.tx_bytes += msg.len() as u64;
            c.last_fwd_sent = c.fwd_cnt;
            let h = Self::header(self.cid, c.local, c.peer, OP_RW, msg.len() as u32, 0, c.fwd_cnt);
            self.send_buf(i, h);
        }
        self.pump_echo(ci);
        let c = self.conns[ci];
        if c.want & W_CREDIT_REQUEST != 0 {
            if !self.send_ctrl(ci, OP_CREDIT_REQUEST, 0) {
                return;
            }
            self.conns[ci].want &= !W_CREDIT_REQUEST;
        }
        let c = self.conns[ci];
        let unreported = c.fwd_cnt.wrapping_sub(c.last_fwd_sent);
        if c.want & W_CREDIT_UPDATE != 0 || unreported >= RING / 2 {
            if !self.send_ctrl(ci, OP_CREDIT_UPDATE, 0) {
                return;
            }
            self.conns[ci].want &= !W_CREDIT_UPDATE;
        }
        if self.conns[ci].want & W_SHUTDOWN != 0 {
            if !self.send_ctrl(ci, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND) {
                return;
            }
            self.conns[ci].want &= !W_SHUTDOWN;
        }
        // An echo connection the peer shut down: once nothing more can go out, RST (the
        // peer's SHUTDOWN said it will not receive, or everything was echoed).
        let c = self.conns[ci];
        if !c.client
            && c.st == St::Closing
            && (c.len == 0 || c.peer_shutdown & SHUT_RCV != 0)
            && self.send_ctrl(ci, OP_RST, 0)
        {
            self.close(ci, "shutdown");
        }
    }

    fn pump_echo(&mut self, ci: usize) {
        loop {
            let c = self.conns[ci];
            let sending = c.st == St::Open || (c.st == St::Closing && c.peer_shutdown & SHUT_RCV == 0);
            if c.client || !sending || c.len == 0 {
                return;
            }
            let credit = c.peer_free();
            if credit == 0 {
                if !c.credit_requested {
                    self.conns[ci].credit_requested = true;
                    self.conns[ci].want |= W_CREDIT_REQUEST;
                }
                return;
            }
            let Some(i) = self.tx_alloc() else { return };
            let n = c.len.min(credit).min(MAX_PAYLOAD);
            let dst = (self.tx_base + PKT_STRIDE * i as u64 + HDR as u64) as *mut u8;
            let first = n.min(RING - c.rd);
            unsafe {
                core::ptr::copy_nonoverlapping((c.ring + c.rd as u64) as *const u8, dst, first as usize);
                core::ptr::copy_nonoverlapping(c.ring as *const u8, dst.add(first as usize), (n - first) as usize);
            }
            let c = &mut self.conns[ci];
            c.rd = (c.rd + n) % RING;
            c.len -= n;
            c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
            c.tx_cnt = c.tx_cnt.wrapping_add(n);
            c.tx_bytes += n as u64;
            c.last_fwd_sent = c.fwd_cnt;
            let h = Self::header(self.cid, c.local, c.peer, OP_RW, n, 0, c.fwd_cnt);
            self.send_buf(i, h);
        }
    }

    fn pump_rsts(&mut self) {
        while self.nrst > 0 {
            let Some(i) = self.tx_alloc() else { return };
            self.nrst -= 1;
            let (local, peer) = self.rst[self.nrst];
            let h = Self::header(self.cid, local, peer, OP_RST, 0, 0, 0);
            self.send_buf(i, h);
        }
    }

    fn connect(&mut self, port: u32) {
        let local = self.next_local;
        self.next_local = self.next_local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let Some(ci) = self.new_conn(true, local, port) else {
            fail(format_args!("vsock: no free connection slot"));
        };
        let c = &mut self.conns[ci];
        c.st = St::Connecting;
        c.want |= W_REQUEST;
    }

    /// Timeouts: a connect without an answer, a close the peer does not finish.
    fn timeouts(&mut self, now: u64, limit: u64) {
        for ci in 0..MAX_CONNS {
            let c = self.conns[ci];
            if now.wrapping_sub(c.since) <= limit {
                continue;
            }
            match c.st {
                St::Connecting => {
                    println!("testguest: vsock connect port={} timed out", c.peer);
                    self.conns[ci].want = W_RST;
                }
                St::Closing if c.client && c.want == 0 => self.conns[ci].want = W_RST,
                _ => {}
            }
        }
    }

    fn run(&mut self) -> ! {
        let timeout = virtio::ticks_ms(10_000);
        loop {
            // A transport reset must take effect before the packets that follow it: read the
            // RX index first, then the events (the device writes the event before it sends
            // anything on new connections).
            let rx_limit = self.rxq.used_idx();
            while let Some((id, len)) = self.evq.pop_used() {
                self.on_event(id, len);
            }
            let mut busy = false;
            loop {
                let at = self.rxq.next_used();
                let Some((id, len)) = self.rxq.pop_used_upto(rx_limit) else { break };
                match self.rx_stale_until {
                    Some(end) if (end.wrapping_sub(at) as i16) > 0 => {}
                    _ => {
                        self.rx_stale_until = None;
                        self.on_rx(id, len);
                    }
                }
                self.rxq.publish(id);
                busy = true;
            }
            while let Some((id, _)) = self.txq.pop_used() {
                if (id as usize) < TX_BUFS as usize && self.tx_nfree < TX_BUFS as usize {
                    self.tx_free[self.tx_nfree] = id;
                    self.tx_nfree += 1;
                }
                busy = true;
            }
            for ci in 0..MAX_CONNS {
                self.pump(ci);
            }
            self.pump_rsts();
            self.rxq.kick_if_drained();
            self.txq.kick();
            self.evq.kick();
            self.txq.rescue(self.stall);
            self.rxq.keepalive(self.stall);
            if !busy {
                self.timeouts(rdtsc(), timeout);
                if self.client_done && self.listen.is_none() && self.txq.outstanding == 0 {
                    println!("testguest: done mode=vsock");
                    crate::blk::print_kicks();
                    self.dev.reset();
                    cpu::reset();
                }
                pause();
            }
        }
    }
}

pub fn run() -> ! {
    let cfg = &crate::run().cfg;
    let mut v = Vsock::open();
    let port = |p: u64, what: &str| -> u32 {
        u32::try_from(p).unwrap_or_else(|_| fail(format_args!("{}={} is not a port", what, p)))
    };
    if cfg.vsock_connect == 0 && !cfg.vsock_listen {
        fail(format_args!("mode=vsock with vsock_listen=0 needs vsock_connect=<port>"));
    }
    if cfg.vsock_listen {
        v.listen = Some(port(cfg.vsock_port, "vsock_port"));
    }
    let mut l = crate::serial::Line::new();
    let _ = write!(l, "testguest: vsock ready cid={} slot={} listen=", v.cid, v.dev.slot);
    let _ = match v.listen {
        Some(p) => writeln!(l, "{}", p),
        None => writeln!(l, "none"),
    };
    crate::serial::emit(&l);
    if cfg.vsock_connect != 0 {
        v.connect(port(cfg.vsock_connect, "vsock_connect"));
    }
    v.run()
}
