//! Snapshot benchmark: capture and restore of a test guest that has touched all of its memory,
//! microagent (in-process `snapshot::capture` / `snapshot::restore::restore::<Vm>`, eager and MAP_PRIVATE)
//! against QEMU (`migrate` to `exec:cat > FILE`, `-incoming "exec:cat FILE"`), same guest, same
//! memory size, side by side in one run.
//!
//! Per guest size and repetition, for each tool (the order alternates between repetitions):
//! boot the test guest in counter mode with its pattern regions covering all but 16 MiB of RAM,
//! wait until every vCPU's count is at least 2 (the whole region written and verified), pause
//! right after a `cpu0 count=` line, capture (timed), drop the source, restore (timed from the
//! restore call, or QEMU's launch, to the first new `cpu0 count=` line, then the round after).
//! Pausing right after a count line puts the next count one whole guest round away for both
//! tools; the "round" columns show how long a round takes in steady state.
//!
//! `cargo bench -p microagent --bench snapshot`
//!   `MICROAGENT_BENCH_SIZES=256,1024` (MiB, default 256,1024,4096)
//!   `MICROAGENT_BENCH_REPS=N` (default 3)
//!   `MICROAGENT_BENCH_DIR=/path` (scratch space; default the temp dir)

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use snapshot::restore::{RestoreMode, RestoreOptions};
use snapshot::{capture, CaptureRequest, Progress, Snapshot, VerifyOptions};
use vmm::snapshots::RestoreArgs;
use vmm::{Console, Vm, VmConfig};

const MIB: u64 = 1 << 20;
/// Booting and filling a 4 GiB guest without huge pages takes over a minute here.
const FILL_TIMEOUT: Duration = Duration::from_secs(900);
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// vCPUs and MiB of pattern memory per vCPU for a guest of `size` MiB. Both VMMs put RAM below
/// 3 GiB and the rest from 4 GiB up, and a vCPU's region must lie in one RAM range: up to 3 GiB
/// one vCPU covers it all; above, regions of under 1 GiB fill both ranges.
fn layout(size: u64) -> (u8, u64) {
    if size <= 3072 {
        (1, size - 16)
    } else {
        let n = size.div_ceil(1024);
        (n as u8, (size - 16) / n)
    }
}

fn cmdline(per_vcpu: u64) -> String {
    format!("mode=counter mem={per_vcpu} tick_ms=0")
}

/// How a restore went, in seconds from the restore call (or QEMU's launch).
#[derive(Clone, Copy)]
struct Restore {
    /// microagent: the engine's restore returned (memory loaded, vCPUs started);
    /// QEMU: the incoming migration finished (run state `paused`).
    ready: f64,
    /// The first new `cpu0 count=` line.
    first: f64,
    /// From that line to the next one: the first full guest round after the restore.
    next_round: f64,
}

const NO_RESTORE: Restore = Restore {
    ready: f64::NAN,
    first: f64::NAN,
    next_round: f64::NAN,
};

struct Rep {
    /// Boot to every vCPU at count >= 2.
    fill: f64,
    /// From the ready line to the first cpu0 count: fill(0) + verify + fill(1), all first
    /// touches of cpu0's region included.
    first_round: f64,
    /// Steady-state cpu0 round just before the capture.
    round: f64,
    /// Anonymous huge pages backing the guest at capture time (MiB).
    thp_mib: f64,
    capture: f64,
    /// microagent: time before the memory copy (state, kernel sha256, vmstate.bin + fsync),
    /// the copy loop (read, xxh3, zero-page check, write), and fsync + manifest + rename.
    /// QEMU: `total-time` it reports, and a later fsync of the file (not part of `capture`).
    breakdown: [f64; 3],
    /// microagent only, on the paused source after the capture (MiB/s): reading all of guest
    /// memory through `read_slice`, and `snapshot::memfile::write_memory` to a fresh file
    /// (the capture's copy loop alone, no fsync).
    diag_read: f64,
    diag_copy: f64,
    alloc: u64,
    apparent: u64,
    restores: Vec<Restore>,
    /// microagent only: re-reading the snapshot and checking every digest (what
    /// `verify_contents: true` adds to a restore).
    verify: f64,
}

