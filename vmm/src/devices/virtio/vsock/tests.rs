//! The vsock device driven like a guest driver would (mock queues) against real Unix sockets,
//! with a real event manager dispatching its events.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::connection::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::devices::virtio::chain::tests::mem;
use crate::devices::virtio::testutil::TestQueue;
use crate::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, COMMON_FEATURES};
use crate::memory::GuestMemory;

const CID: u64 = 3;
const QSIZE: u16 = 64;
const TX_BASE: u64 = 0x10_0000;
const RX_BASE: u64 = 0x18_0000;
const RX_BUF: u32 = 4096;

fn sock_path(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vsk-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

struct Guest<'a> {
    mem: &'a GuestMemory,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    ev: TestQueue<'a>,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    irq: Arc<Interrupt>,
    rx_addr: HashMap<u16, u64>,
    rx_seen: u16,
    rx_next_buf: u64,
    rx_used_total: u64,
    tx_next: u64,
    ev_seen: u16,
    path: PathBuf,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemory, tag: &str) -> Self {
        let path = sock_path(tag);
        let dev = Arc::new(Mutex::new(Vsock::new(CID, &path).unwrap()));
        let rx = TestQueue::new(mem, 0, QSIZE);
        let tx = TestQueue::new(mem, 0x4000, QSIZE);
        let ev = TestQueue::new(mem, 0x8000, QSIZE);
        let irq = Arc::new(Interrupt::new().unwrap());
        dev.lock()
            .unwrap()
            .activate(ActiveQueues {
                mem: mem.clone(),
                acked_features: COMMON_FEATURES,
                queues: vec![rx.queue(), tx.queue(), ev.queue()],
                interrupt: irq.clone(),
            })
            .unwrap();
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut g = Self {
            mem,
            rx,
            tx,
            ev,
            dev,
            em,
            irq,
            rx_addr: HashMap::new(),
            rx_seen: 0,
            rx_next_buf: 0,
            rx_used_total: 0,
            tx_next: 0,
            ev_seen: 0,
            path,
        };
        g.spin();
        g
    }

    /// Dispatches events until a quiet period.
    fn spin(&mut self) {
        let mut quiet = 0;
        while quiet < 3 {
            match self.em.run_with_timeout(5) {
                Ok(0) => quiet += 1,
                Ok(_) => quiet = 0,
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    fn kick(&mut self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
        self.spin();
    }

    /// Offers `n` RX buffers.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            // At most 32 outstanding, so head % 32 names a free buffer.
            if self.rx_next_buf.wrapping_sub(self.rx_seen_total()) >= 32 {
                break;
            }
            let head = self.rx.next_head();
            let addr = RX_BASE + u64::from(head % 32) * u64::from(RX_BUF);
            self.rx_next_buf += 1;
            self.rx.push(&[(addr, RX_BUF, true)]);
            self.rx_addr.insert(head, addr);
        }
        self.kick(0);
    }

    fn rx_seen_total(&self) -> u64 {
        self.rx_used_total
    }

    fn send_raw(&mut self, bufs: &[(u64, u32, bool)]) {
        self.tx.push(bufs);
        self.kick(1);
    }

    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let addr = TX_BASE + (self.tx_next % 4) * 0x1_1000;
        self.tx_next += 1;
        self.mem.write_obj(hdr, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.send_raw(&[(addr, (HDR_LEN + payload.len()) as u32, false)]);
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Default::default()
        }
    }

    /// Packets the device put in RX buffers since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (head, len) = self.rx.used(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            self.rx_used_total += 1;
            let addr = self.rx_addr[&(head as u16)];
            if len == 0 {
                out.push((Header::default(), vec![]));
                continue;
            }
            let hdr: Header = self.mem.read_obj(GuestAddress(addr)).unwrap();
            let mut payload = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            assert_eq!({ hdr.len } as usize, payload.len());
            out.push((hdr, payload));
        }
        out
    }

    fn recv_one(&mut self) -> (Header, Vec<u8>) {
        self.give_rx(1);
        let mut p = self.recv();
        assert_eq!(p.len(), 1, "{p:?}");
        p.remove(0)
    }

    /// Host client: connect + CONNECT line; returns the stream and the host port the guest sees.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.spin();
        let (req, _) = self.recv_one();
        assert_eq!({ req.op }, OP_REQUEST);
        assert_eq!({ req.dst_port }, port);
        assert_eq!({ req.dst_cid }, CID);
        assert_eq!({ req.src_cid }, HOST_CID);
        let local = req.src_port;
        self.send(self.hdr(OP_RESPONSE, port, local), &[]);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let expect = format!("OK {local}\n");
        let mut ok = vec![0u8; expect.len()];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(String::from_utf8(ok).unwrap(), expect);
        (s, local)
    }
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_for(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn host_initiated_connect_data_both_ways_credit_and_rst() {
    let m = mem();
    let mut g = Guest::new(&m, "host");
    let (mut s, local) = g.host_connect(1234);
    assert!(local >= 1 << 30);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 1);

    // Host -> guest.
    s.write_all(b"hello").unwrap();
    g.spin();
    let (h, p) = g.recv_one();
    assert_eq!(({ h.op }, p.as_slice()), (OP_RW, &b"hello"[..]));
    assert_eq!({ h.buf_alloc }, CONN_BUF_ALLOC);
    assert_ne!(g.irq.status(), 0);

    // Guest -> host.
    g.send(g.hdr(OP_RW, 1234, local), b"world!");
    assert_eq!(read_for(&mut s, 6), b"world!");

    // Credit request -> update carrying our fwd_cnt.
    g.send(g.hdr(OP_CREDIT_REQUEST, 1234, local), &[]);
    let (h, _) = g.recv_one();
    assert_eq!({ h.op }, OP_CREDIT_UPDATE);
    assert_eq!({ h.fwd_cnt }, 6);

    // Guest RST closes the host side.
    g.send(g.hdr(OP_RST, 1234, local), &[]);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn host_data_sent_right_after_connect_is_kept() {
    let m = mem();
    let mut g = Guest::new(&m, "early");
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 77\nearly bytes").unwrap();
    g.spin();
    let (req, _) = g.recv_one();
    let local = req.src_port;
    g.send(g.hdr(OP_RESPONSE, 77, local), &[]);
    g.give_rx(1);
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, b"early bytes");
}

