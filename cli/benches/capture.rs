//! Capture throughput: `snapshot::capture` of a full-touch test guest (in-process, the VM
//! paused), against `dd bs=1M conv=fsync` writing the same number of bytes to the same
//! filesystem (from /dev/zero, and from a tmpfs copy of the guest's memory, which like a capture
//! reads real data), and QEMU's `migrate` to `exec:cat > FILE` plus an fsync of that file: one
//! guest per tool and size, the tools' order rotating between repetitions, one run.
//!
//! MiB/s is bytes on disk / seconds: for microagent the snapshot directory's allocated bytes
//! (memory.bin without its zero pages, vmstate.bin, pages.bin, manifest.json), for dd the same
//! count rounded up to MiB, for QEMU its migration stream's size.
//!
//! `cargo bench -p microagent --bench capture`
//!   `MICROAGENT_BENCH_SIZES=256,1024` (MiB, the default)
//!   `MICROAGENT_BENCH_REPS=N` (default 5)
//!   `MICROAGENT_BENCH_DIR=/path` (scratch space on the filesystem under test; default the temp dir)
//!   `MICROAGENT_BENCH_WARM=0` (no warm-up before each timed phase)

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use snapshot::{capture, CaptureRequest, Progress};
use vm_memory::{Address, Bytes};
use vmm::{Console, Vm, VmConfig};

const MIB: u64 = 1 << 20;
const FILL_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

fn cmdline(size: u64) -> String {
    format!("mode=counter mem={} tick_ms=0", size - 16)
}

/// Allocated bytes of a file, or of every file in a directory.
fn allocated(p: &Path) -> u64 {
    let Ok(m) = std::fs::metadata(p) else {
        return 0;
    };
    if m.is_file() {
        return m.blocks() * 512;
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| allocated(&e.path())).sum())
        .unwrap_or(0)
}

fn mem_available_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Touches and frees `mib` MiB of anonymous memory before a timed phase, for every tool alike.
/// This development machine is itself a guest whose free page reporting hands memory freed a
/// few seconds ago back to its host: page cache allocated from it costs a fault in the outer
/// host (~10x slower writes; see the snapshot bench's components table). Touching it first
/// gives every tool the memory a host without that layer would give it.
fn warm(mib: u64) {
    if std::env::var("MICROAGENT_BENCH_WARM").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let len = ((mib + 256).min(mem_available_mib().saturating_sub(1024)) * MIB) as usize;
    if len == 0 {
        return;
    }
    // SAFETY: a private anonymous mapping of `len` bytes, written only inside it, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return;
        }
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        let b = p.cast::<u8>();
        for i in (0..len).step_by(4096) {
            b.add(i).write_volatile(1);
        }
        libc::munmap(p, len);
    }
}

/// Waits for the ready line, then until every vCPU has counted twice (all its pattern memory
/// written and verified).
fn settle(log: &LineLog, vcpus: usize) -> Result<(), String> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    log.wait_from(0, deadline, "the ready line", |l| {
        l.starts_with("testguest: ready").then_some(())
    })?;
    log.wait_all_counts(vcpus, 2, deadline)?;
    Ok(())
}

/// One timed capture: seconds, bytes on disk, and its phases (before the memory loop, the
/// loop, after it: fsync, manifest, rename).
struct Ours {
    secs: f64,
    bytes: u64,
    phases: [f64; 3],
}