/// " (k of n failed)" when some repetitions' restore `k` failed, else "".
fn failures(v: &[Rep], k: usize) -> String {
    let bad = v
        .iter()
        .filter(|r| !r.restores[k].first.is_finite())
        .count();
    if bad == 0 {
        String::new()
    } else {
        format!(" ({bad} of {} failed)", v.len())
    }
}

fn failed_rep(n_restores: usize) -> Rep {
    Rep {
        fill: f64::NAN,
        first_round: f64::NAN,
        round: f64::NAN,
        thp_mib: f64::NAN,
        capture: f64::NAN,
        breakdown: [f64::NAN; 3],
        diag_read: f64::NAN,
        diag_copy: f64::NAN,
        alloc: 0,
        apparent: 0,
        restores: vec![NO_RESTORE; n_restores],
        verify: f64::NAN,
    }
}

/// (allocated bytes, apparent bytes) of a file or of every file in a directory.
fn disk_usage(p: &Path) -> (u64, u64) {
    let Ok(m) = std::fs::metadata(p) else {
        return (0, 0);
    };
    if m.is_file() {
        return (m.blocks() * 512, m.len());
    }
    let mut t = (0, 0);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let (a, b) = disk_usage(&e.path());
            t.0 += a;
            t.1 += b;
        }
    }
    t
}

fn anon_huge_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn mem_available_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn disk_free_mib(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64 / MIB
    }
}

struct Settled {
    fill: f64,
    first_round: f64,
    round: f64,
    /// The count of the cpu0 line the guest should be paused right after.
    saved: u64,
}

/// Waits for the ready line and the first cpu0 count, until every vCPU is at count >= 2, then
/// for two more cpu0 lines (the steady round between them). The caller pauses right after.
fn settle(log: &LineLog, vcpus: usize, t_boot: Instant) -> Result<Settled, String> {
    let deadline = t_boot + FILL_TIMEOUT;
    let (ri, tr, ()) = log.wait_from(0, deadline, "the ready line", |l| {
        l.starts_with("testguest: ready").then_some(())
    })?;
    let (_, t1, _) = log.wait_count(ri, 0, 0, deadline)?;
    let from = log.wait_all_counts(vcpus, 2, deadline)?;
    let fill = secs(t_boot.elapsed());
    let deadline = Instant::now() + STEP_TIMEOUT;
    let (i, ta, n) = log.wait_count(from, 0, 0, deadline)?;
    let (_, tb, n) = log.wait_count(i + 1, 0, n, deadline)?;
    Ok(Settled {
        fill,
        first_round: secs(t1 - tr),
        round: secs(tb - ta),
        saved: n,
    })
}

/// After a restore started at `t0`: the first cpu0 count above `saved`, and the next one.
fn after_restore(log: &LineLog, t0: Instant, saved: u64) -> Result<(f64, f64), String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let (i, t1, n) = log.wait_count(0, 0, saved, deadline)?;
    let (_, t2, _) = log.wait_count(i + 1, 0, n, deadline)?;
    if let Some(l) = log.has_failure() {
        return Err(format!("restored guest failed: {l}"));
    }
    Ok((secs(t1 - t0), secs(t2 - t1)))
}

// ---------------------------------------------------------------------------------------------
// microagent

