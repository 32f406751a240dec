use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

#[path = "../../../../../tests/common/require.rs"]
mod require;

use super::backend::{find_passt, BackendError};
use super::*;
use crate::devices::config::{MacAddr, NetBackendConfig, NetConfig};
use crate::devices::virtio::chain::tests::mem;
use crate::devices::virtio::testutil::TestQueue;
use crate::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, COMMON_FEATURES};
use crate::memory::GuestMemory;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying a DHCPDISCOVER from `mac`.
pub(crate) fn dhcp_discover(mac: MacAddr, xid: u32) -> Vec<u8> {
    let mut bootp = vec![1u8, 1, 6, 0];
    bootp.extend_from_slice(&xid.to_be_bytes());
    bootp.extend_from_slice(&[0; 4]); // secs, flags
    bootp.extend_from_slice(&[0; 16]); // ciaddr, yiaddr, siaddr, giaddr
    bootp.extend_from_slice(&mac.0);
    bootp.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr padding, sname, file
    bootp.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    bootp.extend_from_slice(&[53, 1, 1]); // DHCPDISCOVER
    bootp.extend_from_slice(&[55, 3, 1, 3, 6]); // parameter request: mask, router, dns
    bootp.push(255);
    let udp_len = 8 + bootp.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&68u16.to_be_bytes());
    udp.extend_from_slice(&67u16.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&bootp);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&[0, 0, 0, 0, 255, 255, 255, 255]);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    frame
}

/// If `frame` is a DHCP offer for `xid`, the offered address.
pub(crate) fn dhcp_offer(frame: &[u8], xid: u32) -> Option<[u8; 4]> {
    if frame.len() < 14 + 20 + 8 + 240 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = &frame[14 + ihl..];
    if udp[0..2] != 67u16.to_be_bytes() || udp[2..4] != 68u16.to_be_bytes() {
        return None;
    }
    let b = &udp[8..];
    if b[0] != 2 || b[4..8] != xid.to_be_bytes() || b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut opts = &b[240..];
    while opts.len() >= 2 && opts[0] != 255 {
        if opts[0] == 0 {
            opts = &opts[1..];
            continue;
        }
        let len = usize::from(opts[1]);
        if opts[0] == 53 && len == 1 && opts.get(2) == Some(&2) {
            return Some([b[16], b[17], b[18], b[19]]);
        }
        opts = opts.get(2 + len..)?;
    }
    None
}

#[test]
fn passt_answers_a_dhcp_discover_with_an_offer() {
    if find_passt().is_err() {
        require::skip(
            "passt_answers_a_dhcp_discover_with_an_offer",
            "net",
            "passt is not installed (apt-get install passt)",
        );
        return;
    }
    let m = mem();
    let net = Net::new(&NetConfig {
        backend: NetBackendConfig::Passt {
            binary: None,
            args: vec![],
        },
        mac: MAC,
    })
    .unwrap();
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC.0);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    let net = Arc::new(Mutex::new(net));
    let mut rx = TestQueue::new(&m, 0, 16);
    let mut tx = TestQueue::new(&m, 0x4000, 16);
    let irq = Arc::new(Interrupt::new().unwrap());
    net.lock()
        .unwrap()
        .activate(ActiveQueues {
            mem: m.clone(),
            acked_features: COMMON_FEATURES,
            queues: vec![rx.queue(), tx.queue()],
            interrupt: irq.clone(),
        })
        .unwrap();
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(net.clone());
    let mut addrs = std::collections::HashMap::new();
    for i in 0..8u64 {
        let head = rx.push(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        addrs.insert(head, 0x10_0000 + i * 0x1000);
    }
    let xid = 0x1234_5678;
    let frame = dhcp_discover(MAC, xid);
    m.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x18_0000))
        .unwrap();
    m.write_slice(&frame, GuestAddress(0x18_0000 + NET_HDR_LEN as u64))
        .unwrap();
    tx.push(&[(0x18_0000, (NET_HDR_LEN + frame.len()) as u32, false)]);
    net.lock().unwrap().queue_events()[TXQ].write(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    let offer = loop {
        assert!(Instant::now() < deadline, "no DHCP offer from passt");
        em.run_with_timeout(50).unwrap();
        let mut found = None;
        while seen < rx.used_idx() {
            let (head, len) = rx.used(seen);
            seen += 1;
            let addr = addrs[&(head as u16)];
            let mut buf = vec![0u8; len as usize];
            m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            assert_eq!(buf[10], 1, "num_buffers");
            if let Some(ip) = dhcp_offer(&buf[NET_HDR_LEN..], xid) {
                assert_eq!(&buf[NET_HDR_LEN..NET_HDR_LEN + 6], &MAC.0, "to our MAC");
                found = Some(ip);
            }
        }
        if let Some(ip) = found {
            break ip;
        }
    };
    assert_ne!(offer, [0, 0, 0, 0]);
    let stats = net.lock().unwrap().stats();
    assert_eq!(stats.tx_frames, 1);
    assert!(stats.rx_frames >= 1);
    assert_ne!(irq.status(), 0);
    eprintln!("passt offered {offer:?}");
}