#[test]
fn guest_refusal_and_bad_connect_lines_close_the_host_client() {
    let m = mem();
    let mut g = Guest::new(&m, "refuse");
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    g.spin();
    let (req, _) = g.recv_one();
    g.send(g.hdr(OP_RST, 99, req.src_port), &[]);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "refused connection not closed");

    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'a'; 40]] {
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.write_all(line).unwrap();
        g.spin();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed with the line unread: EOF or ECONNRESET.
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{line:?}: {other:?}"),
        }
    }
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn guest_initiated_connect_to_a_host_listener() {
    let m = mem();
    let mut g = Guest::new(&m, "guest");
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    g.send(g.hdr(OP_REQUEST, 40000, 5000), &[]);
    let (h, _) = g.recv_one();
    assert_eq!(
        ({ h.op }, { h.src_port }, { h.dst_port }),
        (OP_RESPONSE, 5000, 40000)
    );
    let (mut s, _) = listener.accept().unwrap();
    g.send(g.hdr(OP_RW, 40000, 5000), b"line from the guest\n");
    assert_eq!(read_for(&mut s, 20), b"line from the guest\n");
    s.write_all(b"reply").unwrap();
    g.spin();
    let (h, p) = g.recv_one();
    assert_eq!(({ h.op }, p.as_slice()), (OP_RW, &b"reply"[..]));

    // Host closes: the guest is told with SHUTDOWN, answers RST, the connection goes.
    drop(s);
    g.spin();
    let (h, _) = g.recv_one();
    assert_eq!({ h.op }, OP_SHUTDOWN);
    assert_eq!({ h.flags }, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(g.hdr(OP_RST, 40000, 5000), &[]);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    let _ = std::fs::remove_file(format!("{}_5000", g.path.display()));

    // Nobody listens on 5001: RST.
    g.send(g.hdr(OP_REQUEST, 40001, 5001), &[]);
    let (h, _) = g.recv_one();
    assert_eq!(({ h.op }, { h.dst_port }), (OP_RST, 40001));
}

#[test]
fn we_never_send_more_than_the_guest_credit() {
    let m = mem();
    let mut g = Guest::new(&m, "credit");
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(b"CONNECT 1\n").unwrap();
    g.spin();
    let (req, _) = g.recv_one();
    let local = req.src_port;
    let mut resp = g.hdr(OP_RESPONSE, 1, local);
    resp.buf_alloc = 100;
    g.send(resp, &[]);
    let _ = read_for(&mut s, format!("OK {local}\n").len());
    s.write_all(&[7u8; 300]).unwrap();
    g.spin();
    g.give_rx(4);
    let p = g.recv();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(({ p[0].0.op }, p[0].1.len()), (OP_RW, 100));
    assert_eq!({ p[1].0.op }, OP_CREDIT_REQUEST);
    // The guest consumed 100 bytes.
    let mut upd = g.hdr(OP_CREDIT_UPDATE, 1, local);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    g.send(upd, &[]);
    // The next 100 bytes, then (100 still waiting) another credit request.
    let p = g.recv();
    assert_eq!(({ p[0].0.op }, p[0].1.len()), (OP_RW, 100));
    assert!(
        p[1..].iter().all(|(h, _)| h.op == OP_CREDIT_REQUEST),
        "{p:?}"
    );
}

#[test]
fn a_guest_overrunning_our_credit_is_reset_and_buffering_stays_bounded() {
    let m = mem();
    let mut g = Guest::new(&m, "overrun");
    let (s, local) = g.host_connect(9);
    // The host never reads; its socket buffer fills, then ours (256 KiB), then RST.
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    let mut rst = false;
    for _ in 0..64 {
        g.send(g.hdr(OP_RW, 9, local), &chunk);
        assert!(g.dev.lock().unwrap().buffered_bytes() <= CONN_BUF_ALLOC as usize);
        g.give_rx(2);
        if g.recv().iter().any(|(h, _)| h.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "overrun never reset");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    drop(s);
}

#[test]
fn hostile_tx_and_rx_chains_are_refused() {
    let m = mem();
    let mut g = Guest::new(&m, "hostile");
    let (mut s, local) = g.host_connect(5);

    // Wrong source CID: dropped without answer.
    let mut h = g.hdr(OP_RW, 5, local);
    h.src_cid = 99;
    h.len = 3;
    g.send(h, b"bad");
    // Unknown connection: RST.
    let mut h = g.hdr(OP_RW, 6, 12345);
    h.len = 1;
    g.send(h, b"x");
    let (r, _) = g.recv_one();
    assert_eq!(({ r.op }, { r.dst_port }), (OP_RST, 6));
    // Short header, writable buffer on TX, out of guest memory, zero length: ignored.
    g.send_raw(&[(TX_BASE, 20, false)]);
    g.send_raw(&[(TX_BASE, 44, false), (TX_BASE + 0x100, 16, true)]);
    g.send_raw(&[(0x4000_0000, 44, false)]);
    g.send_raw(&[(TX_BASE, 0, false)]);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 1);
    g.give_rx(1);
    assert!(g.recv().is_empty());
    // Host data still flows after all that.
    s.write_all(b"ok").unwrap();
    g.spin();
    let (r, p) = g.recv_one();
    assert_eq!(({ r.op }, p.as_slice()), (OP_RW, &b"ok"[..]));

    // RX buffers that are readable or too small are handed back empty. (One good buffer from
    // recv_one is still outstanding: it takes "more" first.)
    s.write_all(b"more").unwrap();
    g.spin();
    let p = g.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, b"more");
    for (len, w) in [(4096, false), (20, true)] {
        let head = g.rx.next_head();
        let addr = RX_BASE + u64::from(head % 32) * u64::from(RX_BUF);
        g.rx.push(&[(addr, len, w)]);
        g.rx_addr.insert(head, addr);
        g.rx_next_buf += 1;
    }
    g.kick(0);
    s.write_all(b"again").unwrap();
    g.spin();
    let p = g.recv();
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|(_, d)| d.is_empty()));
    let (r, p) = g.recv_one();
    assert_eq!(({ r.op }, p.as_slice()), (OP_RW, &b"again"[..]));

    // A header claiming a huge payload on a live connection resets it.
    let mut h = g.hdr(OP_RW, 5, local);
    h.len = u32::MAX;
    g.mem.write_obj(h, GuestAddress(TX_BASE)).unwrap();
    g.send_raw(&[(TX_BASE, HDR_LEN as u32 + 10, false)]);
    let (r, _) = g.recv_one();
    assert_eq!({ r.op }, OP_RST);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn connections_are_bounded() {
    let m = mem();
    let mut g = Guest::new(&m, "bound");
    g.dev.lock().unwrap().set_max_connections(2);
    let _a = g.host_connect(1);
    let _b = g.host_connect(2);
    // Third host client: closed at once.
    let mut c = UnixStream::connect(&g.path).unwrap();
    let _ = c.write_all(b"CONNECT 3\n");
    g.spin();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    // Guest-initiated beyond the bound: RST.
    let _l = UnixListener::bind(format!("{}_7", g.path.display())).unwrap();
    g.send(g.hdr(OP_REQUEST, 100, 7), &[]);
    let (r, _) = g.recv_one();
    assert_eq!({ r.op }, OP_RST);
    assert_eq!(g.dev.lock().unwrap().connection_count(), 2);
    let _ = std::fs::remove_file(format!("{}_7", g.path.display()));
}