fn microagent_rep(dir: &Path, elf: &Path, size: u64) -> Result<Rep, String> {
    let (vcpus, per) = layout(size);
    let cmd = cmdline(per);
    let log = LineLog::new();
    let t_boot = Instant::now();
    let vm = Vm::boot(VmConfig {
        kernel: elf.to_path_buf(),
        initrd: None,
        cmdline: cmd.clone(),
        mem_mib: size,
        vcpus,
        console: Console::Writer(Box::new(log.clone())),
        devices: Default::default(),
    })
    .map_err(|e| format!("boot: {e}"))?;
    let st = settle(&log, vcpus as usize, t_boot).map_err(|e| format!("{e}\n{}", log.tail(10)))?;
    vm.pause().map_err(|e| format!("pause: {e}"))?;
    let thp_mib = anon_huge_mib(std::process::id());

    let snaps = dir.join("ma-snaps");
    let mut marks: Vec<(Instant, Progress)> = Vec::new();
    warm(size);
    let t0 = Instant::now();
    capture(
        &vm,
        &CaptureRequest {
            dir: &snaps,
            tag: "bench",
            kernel: elf,
            cmdline: &cmd,
            rootfs: None,
            image: None,
            workspace: None,
            note: None,
            parent: None,
            secrets: None,
        },
        &mut |p| marks.push((Instant::now(), p)),
    )
    .map_err(|e| format!("capture: {e}"))?;
    let t_end = Instant::now();
    let capture_s = secs(t_end - t0);
    let (diag_read, diag_copy) = copy_diagnostics(&vm, dir, size)?;
    drop(vm);

    // Phases from the progress callbacks: one per 4 MiB chunk of memory, the last at the end
    // of the copy loop. The first callback comes one chunk after the loop started.
    let mem: Vec<Instant> = marks
        .iter()
        .filter(|(_, p)| matches!(p, Progress::Memory { .. }))
        .map(|(t, _)| *t)
        .collect();
    let breakdown = match (mem.first(), mem.last()) {
        (Some(&first), Some(&last)) if mem.len() > 1 => {
            let chunk = secs(last - first) / (mem.len() - 1) as f64;
            let pre = (secs(first - t0) - chunk).max(0.0);
            [pre, secs(last - t0) - pre, secs(t_end - last)]
        }
        _ => [f64::NAN; 3],
    };
    let snap_dir = snaps.join("bench");
    let (alloc, apparent) = disk_usage(&snap_dir);

    // A failed restore costs its own columns, not the capture's.
    let mut restores = Vec::new();
    for mode in [RestoreMode::Eager, RestoreMode::PrivateMap] {
        let r = restore_once(&snap_dir, elf, size, mode, st.saved);
        restores.push(r.unwrap_or_else(|e| {
            eprintln!("microagent {size} MiB restore {mode:?}: {e}");
            NO_RESTORE
        }));
    }

    let snap = Snapshot::open(&snap_dir).map_err(|e| format!("open: {e}"))?;
    let t = Instant::now();
    snap.verify(&VerifyOptions {
        kernel: Some(elf),
        contents: true,
        recheck: true,
    })
    .map_err(|e| format!("verify: {e}"))?;
    let verify = secs(t.elapsed());
    let _ = std::fs::remove_dir_all(&snaps);

    Ok(Rep {
        fill: st.fill,
        first_round: st.first_round,
        round: st.round,
        thp_mib,
        capture: capture_s,
        breakdown,
        diag_read,
        diag_copy,
        alloc,
        apparent,
        restores,
        verify,
    })
}

/// One timed restore: from `Snapshot::open` to the first new cpu0 count, then one more round.
fn restore_once(
    snap_dir: &Path,
    elf: &Path,
    size: u64,
    mode: RestoreMode,
    saved: u64,
) -> Result<Restore, String> {
    let log = LineLog::new();
    warm(size);
    let t0 = Instant::now();
    let snap = Snapshot::open(snap_dir).map_err(|e| format!("open: {e}"))?;
    let vm = snapshot::restore::restore::<Vm>(
        &snap,
        &RestoreOptions {
            kernel: Some(elf),
            verify_contents: false,
            memory_mode: mode,
            page_server: None,
            label: "bench",
        },
        RestoreArgs {
            console: Console::Writer(Box::new(log.clone())),
            paused: false,
            devices: None,
        },
    )
    .map_err(|e| e.to_string())?;
    let ready = secs(t0.elapsed());
    let r = after_restore(&log, t0, saved).map_err(|e| format!("{e}\n{}", log.tail(10)));
    drop(vm);
    let (first, next_round) = r?;
    Ok(Restore {
        ready,
        first,
        next_round,
    })
}