#[test]
fn hostile_tx_chains_are_dropped() {
    if find_passt().is_err() {
        require::skip(
            "hostile_tx_chains_are_dropped",
            "net",
            "passt is not installed (apt-get install passt)",
        );
        return;
    }
    let m = mem();
    let mut net = Net::new(&NetConfig {
        backend: NetBackendConfig::Passt {
            binary: None,
            args: vec![],
        },
        mac: MAC,
    })
    .unwrap();
    let rx = TestQueue::new(&m, 0, 16);
    let mut tx = TestQueue::new(&m, 0x4000, 16);
    net.activate(ActiveQueues {
        mem: m.clone(),
        acked_features: COMMON_FEATURES,
        queues: vec![rx.queue(), tx.queue()],
        interrupt: Arc::new(Interrupt::new().unwrap()),
    })
    .unwrap();
    tx.push(&[(0x18_0000, 4, false)]); // shorter than the header
    tx.push(&[(0x4000_0000, 100, false)]); // outside guest memory
    tx.push(&[(0x18_0000, 100, true)]); // device-writable
    tx.push(&[(0x18_0000, 0x10_0000, false)]); // larger than any frame
    net.process_tx();
    assert_eq!(tx.used_idx(), 4);
    let s = net.stats();
    assert_eq!((s.tx_frames, s.tx_dropped), (0, 4));
}

#[test]
fn missing_passt_and_bad_tap_names_fail_at_start_up() {
    let e = Net::new(&NetConfig {
        backend: NetBackendConfig::Passt {
            binary: Some("/nonexistent/passt".into()),
            args: vec![],
        },
        mac: MAC,
    })
    .err()
    .unwrap();
    assert!(
        matches!(e, NetError::Backend(BackendError::PasstMissing(_))),
        "{e}"
    );
    assert!(e.to_string().contains("/nonexistent/passt"));
    let e = Net::new(&NetConfig {
        backend: NetBackendConfig::Tap {
            name: "a-name-that-is-too-long".into(),
        },
        mac: MAC,
    })
    .err()
    .unwrap();
    assert!(matches!(e, NetError::Backend(BackendError::TapName(_))));
}

#[test]
fn tap_backend_attaches() {
    let name = format!("mtap{}", std::process::id() % 100_000);
    match Net::new(&NetConfig {
        backend: NetBackendConfig::Tap { name: name.clone() },
        mac: MAC,
    }) {
        Ok(n) => match n.backend() {
            Backend::Tap(t) => assert_eq!(t.name(), name),
            _ => unreachable!(),
        },
        Err(e) => eprintln!("skipped: cannot create a tap here: {e}"),
    }
}

/// A device on a Unix socket nobody answers (the control queue needs no back end), activated
/// with rx, tx and control queues and the control features acked. The listener must outlive it.
struct CtrlRig<'a> {
    net: Net,
    ctrl: TestQueue<'a>,
    irq: Arc<Interrupt>,
    _listener: std::os::unix::net::UnixListener,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn socket_backend(tag: &str) -> (NetConfig, std::os::unix::net::UnixListener, TempDir) {
    let dir = std::env::temp_dir().join(format!("vmm-net-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("passt.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    (
        NetConfig {
            backend: NetBackendConfig::PasstSocket { path },
            mac: MAC,
        },
        listener,
        TempDir(dir),
    )
}

const CTRL_FEATURES: u64 = COMMON_FEATURES
    | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ
    | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_MAC_ADDR;

fn ctrl_rig<'a>(m: &'a GuestMemory, tag: &str) -> CtrlRig<'a> {
    let (config, listener, dir) = socket_backend(tag);
    let mut net = Net::new(&config).unwrap();
    assert_eq!(net.queue_max_sizes().len(), 3, "control queue offered");
    assert_eq!(net.queue_events().len(), 3);
    assert_ne!(net.avail_features() & CTRL_FEATURES, 0);
    let rx = TestQueue::new(m, 0, 16);
    let tx = TestQueue::new(m, 0x4000, 16);
    let ctrl = TestQueue::new(m, 0x8000, 16);
    let irq = Arc::new(Interrupt::new().unwrap());
    net.activate(ActiveQueues {
        mem: m.clone(),
        acked_features: CTRL_FEATURES,
        queues: vec![rx.queue(), tx.queue(), ctrl.queue()],
        interrupt: irq.clone(),
    })
    .unwrap();
    CtrlRig {
        net,
        ctrl,
        irq,
        _listener: listener,
        _dir: dir,
    }
}