#[test]
fn transport_reset_event_drops_connections() {
    let m = mem();
    let mut g = Guest::new(&m, "reset");
    let (mut s, _) = g.host_connect(5);
    g.dev.lock().unwrap().transport_reset();
    g.spin();
    assert_eq!(g.dev.lock().unwrap().connection_count(), 0);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // The event waits for a buffer on the event queue.
    g.mem
        .write_obj(0xffff_ffffu32, GuestAddress(0x1f_0000))
        .unwrap();
    g.ev.push(&[(0x1f_0000, 8, true)]);
    g.kick(2);
    assert_eq!(g.ev.used_idx(), 1);
    assert_eq!(g.ev.used(0).1, 4);
    assert_eq!(
        g.mem.read_obj::<u32>(GuestAddress(0x1f_0000)).unwrap(),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    let _ = g.ev_seen;
}

#[test]
fn one_mib_echo_through_the_device() {
    let m = mem();
    let mut g = Guest::new(&m, "mib");
    let (mut s, local) = g.host_connect(4000);
    s.set_nonblocking(true).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut sent = 0;
    let mut echoed = Vec::new();
    let mut guest_fwd = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while echoed.len() < data.len() {
        assert!(Instant::now() < deadline, "stalled at {}", echoed.len());
        if sent < data.len() {
            match s.write(&data[sent..(sent + 32 * 1024).min(data.len())]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        g.spin();
        g.give_rx(8);
        for (h, p) in g.recv() {
            match h.op {
                OP_RW => {
                    // The guest echoes what it got, and reports it consumed it.
                    guest_fwd += p.len() as u32;
                    let mut rw = g.hdr(OP_RW, 4000, local);
                    rw.fwd_cnt = guest_fwd;
                    rw.len = p.len() as u32;
                    g.send(rw, &p);
                }
                OP_CREDIT_REQUEST => {
                    let mut u = g.hdr(OP_CREDIT_UPDATE, 4000, local);
                    u.fwd_cnt = guest_fwd;
                    g.send(u, &[]);
                }
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
        }
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => panic!("host side closed"),
                Ok(n) => echoed.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(echoed == data, "echo differs");
}

#[test]
fn bad_socket_paths_are_clear_errors_at_start_up() {
    let p = sock_path("file");
    std::fs::write(&p, b"not a socket").unwrap();
    let e = Vsock::new(CID, &p).err().unwrap();
    assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
    assert!(e.to_string().contains("is not a socket"));
    std::fs::remove_file(&p).unwrap();
    // A stale socket is replaced.
    let stale = UnixListener::bind(&p).unwrap();
    drop(stale);
    assert!(Vsock::new(CID, &p).is_ok());
    std::fs::remove_file(&p).unwrap();
    assert!(matches!(
        Vsock::new(CID, std::path::Path::new("/nonexistent-dir/v.sock")),
        Err(VsockError::Bind { .. })
    ));
    assert!(matches!(Vsock::new(2, &p), Err(VsockError::BadCid(2))));
    let _ = Header::default().as_slice();
}

#[test]
fn a_bogus_avail_index_does_not_spin_the_device() {
    let m = mem();
    let mut g = Guest::new(&m, "bogus");
    let (mut s, _) = g.host_connect(8);
    g.rx.set_avail_idx(g.rx_next_buf as u16 + 1000);
    g.tx.set_avail_idx(1000);
    s.write_all(b"data while the rings are garbage").unwrap();
    // Returns (no busy loop) with nothing delivered.
    g.kick(0);
    g.kick(1);
    assert_eq!(g.rx.used_idx(), g.rx_seen);
}