/// On the paused source: how fast guest memory can be read, and how fast the capture's copy
/// loop (`snapshot::memfile::write_memory`) runs on its own, without the fsync (MiB/s).
fn copy_diagnostics(vm: &Vm, dir: &Path, size: u64) -> Result<(f64, f64), String> {
    use vm_memory::{Address, Bytes};
    let mem = vm.memory();
    let mut buf = vec![0u8; 4 << 20];
    let t = Instant::now();
    for (start, len) in vmm::memory::ram_ranges(size * MIB) {
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], start.unchecked_add(off))
                .map_err(|e| format!("read guest memory: {e}"))?;
            off += n as u64;
        }
    }
    let read = size as f64 / secs(t.elapsed());
    std::hint::black_box(&buf);

    let path = dir.join("copy-diag.bin");
    let _ = std::fs::remove_file(&path);
    let file = std::fs::File::create(&path).map_err(|e| format!("create: {e}"))?;
    warm(size);
    let t = Instant::now();
    snapshot::memfile::write_memory(mem, &file, |_, _| {})
        .map_err(|e| format!("write_memory: {e}"))?;
    let copy = size as f64 / secs(t.elapsed());
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok((read, copy))
}

// ---------------------------------------------------------------------------------------------
// QEMU

fn qemu(elf: &Path, size: u64, qmp: &Path, incoming: Option<&Path>) -> Result<Proc, String> {
    let (vcpus, per) = layout(size);
    let mut c = qemu_command(elf, size, vcpus, &cmdline(per));
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(f) = incoming {
        c.arg("-incoming").arg(format!("exec:cat {}", f.display()));
    }
    let _ = std::fs::remove_file(qmp);
    Proc::spawn(&mut c)
}

fn quit(mut p: Proc, qmp: Option<Qmp>) {
    if let Some(mut q) = qmp {
        let _ = q.cmd("quit", None);
    }
    let _ = p.wait_exit(Instant::now() + Duration::from_secs(30));
}