const CMD: u64 = 0x10_0000;
const ACK: u64 = 0x11_0000;
const NOT_ANSWERED: u8 = 0xaa;

impl CtrlRig<'_> {
    /// Sends `class, cmd, data` the way Linux does (header, data, ack: three descriptors) and
    /// returns (used length, ack byte).
    fn command(&mut self, m: &GuestMemory, class: u32, cmd: u32, data: &[u8]) -> (u32, u8) {
        m.write_slice(&[class as u8, cmd as u8], GuestAddress(CMD))
            .unwrap();
        m.write_slice(data, GuestAddress(CMD + 0x100)).unwrap();
        let mut bufs = vec![(CMD, 2, false)];
        if !data.is_empty() {
            bufs.push((CMD + 0x100, data.len() as u32, false));
        }
        bufs.push((ACK, 1, true));
        self.send(m, &bufs)
    }

    fn send(&mut self, m: &GuestMemory, bufs: &[(u64, u32, bool)]) -> (u32, u8) {
        m.write_slice(&[NOT_ANSWERED], GuestAddress(ACK)).unwrap();
        let before = self.ctrl.used_idx();
        let head = self.ctrl.push(bufs);
        self.net.process_ctrl();
        assert_eq!(
            self.ctrl.used_idx(),
            before.wrapping_add(1),
            "chain returned"
        );
        let (id, len) = self.ctrl.used(before);
        assert_eq!(id, u32::from(head));
        let mut ack = [0u8];
        m.read_slice(&mut ack, GuestAddress(ACK)).unwrap();
        (len, ack[0])
    }

    fn config_mac(&self) -> [u8; 6] {
        let mut cfg = [0u8; 6];
        self.net.read_config(0, &mut cfg);
        cfg
    }
}

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD,
};
const OK: (u32, u8) = (1, 0);
const ERR: (u32, u8) = (1, 1);

#[test]
fn mac_addr_set_changes_config_space_and_a_reset_restores_the_configured_one() {
    let m = mem();
    let mut r = ctrl_rig(&m, "macset");
    assert_eq!(r.config_mac(), MAC.0);
    let new = [0x52, 0x54, 0xaa, 0xbb, 0xcc, 0xdd];
    assert_eq!(
        r.command(&m, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &new),
        OK
    );
    assert_eq!(r.config_mac(), new);
    assert_eq!(r.net.mac(), MacAddr(new));
    assert_eq!(
        r.net.save().unwrap().mac,
        MacAddr(new),
        "a snapshot keeps the new one"
    );
    assert_ne!(r.irq.status(), 0, "used buffer signalled");
    // One buffer holding header and address together works as well.
    let other = [0x02, 0, 0, 0, 0, 7];
    let mut cmd = vec![
        VIRTIO_NET_CTRL_MAC as u8,
        VIRTIO_NET_CTRL_MAC_ADDR_SET as u8,
    ];
    cmd.extend_from_slice(&other);
    m.write_slice(&cmd, GuestAddress(CMD)).unwrap();
    assert_eq!(r.send(&m, &[(CMD, 8, false), (ACK, 1, true)]), OK);
    assert_eq!(r.config_mac(), other);
    r.net.reset();
    assert_eq!(
        r.config_mac(),
        MAC.0,
        "reset returns to the configured address"
    );
}

