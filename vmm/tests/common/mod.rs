//! Booting the bare-metal test guest in-process and reading what it prints.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapshot::restore::{RestoreError, RestoreMode, RestoreOptions};
use vmm::devices::DeviceConfig;
use vmm::snapshots::RestoreArgs;
use vmm::{Console, Vm, VmConfig, VmError};

#[path = "../../../tests/common/require.rs"]
pub mod require;

pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    require::skip(test, "kvm", "/dev/kvm is not available on this host");
    false
}

/// A console that keeps everything the guest printed.
#[derive(Clone, Default)]
pub struct Output(pub Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The latest `cpu<i> count=<n>` per vCPU.
    pub fn last_counts(&self, vcpus: usize) -> Vec<Option<u64>> {
        let mut out = vec![None; vcpus];
        for (cpu, n) in counts(&self.text()) {
            if (cpu as usize) < vcpus {
                out[cpu as usize] = Some(n);
            }
        }
        out
    }

    /// The first count each vCPU printed.
    pub fn first_counts(&self, vcpus: usize) -> Vec<Option<u64>> {
        let mut out = vec![None; vcpus];
        for (cpu, n) in counts(&self.text()) {
            if (cpu as usize) < vcpus && out[cpu as usize].is_none() {
                out[cpu as usize] = Some(n);
            }
        }
        out
    }

    /// Waits until every vCPU printed a count above `floor[i]`.
    pub fn wait_counts_above(&self, floor: &[u64], timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.last_counts(floor.len());
            if last
                .iter()
                .zip(floor)
                .all(|(l, f)| l.is_some_and(|l| l > *f))
            {
                return last.into_iter().map(|l| l.unwrap_or(0)).collect();
            }
            assert!(
                !self.text().contains("ERROR"),
                "guest error:\n{}",
                self.text()
            );
            assert!(
                Instant::now() < deadline,
                "counts did not pass {floor:?} in {timeout:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The guest-physical address of each vCPU's counter (`layout=1` lines).
    pub fn state_addrs(&self, vcpus: usize) -> Vec<u64> {
        let text = self.text();
        (0..vcpus)
            .map(|cpu| {
                let prefix = format!("testguest: layout cpu={cpu} ");
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&prefix))
                    .unwrap_or_else(|| panic!("no layout line for cpu{cpu}:\n{text}"));
                let v = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("state=0x"))
                    .unwrap();
                u64::from_str_radix(v, 16).unwrap()
            })
            .collect()
    }
}

pub fn counts(out: &str) -> Vec<(u32, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cpu")?;
            let (cpu, count) = rest.split_once(" count=")?;
            Some((cpu.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

static N: AtomicU64 = AtomicU64::new(0);

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "vmm-it-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes the embedded test guest to `dir/testguest.elf`.
pub fn testguest(dir: &Path) -> PathBuf {
    let p = dir.join("testguest.elf");
    std::fs::write(&p, testguest_elf::ELF).unwrap();
    p
}

pub const CMDLINE: &str = "mode=counter mem=2 tick_ms=2 layout=1";

pub fn boot(kernel: &Path, vcpus: u8, mem_mib: u64, cmdline: &str) -> (Vm, Output) {
    let out = Output::default();
    let vm = Vm::boot(VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: cmdline.to_string(),
        mem_mib,
        vcpus,
        console: Console::Writer(Box::new(out.clone())),
        devices: Default::default(),
    })
    .unwrap();
    (vm, out)
}

/// How a test brings a snapshot back.
pub struct SnapshotRestore<'a> {
    pub snapshot: &'a snapshot::Snapshot,
    /// The kernel the guest was booted with; refused if its sha256 differs.
    pub kernel: Option<&'a Path>,
    /// Re-read every file and compare digests before restoring.
    pub verify_contents: bool,
    pub memory_mode: RestoreMode,
    pub console: Console,
    pub paused: bool,
    pub devices: Option<DeviceConfig>,
}

/// The engine's restore of a `Vm` (as the CLI's VMM process does it), memory from the files.
pub fn restore_snapshot(r: SnapshotRestore<'_>) -> Result<Vm, RestoreError<VmError>> {
    snapshot::restore::restore::<Vm>(
        r.snapshot,
        &RestoreOptions {
            kernel: r.kernel,
            verify_contents: r.verify_contents,
            memory_mode: r.memory_mode,
            page_server: None,
            label: "test",
        },
        RestoreArgs {
            console: r.console,
            paused: r.paused,
            devices: r.devices,
        },
    )
}

pub fn restore(
    snap: &snapshot::Snapshot,
    kernel: &Path,
    mode: RestoreMode,
    paused: bool,
) -> (Vm, Output) {
    let out = Output::default();
    let vm = restore_snapshot(SnapshotRestore {
        snapshot: snap,
        kernel: Some(kernel),
        verify_contents: true,
        memory_mode: mode,
        console: Console::Writer(Box::new(out.clone())),
        paused,
        devices: None,
    })
    .unwrap();
    (vm, out)
}

/// Each vCPU's counter straight from guest memory.
pub fn memory_counts(vm: &Vm, addrs: &[u64]) -> Vec<u64> {
    use vm_memory::{Bytes, GuestAddress};
    addrs
        .iter()
        .map(|a| vm.memory().read_obj::<u64>(GuestAddress(*a)).unwrap())
        .collect()
}

/// Each vCPU's counter as saved in a snapshot's memory file.
pub fn file_counts(snap: &snapshot::Snapshot, addrs: &[u64]) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(snap.memory_path()).unwrap();
    addrs
        .iter()
        .map(|a| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, *a).unwrap();
            u64::from_le_bytes(b)
        })
        .collect()
}