fn qemu_rep(dir: &Path, elf: &Path, size: u64) -> Result<Rep, String> {
    let (vcpus, _) = layout(size);
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-state.bin");
    let _ = std::fs::remove_file(&file);

    let src = qemu(elf, size, &sock, None)?;
    let t_boot = src.started;
    let mut qmp = Qmp::connect(&sock, Instant::now() + Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", src.tails()))?;
    // What a save to file should use (libvirt does the same): no migration bandwidth cap.
    qmp.cmd(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
    )?;
    let st =
        settle(&src.out, vcpus as usize, t_boot).map_err(|e| format!("{e}\n{}", src.tails()))?;
    qmp.cmd("stop", None)?;
    let thp_mib = anon_huge_mib(src.child.id());

    warm(size);
    let t0 = Instant::now();
    qmp.cmd(
        "migrate",
        Some(serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) })),
    )?;
    let info = loop {
        let r = qmp.cmd("query-migrate", None)?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => return Err(format!("migration failed: {r}")),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let capture_s = secs(t0.elapsed());
    let total_time = info
        .get("total-time")
        .and_then(|v| v.as_f64())
        .map(|ms| ms / 1e3)
        .unwrap_or(f64::NAN);
    quit(src, Some(qmp));
    // `cat` may still be finishing; the file is complete once QEMU (its parent) has exited.
    let t = Instant::now();
    std::fs::File::open(&file)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", file.display()))?;
    let fsync = secs(t.elapsed());
    let (alloc, apparent) = disk_usage(&file);

    warm(size);
    let dst = qemu(elf, size, &sock, Some(&file))?;
    let t0 = dst.started;
    let r = (|| {
        let mut qmp = Qmp::connect(&sock, t0 + Duration::from_secs(30))?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            let r = qmp.cmd("query-status", None)?;
            let s = r
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_string();
            if s != "inmigrate" {
                break s;
            }
            if Instant::now() >= deadline {
                return Err("incoming migration did not finish".to_string());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let ready = secs(t0.elapsed());
        match status.as_str() {
            "paused" => {
                qmp.cmd("cont", None)?;
            }
            "running" => {}
            s => return Err(format!("after incoming migration the VM is {s:?}")),
        }
        let (first, next_round) = after_restore(&dst.out, t0, st.saved)?;
        Ok((
            qmp,
            Restore {
                ready,
                first,
                next_round,
            },
        ))
    })();
    let restore = match r {
        Ok((q, restore)) => {
            quit(dst, Some(q));
            restore
        }
        Err(e) => {
            let msg = format!("qemu restore: {e}\n{}", dst.tails());
            quit(dst, None);
            return Err(msg);
        }
    };
    let _ = std::fs::remove_file(&file);

    Ok(Rep {
        fill: st.fill,
        first_round: st.first_round,
        round: st.round,
        thp_mib,
        capture: capture_s,
        breakdown: [total_time, fsync, f64::NAN],
        diag_read: f64::NAN,
        diag_copy: f64::NAN,
        alloc,
        apparent,
        restores: vec![restore],
        verify: f64::NAN,
    })
}

// ---------------------------------------------------------------------------------------------
// Where capture and restore time can go: the host-side building blocks, measured alone.

fn rate(bytes: usize, d: Duration) -> String {
    f(bytes as f64 / MIB as f64 / d.as_secs_f64(), 0)
}

/// Fresh anonymous memory (nothing touched yet), optionally with MADV_HUGEPAGE.
struct Anon(*mut u8, usize);

impl Anon {
    fn new(len: usize, huge: bool) -> Self {
        // SAFETY: a private anonymous mapping we own; unmapped in Drop.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED, "mmap failed");
            if huge {
                libc::madvise(p, len, libc::MADV_HUGEPAGE);
            }
            Self(p as *mut u8, len)
        }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and exclusively ours.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

fn warm_enabled() -> bool {
    static W: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *W.get_or_init(|| std::env::var("MICROAGENT_BENCH_WARM").map_or(true, |v| v.trim() != "0"))
}

/// Touches and frees `mib` MiB of (huge-page) anonymous memory.
///
/// On this development machine (itself a guest, with virtio-balloon free page reporting) memory
/// freed more than ~2 s ago has been handed back to the outer host, and touching it again costs
/// an outer-host fault: writing such memory runs ~10x slower than writing memory freed just
/// before (the components table measures both). Which of the two a timed phase gets would
/// depend on what ran just before it, so before every timed phase, for both tools, the
/// benchmark makes it the second, as on a host without that layer.
fn warm_now(mib: u64) {
    let avail = mem_available_mib().saturating_sub(1024);
    let len = (mib.min(avail) * MIB) as usize;
    if len == 0 {
        return;
    }
    let mut a = Anon::new(len, true);
    let s = a.slice();
    for i in (0..len).step_by(4096) {
        s[i] = 1;
    }
}

fn warm(mib: u64) {
    if warm_enabled() {
        warm_now(mib + 256);
    }
}

/// The same check as `snapshot::memfile`'s zero-page test (it is private there).
fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

fn components(dir: &Path) {
    const LEN: usize = 256 << 20;
    const PAGE: usize = 4096;
    let mut rows = Vec::new();

    let mut src = vec![0u8; LEN];
    for (i, w) in src.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 ^ 0x9E37_79B9_7F4A_7C15).to_ne_bytes());
    }
    let mut dst = vec![1u8; LEN];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    rows.push(vec![
        "memcpy (the copy out of guest memory)".into(),
        rate(LEN, t.elapsed()),
    ]);
    std::hint::black_box(&dst);

    let t = Instant::now();
    let mut d = snapshot::digest::FileDigest::new();
    for c in src.chunks(4 << 20) {
        d.update(c);
    }
    std::hint::black_box(d.finish());
    rows.push(vec!["xxh3-128 digest".into(), rate(LEN, t.elapsed())]);

    let zeros = vec![0u8; LEN];
    let t = Instant::now();
    let z = zeros.chunks(PAGE).filter(|p| is_zero(p)).count();
    std::hint::black_box(z);
    rows.push(vec![
        "zero-page check, all-zero pages (worst case)".into(),
        rate(LEN, t.elapsed()),
    ]);
    drop(zeros);

    // The page cache write, into memory freed long ago (this machine's free page reporting has
    // handed it back to the outer host, which must fault it in again) and into memory touched
    // and freed just before (what `warm` arranges before every timed phase).
    let path = dir.join("component.bin");
    let write = |path: &Path| {
        let _ = std::fs::remove_file(path);
        let file = std::fs::File::create(path).expect("create component file");
        let t = Instant::now();
        for (i, c) in src.chunks(4 << 20).enumerate() {
            file.write_all_at(c, (i * (4 << 20)) as u64)
                .expect("write component file");
        }
        (file, t.elapsed())
    };
    // Free page reporting works through a large free in batches every ~2 s: give it 20 s.
    let (mut cold, mut hot) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..2 {
        drop(last.take());
        let _ = std::fs::remove_file(&path);
        std::thread::sleep(Duration::from_secs(20));
        let (file, t) = write(&path);
        cold.push(t);
        drop(file);
        let _ = std::fs::remove_file(&path);
        warm_now(512);
        let (file, t) = write(&path);
        hot.push(t);
        last = Some(file);
    }
    let file = last.expect("two rounds ran");
    let each = |v: &[Duration]| {
        v.iter()
            .map(|d| rate(LEN, *d))
            .collect::<Vec<_>>()
            .join(", ")
    };
    rows.push(vec![
        "pwrite into the page cache, 20 s after the last free (cold), 2 rounds".into(),
        each(&cold),
    ]);
    rows.push(vec![
        "pwrite into the page cache, right after touching and freeing 512 MiB (warm), 2 rounds"
            .into(),
        each(&hot),
    ]);
    let t = Instant::now();
    file.sync_all().expect("fsync");
    rows.push(vec!["fsync of that file".into(), rate(LEN, t.elapsed())]);
    drop(file);

    let file = std::fs::File::open(&path).expect("open component file");
    let t = Instant::now();
    file.read_exact_at(&mut dst, 0).expect("read");
    rows.push(vec![
        "read from page cache into touched memory".into(),
        rate(LEN, t.elapsed()),
    ]);
    // Fresh anonymous memory, with and without MADV_HUGEPAGE (what QEMU does for guest RAM),
    // 3 rounds alternating (THP allocation depends on what the previous round freed): median.
    let mut fill_read = [vec![], vec![]];
    let mut touch = [vec![], vec![]];
    for _ in 0..3 {
        for huge in [false, true] {
            let mut a = Anon::new(LEN, huge);
            let t = Instant::now();
            file.read_exact_at(a.slice(), 0).expect("read");
            fill_read[huge as usize].push(t.elapsed().as_secs_f64());
            drop(a);
            let mut a = Anon::new(LEN, huge);
            let s = a.slice();
            let t = Instant::now();
            for i in (0..LEN).step_by(PAGE) {
                s[i] = 1;
            }
            touch[huge as usize].push(t.elapsed().as_secs_f64());
        }
    }
    for huge in [false, true] {
        let tag = if huge { ", MADV_HUGEPAGE" } else { "" };
        let r = median(&fill_read[huge as usize]);
        rows.push(vec![
            format!("read from page cache into fresh anonymous memory{tag}"),
            rate(LEN, Duration::from_secs_f64(r)),
        ]);
        let t = median(&touch[huge as usize]);
        rows.push(vec![
            format!(
                "host first touch of fresh anonymous memory{tag} ({} us per 4 KiB page)",
                f(t * 1e6 / (LEN / PAGE) as f64, 2)
            ),
            rate(LEN, Duration::from_secs_f64(t)),
        ]);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);

    println!("Host-side building blocks, 256 MiB each (one run; page cache warm):");
    print_table(&["operation", "MiB/s"], &rows);
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if !have_kvm() {
        println!("snapshot benchmark skipped: /dev/kvm is not available");
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
        .unwrap_or_else(|| vec![256, 1024, 4096]);
    let reps = env_usize("MICROAGENT_BENCH_REPS", 3);
    let with_qemu = have_qemu();
    if !with_qemu {
        println!("{QEMU} not found: QEMU rows skipped");
    }
    let dir = scratch("snap");
    let elf = testguest(&dir);
    println!(
        "snapshot: sizes {sizes:?} MiB, {reps} repetitions each (tool order alternating), medians; \
         scratch {}",
        dir.display()
    );
    if warm_enabled() {
        println!(
            "warm-up on: before every timed capture and restore, for both tools, as much memory as \
             the guest (+256 MiB) is touched and freed, so that host allocations in the timed \
             phase do not pay this machine's outer-host faults (MICROAGENT_BENCH_WARM=0: off)"
        );
    }

    let mut main_rows = Vec::new();
    let mut cap_rows = Vec::new();
    let mut res_rows = Vec::new();
    for &size in &sizes {
        let (vcpus, per) = layout(size);
        // Source and restored guest may briefly coexist with the snapshot in the page cache.
        let need_ram = 2 * size + 2048;
        let need_disk = 2 * size + 2048;
        let (ram, disk) = (mem_available_mib(), disk_free_mib(&dir));
        if ram < need_ram || disk < need_disk {
            println!(
                "{size} MiB skipped: needs {need_ram} MiB available RAM and {need_disk} MiB free \
                 disk, have {ram} MiB and {disk} MiB"
            );
            continue;
        }
        println!(
            "{size} MiB: {vcpus} vCPU(s) x mem={per} MiB, cmdline \"{}\"",
            cmdline(per)
        );
        let mut ma: Vec<Rep> = Vec::new();
        let mut qm: Vec<Rep> = Vec::new();
        for rep in 0..reps {
            let order: &[bool] = if rep % 2 == 0 {
                &[true, false]
            } else {
                &[false, true]
            };
            for &is_ma in order {
                if is_ma {
                    let r = microagent_rep(&dir, &elf, size).unwrap_or_else(|e| {
                        eprintln!("microagent {size} MiB rep {rep}: {e}");
                        let _ = std::fs::remove_dir_all(dir.join("ma-snaps"));
                        failed_rep(2)
                    });
                    println!(
                        "  rep {rep} microagent: capture {} s, restore eager {} s / mmap {} s",
                        f(r.capture, 3),
                        f(r.restores[0].first, 3),
                        f(r.restores[1].first, 3)
                    );
                    ma.push(r);
                } else if with_qemu {
                    let r = qemu_rep(&dir, &elf, size).unwrap_or_else(|e| {
                        eprintln!("qemu {size} MiB rep {rep}: {e}");
                        let _ = std::fs::remove_file(dir.join("qemu-state.bin"));
                        failed_rep(1)
                    });
                    println!(
                        "  rep {rep} qemu:       capture {} s, restore {} s",
                        f(r.capture, 3),
                        f(r.restores[0].first, 3)
                    );
                    qm.push(r);
                }
            }
        }

        let m = |v: &[Rep], g: &dyn Fn(&Rep) -> f64| median(&v.iter().map(g).collect::<Vec<_>>());
        let mb = |b: u64| b as f64 / MIB as f64;
        let ok = |v: &[Rep]| v.iter().filter(|r| r.capture.is_finite()).count();
        // cpu0's region in 4 KiB pages, for per-page first-touch estimates.
        let pages = (per * 256) as f64;
        let ma_cap = m(&ma, &|r| r.capture);
        let ma_alloc = m(&ma, &|r| mb(r.alloc));
        let ma_app = m(&ma, &|r| mb(r.apparent));
        let ma_eager = m(&ma, &|r| r.restores[0].first);
        let ma_mmap = m(&ma, &|r| r.restores[1].first);
        main_rows.push(vec![
            size.to_string(),
            "microagent".into(),
            format!("{}/{reps}", ok(&ma)),
            f(ma_cap, 3),
            f(size as f64 / ma_cap, 0),
            f(ma_alloc, 1),
            f(ma_app, 1),
            format!(
                "{}{} / {}{}",
                f(ma_eager, 3),
                failures(&ma, 0),
                f(ma_mmap, 3),
                failures(&ma, 1)
            ),
        ]);
        // Boot: the first round does 1.5 steady rounds of work plus every first touch.
        let boot_touch = |v: &[Rep]| m(v, &|r| (r.first_round - 1.5 * r.round) / pages * 1e6);
        cap_rows.push(vec![
            size.to_string(),
            "microagent".into(),
            f(m(&ma, &|r| r.fill), 2),
            f(m(&ma, &|r| r.thp_mib), 0),
            f(boot_touch(&ma), 1),
            f(m(&ma, &|r| r.round), 3),
            f(ma_cap, 3),
            format!(
                "pre {} + copy loop {} + fsync/finish {}",
                f(m(&ma, &|r| r.breakdown[0]), 3),
                f(m(&ma, &|r| r.breakdown[1]), 3),
                f(m(&ma, &|r| r.breakdown[2]), 3)
            ),
            format!(
                "read guest memory {} MiB/s; copy loop alone {} MiB/s; verify_contents {} s",
                f(m(&ma, &|r| r.diag_read), 0),
                f(m(&ma, &|r| r.diag_copy), 0),
                f(m(&ma, &|r| r.verify), 3)
            ),
        ]);
        // Restore: pausing right after a count line leaves one whole round to the next one.
        let restore_row = |v: &[Rep], k: usize, name: &str| {
            vec![
                size.to_string(),
                name.to_string(),
                f(m(v, &|r| r.restores[k].ready), 3),
                f(m(v, &|r| r.restores[k].first), 3),
                f(m(v, &|r| r.restores[k].first - r.restores[k].ready), 3),
                f(m(v, &|r| r.round), 3),
                f(m(v, &|r| r.restores[k].next_round), 3),
                f(
                    m(v, &|r| {
                        (r.restores[k].first - r.restores[k].ready - r.round) / pages * 1e6
                    }),
                    1,
                ),
            ]
        };
        res_rows.push(restore_row(&ma, 0, "microagent eager"));
        res_rows.push(restore_row(&ma, 1, "microagent MAP_PRIVATE"));
        if with_qemu {
            let q_cap = m(&qm, &|r| r.capture);
            let q_alloc = m(&qm, &|r| mb(r.alloc));
            let q_app = m(&qm, &|r| mb(r.apparent));
            let q_res = m(&qm, &|r| r.restores[0].first);
            let q_fsync = m(&qm, &|r| r.breakdown[1]);
            main_rows.push(vec![
                size.to_string(),
                "qemu".into(),
                format!("{}/{reps}", ok(&qm)),
                f(q_cap, 3),
                f(size as f64 / q_cap, 0),
                f(q_alloc, 1),
                f(q_app, 1),
                format!("{}{}", f(q_res, 3), failures(&qm, 0)),
            ]);
            main_rows.push(vec![
                size.to_string(),
                "ratio microagent / qemu".into(),
                String::new(),
                format!(
                    "{} ({} vs qemu+fsync)",
                    ratio(ma_cap, q_cap),
                    ratio(ma_cap, q_cap + q_fsync)
                ),
                ratio(size as f64 / ma_cap, size as f64 / q_cap),
                ratio(ma_alloc, q_alloc),
                ratio(ma_app, q_app),
                format!("{} / {}", ratio(ma_eager, q_res), ratio(ma_mmap, q_res)),
            ]);
            cap_rows.push(vec![
                size.to_string(),
                "qemu".into(),
                f(m(&qm, &|r| r.fill), 2),
                f(m(&qm, &|r| r.thp_mib), 0),
                f(boot_touch(&qm), 1),
                f(m(&qm, &|r| r.round), 3),
                f(q_cap, 3),
                format!(
                    "QEMU's total-time {}; an fsync after it {}",
                    f(m(&qm, &|r| r.breakdown[0]), 3),
                    f(q_fsync, 3)
                ),
                "file written by cat through a pipe, never fsynced".into(),
            ]);
            res_rows.push(restore_row(&qm, 0, "qemu -incoming"));
        }
    }

    println!();
    println!(
        "Snapshot capture and restore, medians. restore = from the restore call (microagent, \
         in-process) or QEMU's launch to the first new cpu0 count line:"
    );
    print_table(
        &[
            "size MiB",
            "tool",
            "ok",
            "capture s",
            "MiB/s",
            "on-disk MiB (allocated)",
            "apparent MiB",
            "restore-to-count s (eager / mmap)",
        ],
        &main_rows,
    );
    println!(
        "Capture details, medians. fill = boot to every vCPU at count 2; THP = AnonHugePages \
         backing the source guest; boot touch = (first round - 1.5 steady rounds) / pages of \
         cpu0's region:"
    );
    print_table(
        &[
            "size MiB",
            "tool",
            "fill s",
            "THP MiB",
            "boot touch us/page",
            "steady round s",
            "capture s",
            "capture phases s",
            "other",
        ],
        &cap_rows,
    );
    println!(
        "Restore details, medians, seconds from the restore call / QEMU launch. loaded = \
         the restore returned / incoming migration done; first round = first count - \
         loaded (one whole round of guest work plus every first touch); touch = (first round - \
         steady round) / pages of cpu0's region:"
    );
    print_table(
        &[
            "size MiB",
            "restore",
            "loaded s",
            "first count s",
            "first round s",
            "steady round s (source)",
            "next round s",
            "touch us/page",
        ],
        &res_rows,
    );
    components(&dir);
    let _ = std::fs::remove_dir_all(dir);
}