#[test]
fn malformed_and_unknown_control_commands_are_refused_without_effect() {
    let m = mem();
    let mut r = ctrl_rig(&m, "malformed");
    let mac = |r: &CtrlRig| r.config_mac();
    let set = (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET);
    // Wrong length, multicast and all-zero addresses.
    assert_eq!(r.command(&m, set.0, set.1, &[0x52, 0x54, 0, 0, 1]), ERR);
    assert_eq!(
        r.command(&m, set.0, set.1, &[0x52, 0x54, 0, 0, 1, 2, 3]),
        ERR
    );
    assert_eq!(r.command(&m, set.0, set.1, &[0x01, 0, 0x5e, 0, 0, 1]), ERR);
    assert_eq!(r.command(&m, set.0, set.1, &[0; 6]), ERR);
    // Unknown class, unknown command, a feature we did not offer.
    assert_eq!(r.command(&m, 9, 0, &[]), ERR);
    assert_eq!(r.command(&m, VIRTIO_NET_CTRL_MAC, 7, &[0; 6]), ERR);
    assert_eq!(
        r.command(&m, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, &[1, 0]),
        ERR
    );
    assert_eq!(
        r.command(&m, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
        ERR
    );
    // A header of one byte.
    assert_eq!(r.send(&m, &[(CMD, 1, false), (ACK, 1, true)]), ERR);
    // Longer than any command: refused unread.
    let long = ctrl::MAX_COMMAND_LEN as u32 + 1;
    assert_eq!(r.send(&m, &[(CMD, long, false), (ACK, 1, true)]), ERR);
    // No byte to answer in, the ack before the command, a buffer outside guest memory:
    // returned unanswered, not carried out.
    let good = [
        VIRTIO_NET_CTRL_MAC as u8,
        VIRTIO_NET_CTRL_MAC_ADDR_SET as u8,
        0x52,
        0x54,
        9,
        9,
        9,
        9,
    ];
    m.write_slice(&good, GuestAddress(CMD)).unwrap();
    assert_eq!(r.send(&m, &[(CMD, 8, false)]), (0, NOT_ANSWERED));
    assert_eq!(
        r.send(&m, &[(ACK, 1, true), (CMD, 8, false)]),
        (0, NOT_ANSWERED)
    );
    assert_eq!(
        r.send(&m, &[(CMD, 8, false), (0x4000_0000, 1, true)]),
        (0, NOT_ANSWERED)
    );
    assert_eq!(
        r.send(&m, &[(0x1f_fffc, 8, false), (ACK, 1, true)]),
        (0, NOT_ANSWERED)
    );
    assert_eq!(mac(&r), MAC.0, "nothing above changed the address");
    // A chain whose next index points outside the table: cut short, returned unanswered.
    let head = r.ctrl.next_head();
    r.ctrl.push_raw(
        &[crate::devices::virtio::chain::tests::d(
            CMD,
            8,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT,
            200,
        )],
        head,
    );
    r.net.process_ctrl();
    let (_, len) = r.ctrl.used(r.ctrl.used_idx().wrapping_sub(1));
    assert_eq!(len, 0);
    // A driver lying about its avail index does not make us loop or panic.
    r.ctrl.set_avail_idx(r.ctrl.used_idx().wrapping_add(1000));
    r.net.process_ctrl();
    assert_eq!(mac(&r), MAC.0);
}

#[test]
fn the_other_classes_get_the_answers_linux_expects() {
    let m = mem();
    let mut r = ctrl_rig(&m, "classes");
    for cmd in [VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI] {
        assert_eq!(r.command(&m, VIRTIO_NET_CTRL_RX, cmd, &[1]), OK);
        assert_eq!(r.command(&m, VIRTIO_NET_CTRL_RX, cmd, &[0]), OK);
        assert_eq!(r.command(&m, VIRTIO_NET_CTRL_RX, cmd, &[]), ERR);
        assert_eq!(r.command(&m, VIRTIO_NET_CTRL_RX, cmd, &[1, 1]), ERR);
    }
    // Two tables: one unicast entry, no multicast ones.
    let mut tables = 1u32.to_le_bytes().to_vec();
    tables.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    tables.extend_from_slice(&0u32.to_le_bytes());
    let table = (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET);
    assert_eq!(r.command(&m, table.0, table.1, &tables), OK);
    assert_eq!(
        r.command(&m, table.0, table.1, &tables[..tables.len() - 1]),
        ERR
    );
    let mut huge = 1000u32.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 8]);
    assert_eq!(r.command(&m, table.0, table.1, &huge), ERR);
    let ann = (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK);
    assert_eq!(r.command(&m, ann.0, ann.1, &[]), OK);
    assert_eq!(r.command(&m, ann.0, ann.1, &[0]), ERR);
    assert_eq!(r.config_mac(), MAC.0);
}

