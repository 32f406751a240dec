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
