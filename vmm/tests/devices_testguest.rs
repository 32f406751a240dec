//! The virtio devices driven by a real guest: the bare-metal test guest's polling drivers
//! (kernels/testguest, modes `blk` and `vsock`) against the VMM's virtio-blk and virtio-vsock,
//! booted in-process.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use snapshot::restore::RestoreMode;
use snapshot::{capture, CaptureRequest, Snapshot};
use vmm::devices::{BlockConfig, DeviceConfig, VsockConfig};
use vmm::{Console, GuestExit, Vm};

const T: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;
const MARKER: &[u8; 16] = b"testguest blksum";

fn blk_config(path: &Path) -> DeviceConfig {
    DeviceConfig {
        blocks: vec![BlockConfig {
            path: path.to_path_buf(),
            read_only: false,
            id: None,
        }],
        ..Default::default()
    }
}

fn vsock_config(uds: &Path) -> DeviceConfig {
    DeviceConfig {
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.to_path_buf(),
        }),
        ..Default::default()
    }
}

/// Waits for the guest to reset on its own; any other end is a failure.
fn expect_reset(vm: Vm, out: &Output) {
    let exit = vm.wait_timeout(Some(T));
    let text = out.text();
    assert!(
        matches!(exit, Ok(Some(GuestExit::Reset))),
        "guest did not reset cleanly ({exit:?}):\n{text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
    eprintln!("{text}");
}

/// Runs `mode=blk blk_sectors=n` on `img` and checks the printed and the written checksum.
fn blk_checksum_round(kernel: &Path, img: &Path, n: usize) {
    let before = std::fs::read(img).unwrap();
    let expected = fnv1a64(&before[..n * SECTOR]);
    let (vm, out) = boot_devices(
        kernel,
        64,
        &format!("mode=blk blk_sectors={n}"),
        blk_config(img),
    );
    expect_reset(vm, &out);
    let text = out.text();

    let read = out.wait_line("testguest: blk read ", Duration::ZERO);
    assert_eq!(
        field(&read, "sectors"),
        Some(n.to_string().as_str()),
        "{read}"
    );
    let sum = field(&read, "sum")
        .and_then(|s| s.strip_prefix("0x"))
        .unwrap();
    assert_eq!(
        u64::from_str_radix(sum, 16).unwrap(),
        expected,
        "the checksum the guest printed is not the host's:\n{text}"
    );
    assert!(
        text.contains(&format!("testguest: blk wrote sector={n}\n")),
        "{text}"
    );

    // Sector n holds the checksum, the count and the marker; nothing else changed.
    let after = std::fs::read(img).unwrap();
    assert_eq!(after.len(), before.len());
    let s = &after[n * SECTOR..(n + 1) * SECTOR];
    assert_eq!(u64::from_le_bytes(s[..8].try_into().unwrap()), expected);
    assert_eq!(u64::from_le_bytes(s[8..16].try_into().unwrap()), n as u64);
    assert_eq!(&s[16..32], MARKER);
    assert!(s[32..].iter().all(|&b| b == 0));
    assert!(
        after[..n * SECTOR] == before[..n * SECTOR],
        "the guest changed the data it read"
    );
    assert!(
        after[(n + 1) * SECTOR..] == before[(n + 1) * SECTOR..],
        "the guest wrote past sector {n}"
    );
}

#[test]
fn blk_guest_reads_host_pattern_and_writes_its_checksum() {
    if !kvm_or_skip("blk_guest_reads_host_pattern_and_writes_its_checksum") {
        return;
    }
    let dir = scratch("blk");
    let kernel = testguest(&dir);
    let img = dir.join("disk.img");
    // 8 MiB: a pattern everywhere, so a write to the wrong place shows.
    std::fs::write(&img, pattern_bytes(8 << 20, 0x5eed)).unwrap();
    // 2048 sectors: 8 full 128 KiB requests; 1001: a partial last request.
    blk_checksum_round(&kernel, &img, 2048);
    blk_checksum_round(&kernel, &img, 1001);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn blk_guest_refuses_a_checksum_sector_past_the_disk() {
    if !kvm_or_skip("blk_guest_refuses_a_checksum_sector_past_the_disk") {
        return;
    }
    let dir = scratch("blk-small");
    let kernel = testguest(&dir);
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 64 * SECTOR]).unwrap();
    let (vm, out) = boot_devices(&kernel, 64, "mode=blk blk_sectors=64", blk_config(&img));
    // The guest stops itself with a triple fault: not a clean reset.
    let exit = vm.wait_timeout(Some(T));
    assert!(!matches!(exit, Ok(Some(GuestExit::Reset))), "{exit:?}");
    let text = out.text();
    let line = text
        .lines()
        .find(|l| l.starts_with("testguest: ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{text}"));
    assert!(line.contains("blk_sectors=64"), "{line}");
    assert!(line.contains("it has 64"), "{line}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn vsock_host_client_gets_1_mib_echoed_by_the_guest() {
    if !kvm_or_skip("vsock_host_client_gets_1_mib_echoed_by_the_guest") {
        return;
    }
    let dir = scratch("vsock-echo");
    let kernel = testguest(&dir);
    let uds = dir.join("vsock.sock");
    let (vm, out) = boot_devices(
        &kernel,
        64,
        "mode=vsock vsock_port=5000",
        vsock_config(&uds),
    );
    let ready = out.wait_line("testguest: vsock ready", T);
    assert_eq!(field(&ready, "cid"), Some("3"), "{ready}");
    assert_eq!(field(&ready, "listen"), Some("5000"), "{ready}");

    // 1 MiB through one connection, written in odd-sized pieces while the echo is read.
    let data = pattern_bytes(1 << 20, 1);
    let s = vsock_connect(&uds, 5000, T);
    let back = echo_through(&s, &data, 50_000);
    assert!(back == data, "the echo differs from what was sent");
    drop(s);
    let closed = out.wait_line("testguest: vsock closed", T);
    assert_eq!(field(&closed, "rx"), Some("1048576"), "{closed}");
    assert_eq!(field(&closed, "tx"), Some("1048576"), "{closed}");
    assert_eq!(field(&closed, "why"), Some("shutdown"), "{closed}");

    // More connections in sequence, then three at once.
    for i in 0..3u64 {
        let data = pattern_bytes(100_000 + i as usize, 10 + i);
        let s = vsock_connect(&uds, 5000, T);
        assert!(echo_through(&s, &data, 4096) == data, "connection {i}");
    }
    let conns: Vec<_> = (0..3).map(|_| vsock_connect(&uds, 5000, T)).collect();
    std::thread::scope(|sc| {
        for (i, s) in conns.iter().enumerate() {
            sc.spawn(move || {
                let data = pattern_bytes(300_000, 100 + i as u64);
                assert!(
                    echo_through(s, &data, 65536) == data,
                    "parallel connection {i}"
                );
            });
        }
    });
    drop(conns);

    // A port nobody listens on is refused: the client sees EOF instead of OK.
    let mut s = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"CONNECT 5001\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));

    let deadline = Instant::now() + T;
    while out.text().matches("testguest: vsock closed").count() < 7 {
        assert!(Instant::now() < deadline, "{}", out.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!out.text().contains("ERROR"), "{}", out.text());
    drop(vm);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn vsock_guest_connects_out_to_a_host_listener() {
    if !kvm_or_skip("vsock_guest_connects_out_to_a_host_listener") {
        return;
    }
    let dir = scratch("vsock-out");
    let kernel = testguest(&dir);
    let uds = dir.join("vsock.sock");
    let listener = UnixListener::bind(dir.join("vsock.sock_6000")).unwrap();
    let (vm, out) = boot_devices(
        &kernel,
        64,
        "mode=vsock vsock_listen=0 vsock_connect=6000",
        vsock_config(&uds),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') && s.read(&mut b).unwrap() == 1 {
            line.push(b[0]);
        }
        s.write_all(b"hello from host\n").unwrap();
        // The guest closes after it got the answer: EOF here.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        tx.send((String::from_utf8(line).unwrap(), rest)).unwrap();
    });
    let (line, rest) = rx.recv_timeout(T).expect("the guest did not connect");
    assert_eq!(line, "hello from guest cid=3\n");
    assert!(rest.is_empty());
    expect_reset(vm, &out);
    let text = out.text();
    assert!(
        text.contains("testguest: vsock connected port=6000 "),
        "{text}"
    );
    assert!(
        text.contains("testguest: vsock reply hello from host\n"),
        "{text}"
    );
    assert!(text.contains("testguest: done mode=vsock\n"), "{text}");

    // Without a listener the connection is refused (RST) and the guest says so.
    let (vm, out) = boot_devices(
        &kernel,
        64,
        "mode=vsock vsock_listen=0 vsock_connect=6001",
        vsock_config(&uds),
    );
    expect_reset(vm, &out);
    assert!(
        out.text()
            .contains("testguest: vsock connect refused port=6001\n"),
        "{}",
        out.text()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn restore_with(
    snap: &Snapshot,
    kernel: &Path,
    memory_mode: RestoreMode,
    devices: Option<DeviceConfig>,
) -> (Vm, Output) {
    let out = Output::default();
    let vm = restore_snapshot(SnapshotRestore {
        snapshot: snap,
        kernel: Some(kernel),
        verify_contents: true,
        memory_mode,
        console: Console::Writer(Box::new(out.clone())),
        paused: false,
        devices,
    })
    .unwrap();
    (vm, out)
}

#[test]
fn vsock_snapshot_with_an_open_connection_resets_it_and_listens_again() {
    if !kvm_or_skip("vsock_snapshot_with_an_open_connection_resets_it_and_listens_again") {
        return;
    }
    let dir = scratch("vsock-snap");
    let kernel = testguest(&dir);
    let uds = dir.join("vsock.sock");
    let cmdline = "mode=vsock vsock_port=5000";
    let (src, src_out) = boot_devices(&kernel, 64, cmdline, vsock_config(&uds));
    src_out.wait_line("testguest: vsock ready", T);

    // An echo connection, open while the snapshot is taken.
    let old = vsock_connect(&uds, 5000, T);
    let first = pattern_bytes(200_000, 7);
    assert!(echo_through(&old, &first, 8192) == first);
    src_out.wait_line("testguest: vsock accepted", T);
    src.pause().unwrap();
    let snaps = dir.join("snapshots");
    capture(
        &src,
        &CaptureRequest {
            dir: &snaps,
            tag: "open-conn",
            kernel: &kernel,
            cmdline,
            rootfs: None,
            image: None,
            workspace: Some("test"),
            note: None,
            parent: None,
            secrets: None,
        },
        &mut |_| {},
    )
    .unwrap();
    let snap = Snapshot::open(&snaps.join("open-conn")).unwrap();
    src.resume().unwrap();

    // The source keeps its connection.
    let more = pattern_bytes(50_000, 8);
    assert!(echo_through(&old, &more, 8192) == more);

    // A fork with its own vsock socket: its copy of the connection is reset (the host end did
    // not survive), its listener is still there.
    let fork_uds = dir.join("fork.sock");
    let (fork, out) = restore_with(
        &snap,
        &kernel,
        RestoreMode::PrivateMap,
        Some(vsock_config(&fork_uds)),
    );
    let reset = out.wait_line("testguest: vsock transport reset", T);
    assert_eq!(field(&reset, "dropped"), Some("1"), "{reset}");
    assert_eq!(field(&reset, "cid"), Some("3"), "{reset}");
    let dropped = out.wait_line("testguest: vsock closed", T);
    assert_eq!(field(&dropped, "why"), Some("transport_reset"), "{dropped}");

    let data = pattern_bytes(1 << 20, 9);
    let s = try_vsock_connect(&fork_uds, 5000, T)
        .unwrap_or_else(|e| panic!("{e}; the fork printed:\n{}", out.text()));
    assert!(
        echo_through(&s, &data, 65536) == data,
        "a new connection to the fork"
    );
    drop(s);

    // Back on the source, the old connection still echoes; the fork never saw its bytes.
    assert!(echo_through(&old, &more, 8192) == more);
    drop(old);
    src_out.wait_line("testguest: vsock closed", T);
    assert!(
        !src_out.text().contains("transport reset"),
        "{}",
        src_out.text()
    );
    assert!(!out.text().contains("ERROR"), "{}", out.text());
    drop(fork);

    // Restore in place of the source (its saved device configuration, the same socket path):
    // the source's client sees its connection end, the restored guest drops its copy and
    // echoes on a new connection.
    let old = vsock_connect(&uds, 5000, T);
    assert!(echo_through(&old, &more, 8192) == more);
    drop(src);
    let mut rest = Vec::new();
    let _ = (&old).read_to_end(&mut rest);
    assert!(rest.is_empty(), "the old connection outlived its VM");
    let (vm, out) = restore_with(&snap, &kernel, RestoreMode::Eager, None);
    let reset = out.wait_line("testguest: vsock transport reset", T);
    assert_eq!(field(&reset, "dropped"), Some("1"), "{reset}");
    let s = try_vsock_connect(&uds, 5000, T)
        .unwrap_or_else(|e| panic!("{e}; the restored guest printed:\n{}", out.text()));
    assert!(
        echo_through(&s, &data, 65536) == data,
        "a new connection after restore"
    );
    drop(s);
    let deadline = Instant::now() + T;
    while !out.text().contains("rx=1048576 tx=1048576 why=shutdown") {
        assert!(Instant::now() < deadline, "{}", out.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!out.text().contains("ERROR"), "{}", out.text());
    drop(vm);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Exposes lost work in the device side of virtio (`drain_queue` in
/// vmm/src/devices/virtio/mod.rs). A driver that publishes its next request while the device
/// is draining sees VRING_USED_F_NO_NOTIFY and rightly does not kick; the device's
/// `enable_notification` then reports the new request and the drain goes on, but only for 64
/// passes: a driver that keeps exactly one request in flight makes every pass pop one request,
/// and after the 64th the loop ends with notifications enabled and a request nobody will kick
/// for. (Also: a pass that pops nothing and then sees `Ok(true)` stops the same way.) The test
/// guest re-notifies after `rescue_ms` without progress when its last kick was suppressed and
/// counts it (`rescue_kicks=`); with blk_depth=1 over ~650 requests this shows in most runs.
/// Checked: with an unbounded pass loop the test passes; a bounded loop must instead re-signal
/// the queue's own eventfd (e.g. `Drained { more: true }` and the caller writes its queue
/// event) so the event loop comes back after serving others.
#[test]
fn blk_device_never_loses_a_notification() {
    if !kvm_or_skip("blk_device_never_loses_a_notification") {
        return;
    }
    let dir = scratch("blk-lost-kick");
    let kernel = testguest(&dir);
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![1u8; 64 << 20]).unwrap();
    for run in 0..3 {
        let (vm, out) = boot_devices(
            &kernel,
            64,
            "mode=blk blk_bench=1 blk_depth=1 blk_write_mib=16 rescue_ms=10000",
            blk_config(&img),
        );
        expect_reset(vm, &out);
        let kicks = out.wait_line("testguest: virtio kicks=", Duration::ZERO);
        assert_eq!(
            field(&kicks, "rescue_kicks"),
            Some("0"),
            "run {run}: a request waited 10 s for a notification the device had dropped:\n{}",
            out.text()
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