#[test]
fn a_driver_without_the_control_queue_and_an_old_snapshot_run_on_two_queues() {
    let m = mem();
    // A new device, a driver that does not take VIRTIO_NET_F_CTRL_VQ: rx and tx only.
    let (config, _l, _d) = socket_backend("noctrl");
    let mut net = Net::new(&config).unwrap();
    assert_eq!(net.queues_in_use(COMMON_FEATURES), 2);
    assert_eq!(net.queues_in_use(CTRL_FEATURES), 3);
    let rx = TestQueue::new(&m, 0, 16);
    let tx = TestQueue::new(&m, 0x4000, 16);
    let irq = Arc::new(Interrupt::new().unwrap());
    let active = |queues| ActiveQueues {
        mem: m.clone(),
        acked_features: CTRL_FEATURES,
        queues,
        interrupt: irq.clone(),
    };
    assert!(
        net.activate(active(vec![rx.queue(), tx.queue()])).is_err(),
        "with CTRL_VQ acked the control queue is needed"
    );
    net.activate(ActiveQueues {
        acked_features: COMMON_FEATURES,
        ..active(vec![rx.queue(), tx.queue()])
    })
    .unwrap();
    assert!(!net.process_ctrl(), "no control queue to serve");
    // A snapshot from before the control queue: its feature bits have none, nor does the
    // restored device, which has two queues as then.
    let old = NetState {
        mac: MacAddr([0x52, 0x54, 1, 2, 3, 4]),
        avail_features: COMMON_FEATURES
            | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC
            | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS,
    };
    let mut net = Net::restore(&config, &old).unwrap();
    assert_eq!(net.avail_features(), old.avail_features);
    assert_eq!(net.queue_max_sizes().len(), 2);
    assert_eq!(net.queue_events().len(), 2);
    assert_eq!(net.queues_in_use(CTRL_FEATURES), 2);
    let mut cfg = [0u8; 6];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, old.mac.0, "the guest keeps the address it had");
    net.activate(ActiveQueues {
        acked_features: old.avail_features,
        ..active(vec![rx.queue(), tx.queue()])
    })
    .unwrap();
    assert_eq!(net.save().unwrap(), old);
}

#[test]
fn passt_gets_its_64k_mtu_and_a_full_size_frame_fills_a_chained_buffer() {
    use std::io::Write;
    let m = mem();
    let (config, listener, _dir) = socket_backend("mtu");
    let mut net = Net::new(&config).unwrap();
    let mtu_bit = 1u64 << VIRTIO_NET_F_MTU;
    assert_ne!(net.avail_features() & mtu_bit, 0, "MTU offered with passt");
    let mut cfg = [0u8; CONFIG_LEN];
    net.read_config(0, &mut cfg);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), PASST_MTU);
    let (mut peer, _) = listener.accept().unwrap();
    let mut rx = TestQueue::new(&m, 0, 32);
    let tx = TestQueue::new(&m, 0x4000, 16);
    net.activate(ActiveQueues {
        mem: m.clone(),
        acked_features: COMMON_FEATURES | mtu_bit,
        queues: vec![rx.queue(), tx.queue()],
        interrupt: Arc::new(Interrupt::new().unwrap()),
    })
    .unwrap();
    // Linux's receive buffer at a large MTU ("big packets"): the header, then one page per 4 KiB.
    let mut bufs = vec![(0x10_0000, NET_HDR_LEN as u32, true)];
    bufs.extend((0..16u64).map(|i| (0x11_0000 + i * 0x1000, 0x1000, true)));
    rx.push(&bufs);
    let frame: Vec<u8> = (0..14 + usize::from(PASST_MTU))
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    peer.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
    peer.write_all(&frame).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.used_idx() == 0 {
        assert!(
            Instant::now() < deadline,
            "the frame never reached the guest"
        );
        net.backend_readable = true;
        net.process_rx();
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, len) = rx.used(0);
    assert_eq!(len as usize, NET_HDR_LEN + frame.len());
    let mut got = vec![0u8; frame.len()];
    m.read_slice(&mut got, GuestAddress(0x11_0000)).unwrap();
    assert!(got == frame, "the frame arrived intact across the chain");
    assert_eq!(net.stats().rx_dropped, 0);
}

#[test]
fn a_tap_and_a_snapshot_from_before_the_mtu_offer_keep_1500() {
    let (config, _l, _d) = socket_backend("oldmtu");
    let old = NetState {
        mac: MAC,
        avail_features: COMMON_FEATURES | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC,
    };
    let net = Net::restore(&config, &old).unwrap();
    assert_eq!(net.avail_features() & 1 << VIRTIO_NET_F_MTU, 0);
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(mtu, [0, 0], "the restored guest was offered no MTU");
    let name = format!("mtu{}", std::process::id() % 100_000);
    match Net::new(&NetConfig {
        backend: NetBackendConfig::Tap { name },
        mac: MAC,
    }) {
        Ok(n) => assert_eq!(n.avail_features() & 1 << VIRTIO_NET_F_MTU, 0, "tap: no MTU"),
        Err(e) => eprintln!("tap part skipped: cannot create a tap here: {e}"),
    }
}