// ---------------------------------------------------------------- virtio devices (test guest
// modes blk and vsock)

/// Boots the test guest with virtio devices.
pub fn boot_devices(
    kernel: &Path,
    mem_mib: u64,
    cmdline: &str,
    devices: vmm::devices::DeviceConfig,
) -> (Vm, Output) {
    let out = Output::default();
    let vm = Vm::boot(VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: cmdline.to_string(),
        mem_mib,
        vcpus: 1,
        console: Console::Writer(Box::new(out.clone())),
        devices,
    })
    .unwrap();
    (vm, out)
}

impl Output {
    /// Waits for a line starting with `prefix` and returns it; fails on a guest ERROR, an
    /// exception or a panic line.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
                if text.contains(&format!("{l}\n")) {
                    return l.to_string();
                }
            }
            assert!(
                !text.contains("testguest: ERROR")
                    && !text.contains("testguest: exception")
                    && !text.contains("testguest: panic"),
                "guest failed while waiting for {prefix:?}:\n{text}"
            );
            assert!(
                Instant::now() < deadline,
                "no line {prefix:?} in {timeout:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The value of `key=` in a guest output line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// FNV-1a 64 over `bytes`, as the test guest's blk mode computes it.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A host client of the VM's hybrid vsock socket: `CONNECT <port>\n`, then `OK <n>\n`.
pub fn vsock_connect(uds: &Path, port: u32, timeout: Duration) -> std::os::unix::net::UnixStream {
    try_vsock_connect(uds, port, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// `vsock_connect` that reports what went wrong instead of panicking.
pub fn try_vsock_connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("cannot connect to {uds:?}: {e}")),
        }
    };
    let io = |e: std::io::Error| format!("vsock CONNECT {port}: {e}");
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io)?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b).map_err(io)? != 1 {
            return Err(format!(
                "vsock socket closed before OK for CONNECT {port} (got {:?})",
                String::from_utf8_lossy(&line)
            ));
        }
        line.push(b[0]);
        if line.len() >= 64 {
            return Err(format!(
                "bad answer to CONNECT: {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !(line.starts_with("OK ") && line[3..].trim().parse::<u32>().is_ok()) {
        return Err(format!("bad answer to CONNECT: {line:?}"));
    }
    Ok(s)
}

/// Sends `data` through an echo connection (from another thread) while reading the echo;
/// returns what came back.
pub fn echo_through(s: &std::os::unix::net::UnixStream, data: &[u8], chunk: usize) -> Vec<u8> {
    use std::io::Read;
    let mut back = vec![0u8; data.len()];
    std::thread::scope(|sc| {
        let mut w = s.try_clone().unwrap();
        sc.spawn(move || {
            for c in data.chunks(chunk) {
                w.write_all(c).unwrap();
            }
        });
        let mut r = s.try_clone().unwrap();
        r.read_exact(&mut back).unwrap();
    });
    back
}