fn ours(vm: &Vm, elf: &Path, snaps: &Path, size: u64, tag: &str) -> Result<Ours, String> {
    let cmd = cmdline(size);
    let mut marks: Vec<Instant> = Vec::new();
    warm(size);
    let t0 = Instant::now();
    capture(
        vm,
        &CaptureRequest {
            dir: snaps,
            tag,
            kernel: elf,
            cmdline: &cmd,
            rootfs: None,
            image: None,
            workspace: None,
            note: None,
            parent: None,
            secrets: None,
        },
        &mut |p| {
            if matches!(p, Progress::Memory { .. }) {
                marks.push(Instant::now());
            }
        },
    )
    .map_err(|e| format!("capture: {e}"))?;
    let t_end = Instant::now();
    let dir = snaps.join(tag);
    let bytes = allocated(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    // One progress mark per 4 MiB chunk written; the first comes one chunk into the loop.
    let phases = match (marks.first(), marks.last()) {
        (Some(&first), Some(&last)) if marks.len() > 1 => {
            let chunk = secs(last - first) / (marks.len() - 1) as f64;
            let pre = (secs(first - t0) - chunk).max(0.0);
            [pre, secs(last - t0) - pre, secs(t_end - last)]
        }
        _ => [f64::NAN; 3],
    };
    Ok(Ours {
        secs: secs(t_end - t0),
        bytes,
        phases,
    })
}

/// `dd if=SRC of=DST bs=1M count=MIB conv=fsync`, timed from spawn to exit.
fn dd(src: &Path, dst: &Path, mib: u64, size: u64) -> Result<f64, String> {
    let _ = std::fs::remove_file(dst);
    warm(size);
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync"])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let s = secs(t.elapsed());
    let _ = std::fs::remove_file(dst);
    if !out.status.success() {
        return Err(format!("dd: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(s)
}

/// A tmpfs file holding the guest's memory, for dd to read real data from memory.
fn tmpfs_copy(vm: &Vm, size: u64) -> Result<PathBuf, String> {
    use std::io::Write;
    let p = PathBuf::from(format!("/dev/shm/ma-capture-{}.bin", std::process::id()));
    let mut f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mem = vm.memory();
    let mut buf = vec![0u8; 4 << 20];
    for (start, len) in vmm::memory::ram_ranges(size * MIB) {
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], start.unchecked_add(off))
                .map_err(|e| format!("read guest memory: {e}"))?;
            f.write_all(&buf[..n]).map_err(|e| format!("tmpfs: {e}"))?;
            off += n as u64;
        }
    }
    Ok(p)
}

/// A stopped QEMU guest, migrated to a file again for each repetition.
struct Qemu {
    proc: Proc,
    qmp: Qmp,
}

impl Qemu {
    fn start(dir: &Path, elf: &Path, size: u64) -> Result<Self, String> {
        let sock = dir.join("q.sock");
        let _ = std::fs::remove_file(&sock);
        let mut c = qemu_command(elf, size, 1, &cmdline(size));
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        let proc = Proc::spawn(&mut c)?;
        let mut qmp = Qmp::connect(&sock, Instant::now() + Duration::from_secs(30))
            .map_err(|e| format!("{e}\n{}", proc.tails()))?;
        // A save to file should not be capped (QEMU 7.2 caps migration at 128 MiB/s).
        qmp.cmd(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
        )?;
        settle(&proc.out, 1).map_err(|e| format!("{e}\n{}", proc.tails()))?;
        qmp.cmd("stop", None)?;
        Ok(Self { proc, qmp })
    }

    /// Migrates to `file` through `cat`, then fsyncs it (coreutils `sync FILE`), timed to the
    /// fsync's end: (seconds, migration done, bytes).
    fn save(&mut self, file: &Path, size: u64) -> Result<(f64, f64, u64), String> {
        let done = file.with_extension("done");
        let _ = std::fs::remove_file(file);
        let _ = std::fs::remove_file(&done);
        let uri = format!(
            "exec:cat > {f} && sync {f} && touch {d}",
            f = file.display(),
            d = done.display()
        );
        warm(size);
        let t0 = Instant::now();
        self.qmp
            .cmd("migrate", Some(serde_json::json!({ "uri": uri })))?;
        let mut migrated = f64::NAN;
        let deadline = t0 + STEP_TIMEOUT;
        while !done.exists() {
            if migrated.is_nan() {
                let r = self.qmp.cmd("query-migrate", None)?;
                match r.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => migrated = secs(t0.elapsed()),
                    Some("failed") | Some("cancelled") => {
                        return Err(format!("migration failed: {r}"))
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err("the migration and fsync did not finish".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = secs(t0.elapsed());
        // QEMU refuses to migrate a guest paused by a migration again: resume and stop it.
        self.qmp.cmd("cont", None)?;
        self.qmp.cmd("stop", None)?;
        let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(file);
        let _ = std::fs::remove_file(&done);
        Ok((s, migrated, bytes))
    }

    fn quit(mut self) {
        let _ = self.qmp.cmd("quit", None);
        let _ = self
            .proc
            .wait_exit(Instant::now() + Duration::from_secs(30));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Ours,
    DdZero,
    DdTmpfs,
    Qemu,
}

fn main() {
    if !have_kvm() {
        println!("capture benchmark skipped: /dev/kvm is not available");
        return;
    }
    let sizes: Vec<u64> = std::env::var("MICROAGENT_BENCH_SIZES")
        .ok()
        .map(|s| {
            s.split(',')
                .filter_map(|v| v.trim().parse().ok())
                .filter(|v| *v >= 64)
                .collect()
        })
        .unwrap_or_else(|| vec![256, 1024]);
    let reps = env_usize("MICROAGENT_BENCH_REPS", 5);
    let with_qemu = have_qemu();
    if !with_qemu {
        println!("{QEMU} not found: QEMU rows skipped");
    }
    let dir = scratch("capture");
    let elf = testguest(&dir);
    println!(
        "capture throughput: sizes {sizes:?} MiB (full-touch test guest, 1 vCPU), {reps} \
         repetitions, tool order rotating, medians; scratch {}",
        dir.display()
    );

    let mut rows = Vec::new();
    let mut phase_rows = Vec::new();
    for &size in &sizes {
        let need = 3 * size + 2048;
        if mem_available_mib() < need {
            println!("{size} MiB skipped: needs {need} MiB of available RAM");
            continue;
        }
        let log = LineLog::new();
        let vm = match Vm::boot(VmConfig {
            kernel: elf.clone(),
            initrd: None,
            cmdline: cmdline(size),
            mem_mib: size,
            vcpus: 1,
            console: Console::Writer(Box::new(log.clone())),
            devices: Default::default(),
        }) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("{size} MiB: boot: {e}");
                continue;
            }
        };
        if let Err(e) = settle(&log, 1).and_then(|()| vm.pause().map_err(|e| e.to_string())) {
            eprintln!("{size} MiB: {e}\n{}", log.tail(10));
            continue;
        }
        let mut qemu = if with_qemu {
            Qemu::start(&dir, &elf, size)
                .map_err(|e| eprintln!("{size} MiB: qemu: {e}"))
                .ok()
        } else {
            None
        };
        let snaps = dir.join("snaps");
        // An untimed capture first: the byte count dd writes, and every path's first use.
        let bytes = match ours(&vm, &elf, &snaps, size, "first") {
            Ok(o) => o.bytes,
            Err(e) => {
                eprintln!("{size} MiB: {e}");
                continue;
            }
        };
        let dd_mib = bytes.div_ceil(MIB);
        let shm = match tmpfs_copy(&vm, size) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{size} MiB: {e}");
                None
            }
        };

        let tools = [Tool::Ours, Tool::DdZero, Tool::DdTmpfs, Tool::Qemu];
        let (mut t_ours, mut t_zero, mut t_tmpfs, mut t_qemu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut phases: [Vec<f64>; 3] = Default::default();
        let (mut q_bytes, mut q_migrated) = (0u64, Vec::new());
        let dd_out = dir.join("dd.bin");
        for rep in 0..reps {
            for k in 0..tools.len() {
                match tools[(rep + k) % tools.len()] {
                    Tool::Ours => match ours(&vm, &elf, &snaps, size, &format!("r{rep}")) {
                        Ok(o) => {
                            t_ours.push(o.secs);
                            for (v, p) in phases.iter_mut().zip(o.phases) {
                                v.push(p);
                            }
                        }
                        Err(e) => eprintln!("{size} MiB rep {rep}: {e}"),
                    },
                    Tool::DdZero => match dd(Path::new("/dev/zero"), &dd_out, dd_mib, size) {
                        Ok(s) => t_zero.push(s),
                        Err(e) => eprintln!("{size} MiB rep {rep}: {e}"),
                    },
                    Tool::DdTmpfs => {
                        if let Some(src) = &shm {
                            match dd(src, &dd_out, dd_mib, size) {
                                Ok(s) => t_tmpfs.push(s),
                                Err(e) => eprintln!("{size} MiB rep {rep}: {e}"),
                            }
                        }
                    }
                    Tool::Qemu => {
                        if let Some(q) = qemu.as_mut() {
                            match q.save(&dir.join("qemu.bin"), size) {
                                Ok((s, m, b)) => {
                                    t_qemu.push(s);
                                    q_migrated.push(m);
                                    q_bytes = b;
                                }
                                Err(e) => eprintln!("{size} MiB rep {rep}: qemu: {e}"),
                            }
                        }
                    }
                }
            }
            println!(
                "  {size} MiB rep {rep}: microagent {} s, dd zero {} s, dd tmpfs {} s, qemu {} s",
                f(t_ours.last().copied().unwrap_or(f64::NAN), 3),
                f(t_zero.last().copied().unwrap_or(f64::NAN), 3),
                f(t_tmpfs.last().copied().unwrap_or(f64::NAN), 3),
                f(t_qemu.last().copied().unwrap_or(f64::NAN), 3),
            );
        }
        if let Some(q) = qemu.take() {
            q.quit();
        }
        if let Some(p) = &shm {
            let _ = std::fs::remove_file(p);
        }
        drop(vm);

        let rate = |b: u64, s: f64| b as f64 / MIB as f64 / s;
        let ours_rate = rate(bytes, median(&t_ours));
        let mut row = |tool: &str, b: u64, v: &[f64]| {
            let r = rate(b, median(v));
            rows.push(vec![
                size.to_string(),
                tool.to_string(),
                f(b as f64 / MIB as f64, 1),
                format!("{}/{reps}", v.len()),
                f(median(v), 3),
                f(r, 0),
                ratio(ours_rate, r),
            ]);
        };
        row("microagent capture", bytes, &t_ours);
        row("dd if=/dev/zero conv=fsync", dd_mib * MIB, &t_zero);
        row("dd if=tmpfs conv=fsync", dd_mib * MIB, &t_tmpfs);
        if with_qemu {
            row("qemu migrate + fsync", q_bytes, &t_qemu);
        }
        phase_rows.push(vec![
            size.to_string(),
            f(median(&phases[0]), 3),
            f(median(&phases[1]), 3),
            f(median(&phases[2]), 3),
            f(median(&q_migrated), 3),
        ]);
    }
    println!();
    println!("Capture throughput, medians (MiB/s = MiB on disk / s; microagent / tool = ratio of MiB/s):");
    print_table(
        &[
            "size MiB",
            "tool",
            "MiB on disk",
            "ok",
            "s",
            "MiB/s",
            "microagent / tool",
        ],
        &rows,
    );
    println!("Where the time goes, medians, s:");
    print_table(
        &[
            "size MiB",
            "microagent: before memory (sha256 of kernel, save, vmstate)",
            "memory loop",
            "fsync + manifest + rename",
            "qemu: migration completed",
        ],
        &phase_rows,
    );
    let _ = std::fs::remove_dir_all(dir);
}
