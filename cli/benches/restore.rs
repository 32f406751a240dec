//! Full-touch restore through the real binary against QEMU, side by side in one run: a test
//! guest that writes and verifies almost all of its memory every round
//! (`mode=counter mem=900 tick_ms=0` in 1 GiB) is paused right after a count line and captured
//! once by each tool; then, per repetition (tool order rotating), it is restored by
//! `microagent start --from-snapshot` in each memory mode and by QEMU `-incoming exec:cat FILE`
//! (migration bandwidth uncapped, `cont` once the incoming migration is done).
//!
//! Timed from the command's (or QEMU's) launch: `loaded` = the VMM logged `VM restored` (its
//! vCPUs just started; `vmm.log`'s time of day) / QEMU's incoming migration finished and `cont`
//! returned; `first count` = the first new `cpu0 count=` line. Since the capture came right
//! after a count line, that line ends one whole guest round, the one that touches every page
//! first: `first round` = first count - loaded, against the source's steady round (goal: within
//! 10%) and the restored guest's own next rounds (the median of the five after it).
//!
//! With `MICROAGENT_BENCH_FIRECRACKER=/path/to/firecracker`, Firecracker too: its source boots
//! the same ELF, is paused right after a count line (`PATCH /vm Paused`) and captured once
//! (`PUT /snapshot/create`, Full); each restore is a new process whose `PUT /snapshot/load`
//! (File back end: the memory file mapped MAP_PRIVATE, `resume_vm`) returned at `loaded`.
//!
//! `cargo bench -p microagent --bench restore`
//!   `MICROAGENT_BENCH_REPS=N` (default 3)
//!   `MICROAGENT_BENCH_MEM_MIB` (default 1024), `MICROAGENT_BENCH_REGION_MIB` (default 900)
//!   `MICROAGENT_BENCH_MODES=eager,mmap,uffd,hot` (the default; `hot` reads the working set
//!   the `uffd` restores recorded)
//!   `MICROAGENT_BENCH_HOT_PCT=P` (default 100): after its first round the guest touches only
//!   the first P% of its region
//!
//! Then, with `MICROAGENT_TEST_KERNEL` (the test-only kernel), a lightly used Linux guest
//! (`MICROAGENT_BENCH_LINUX_MIB`, default 1024; a busybox initramfs printing `tick N` in a loop)
//! booted and captured once per tool, restored per repetition to its first new tick line:
//! `MICROAGENT_BENCH_LINUX=0` skips it, `MICROAGENT_BENCH_FULL=0` skips the full-touch table.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const STEP: Duration = Duration::from_secs(300);

fn ma(home: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home)
        .args(args)
        .output()
        .map_err(|e| format!("run microagent: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "microagent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Follows a console file into a `LineLog` (each line stamped when this poller saw it, within
/// ~0.5 ms of its write), until dropped. The file may not exist yet.
struct Tail {
    log: LineLog,
    stop: Arc<AtomicBool>,
}

impl Tail {
    fn new(path: PathBuf) -> Self {
        let log = LineLog::new();
        let stop = Arc::new(AtomicBool::new(false));
        let (mut w, s) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut file = None;
            let mut buf = vec![0u8; 64 << 10];
            while !s.load(Ordering::Relaxed) {
                if file.is_none() {
                    file = std::fs::File::open(&path).ok();
                }
                match file.as_mut().map(|f| f.read(&mut buf)) {
                    Some(Ok(n)) if n > 0 => {
                        let _ = w.write_all(&buf[..n]);
                        continue;
                    }
                    _ => std::thread::sleep(Duration::from_micros(500)),
                }
            }
        });
        Self { log, stop }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request on a VMM's control socket (one JSON line each way).
fn api(sock: &Path, op: &str) -> Result<(), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.write_all(format!("{{\"op\":\"{op}\"}}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.contains("error") {
        return Err(format!("{op}: {line}"));
    }
    Ok(())
}

/// Rounds timed after a restore's first count, and on the source for its steady round.
const ROUNDS: usize = 5;

/// From cpu0's line at index `from` on: the median of the next `ROUNDS` rounds and the index
/// after the last line.
fn rounds(log: &LineLog, from: usize) -> Result<(f64, usize), String> {
    let deadline = Instant::now() + STEP;
    let (mut i, mut t, mut n) = log.wait_count(from, 0, 0, deadline)?;
    let mut v = Vec::new();
    for _ in 0..ROUNDS {
        let (j, tj, nj) = log.wait_count(i + 1, 0, n, deadline)?;
        v.push(secs(tj - t));
        (i, t, n) = (j, tj, nj);
    }
    Ok((median(&v), i + 1))
}

/// Once every vCPU reached count 2 (the whole region written and verified once): the steady
/// round and the index after the last line it timed.
fn steady(log: &LineLog) -> Result<(f64, usize), String> {
    let from = log.wait_all_counts(1, 2, Instant::now() + STEP)?;
    rounds(log, from)
}

#[derive(Clone, Copy)]
struct Restore {
    loaded: f64,
    first: f64,
    next: f64,
}

const FAILED: Restore = Restore {
    loaded: f64::NAN,
    first: f64::NAN,
    next: f64::NAN,
};

/// From `t0` (launch) and the instant the VM was loaded and running: the first cpu0 count above
/// `saved` and the one after it.
fn counts_after(
    log: &LineLog,
    t0: Instant,
    loaded: Instant,
    saved: u64,
) -> Result<Restore, String> {
    let deadline = Instant::now() + STEP;
    let (i, t1, _) = log.wait_count(0, 0, saved, deadline)?;
    let (next, _) = rounds(log, i)?;
    if let Some(l) = log.has_failure() {
        return Err(format!("restored guest failed: {l}"));
    }
    Ok(Restore {
        loaded: secs(loaded - t0),
        first: secs(t1 - t0),
        next,
    })
}

/// Touches and frees `mib` MiB of huge-page memory (as `--bench snapshot` does before every
/// timed phase, for both tools): this development machine hands memory freed seconds ago back
/// to its outer host, and a restore that allocated it again would pay that host's faults,
/// more or less depending on what ran just before. `MICROAGENT_BENCH_WARM=0` turns it off.
fn warm(mib: u64) {
    if std::env::var("MICROAGENT_BENCH_WARM").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let len = (mib << 20) as usize;
    // SAFETY: a private anonymous mapping of our own, written only within its length and
    // unmapped before returning.
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
        for i in (0..len).step_by(4096) {
            *(p as *mut u8).add(i) = 1;
        }
        libc::munmap(p, len);
    }
}

// ---------------------------------------------------------------------------------------------
// microagent

struct Source {
    steady: f64,
    saved: u64,
}

fn ma_source(home: &Path, mem: u64, cmdline: &str) -> Result<Source, String> {
    let ws = home.join("workspaces/w");
    ma(
        home,
        &[
            "create",
            "w",
            "--kernel",
            "builtin:testguest",
            "--mem",
            &mem.to_string(),
            "--cmdline",
            cmdline,
        ],
    )?;
    let tail = Tail::new(ws.join("console.log"));
    ma(home, &["start", "w"])?;
    let (steady, from) = steady(&tail.log)?;
    // Pause right after a count line, straight through the control socket.
    let (_, _, saved) = tail.log.wait_count(from, 0, 0, Instant::now() + STEP)?;
    api(&ws.join("api.sock"), "pause")?;
    ma(home, &["snapshot", "create", "w", "--tag", "base"])?;
    ma(home, &["halt", "w"])?;
    Ok(Source { steady, saved })
}

/// Seconds since midnight UTC.
fn day_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(f64::NAN, |d| d.as_secs_f64() % 86_400.0)
}

/// The instant the VMM logged `VM restored` (its vCPUs had just been started), from the
/// time of day in `vmm.log` (`2026-12-06T23:45:14.019481Z INFO ...: VM restored ...`) against
/// `(t0, sys0)`, the same moment on both clocks.
fn restored_at(log: &Path, t0: Instant, sys0: SystemTime) -> Option<Instant> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("VM restored"))?;
    let time = line.split_once('T')?.1.split_once('Z')?.0;
    let mut hms = time.split(':');
    let h: f64 = hms.next()?.parse().ok()?;
    let m: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    let mut d = h * 3600.0 + m * 60.0 + s - day_secs(sys0);
    if d < -43_200.0 {
        d += 86_400.0; // past midnight
    }
    (0.0..STEP.as_secs_f64())
        .contains(&d)
        .then(|| t0 + Duration::from_secs_f64(d))
}

fn ma_restore(home: &Path, mem: u64, mode: &str, saved: u64) -> Result<Restore, String> {
    let ws = home.join("workspaces/w");
    if mode == "hot" {
        // The working set an earlier uffd restore recorded (written once that VM is gone).
        let set = ws.join("snapshots/base/workingset.bin");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !set.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    warm(mem + 256);
    // A fresh console for this run (`start` would rotate the old one away, but only later).
    let _ = std::fs::remove_file(ws.join("console.log"));
    let tail = Tail::new(ws.join("console.log"));
    let (t0, sys0) = (Instant::now(), SystemTime::now());
    let r = ma(
        home,
        &["start", "w", "--from-snapshot", "base", "--memory", mode],
    );
    let returned = Instant::now();
    let r = r.and_then(|_| {
        // The command returns a little after the vCPUs start; the VMM's log says when.
        let loaded = restored_at(&ws.join("vmm.log"), t0, sys0).unwrap_or(returned);
        counts_after(&tail.log, t0, loaded, saved)
    });
    ma(home, &["halt", "w"])?;
    r.map_err(|e| format!("{e}\n{}", tail.log.tail(5)))
}

// ---------------------------------------------------------------------------------------------
// QEMU

fn qemu(
    elf: &Path,
    mem: u64,
    cmdline: &str,
    qmp: &Path,
    incoming: Option<&Path>,
) -> Result<Proc, String> {
    let mut c = qemu_command(elf, mem, 1, cmdline);
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

fn qemu_source(dir: &Path, elf: &Path, mem: u64, cmdline: &str) -> Result<Source, String> {
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-state.bin");
    let src = qemu(elf, mem, cmdline, &sock, None)?;
    let mut qmp = Qmp::connect(&sock, Instant::now() + Duration::from_secs(30))?;
    qmp.cmd(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
    )?;
    let (steady, from) = steady(&src.out).map_err(|e| format!("{e}\n{}", src.tails()))?;
    let (_, _, saved) = src.out.wait_count(from, 0, 0, Instant::now() + STEP)?;
    qmp.cmd("stop", None)?;
    qmp.cmd(
        "migrate",
        Some(serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) })),
    )?;
    loop {
        let r = qmp.cmd("query-migrate", None)?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => return Err(format!("migration failed: {r}")),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    quit(src, Some(qmp));
    Ok(Source { steady, saved })
}

fn qemu_restore(
    dir: &Path,
    elf: &Path,
    mem: u64,
    cmdline: &str,
    saved: u64,
) -> Result<Restore, String> {
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-state.bin");
    warm(mem + 256);
    let dst = qemu(elf, mem, cmdline, &sock, Some(&file))?;
    incoming(dst, &sock, |dst, t0, loaded| {
        counts_after(&dst.out, t0, loaded, saved)
    })
}

// ---------------------------------------------------------------------------------------------
// Firecracker

fn fc_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("fc-state.bin"), dir.join("fc-mem.bin"))
}

fn fc_source(
    dir: &Path,
    bin: &Path,
    elf: &Path,
    mem: u64,
    cmdline: &str,
) -> Result<Source, String> {
    let fc = firecracker::Firecracker::spawn(bin, dir, "fcsrc")?;
    let r = (|| {
        fc.boot(elf, cmdline, mem, 1)?;
        let (steady, from) = steady(&fc.proc.out)?;
        let (_, _, saved) = fc.proc.out.wait_count(from, 0, 0, Instant::now() + STEP)?;
        fc.pause()?;
        let (state, memf) = fc_files(dir);
        fc.snapshot_full(&state, &memf)?;
        Ok(Source { steady, saved })
    })();
    let r = r.map_err(|e: String| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

fn fc_restore(dir: &Path, bin: &Path, mem: u64, saved: u64) -> Result<Restore, String> {
    warm(mem + 256);
    let fc = firecracker::Firecracker::spawn(bin, dir, "fcdst")?;
    let t0 = fc.proc.started;
    let (state, memf) = fc_files(dir);
    let r = fc
        .load(&state, &memf, true)
        .and_then(|_| counts_after(&fc.proc.out, t0, Instant::now(), saved))
        .map_err(|e| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

// ---------------------------------------------------------------------------------------------
// A lightly used Linux guest (`MICROAGENT_TEST_KERNEL`): restore -> first progress.

/// Mounts /proc and prints `tick N` as fast as a busybox shell can (each line is a few syscalls
/// and a few serial port writes: one every few milliseconds here).
const LINUX_INIT: &str =
    "#!/bin/sh\nmount -t proc proc /proc\ni=0\nwhile :; do i=$((i+1)); echo \"tick $i\"; done\n";
/// Ticks the guest prints before it is captured: userspace has been running for a while.
const LINUX_TICKS: u64 = 200;

fn tick_line(l: &str) -> Option<u64> {
    l.strip_prefix("tick ")?.trim().parse().ok()
}

fn last_tick(log: &LineLog) -> u64 {
    log.text().lines().filter_map(tick_line).max().unwrap_or(0)
}

/// The first complete `tick` line above `saved`.
fn first_tick(log: &LineLog, saved: u64) -> Result<Instant, String> {
    log.wait_from(0, Instant::now() + STEP, "a new tick", |l| {
        tick_line(l).filter(|n| *n > saved)
    })
    .map(|(_, t, _)| t)
}

struct Linux {
    kernel: PathBuf,
    initrd: PathBuf,
    mem: u64,
}

impl Linux {
    fn new(dir: &Path, kernel: PathBuf, mem: u64) -> Result<Self, String> {
        let init = dir.join("linux-init");
        let initrd = dir.join("linux-initramfs.cpio");
        std::fs::write(&init, LINUX_INIT).map_err(|e| e.to_string())?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-initramfs.sh");
        let st = Command::new(script)
            .arg(&initrd)
            .arg("--init")
            .arg(&init)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("{script}: {e}"))?;
        if !st.success() {
            return Err(format!("{script} failed ({st})"));
        }
        Ok(Self {
            kernel,
            initrd,
            mem,
        })
    }
}

/// (loaded, first progress) in seconds from launch.
type Progress = (f64, f64);

fn ma_linux_source(home: &Path, lx: &Linux) -> Result<u64, String> {
    let ws = home.join("workspaces/lx");
    ma(
        home,
        &[
            "create",
            "lx",
            "--kernel",
            &lx.kernel.to_string_lossy(),
            "--initrd",
            &lx.initrd.to_string_lossy(),
            "--mem",
            &lx.mem.to_string(),
            "--net",
            "none",
            "--cmdline",
            firecracker::LINUX_BOOT_ARGS,
        ],
    )?;
    let tail = Tail::new(ws.join("console.log"));
    ma(home, &["start", "lx"])?;
    tail.log
        .wait_from(0, Instant::now() + STEP, "the guest's ticks", |l| {
            tick_line(l).filter(|n| *n >= LINUX_TICKS)
        })
        .map_err(|e| format!("{e}\n{}", tail.log.tail(10)))?;
    api(&ws.join("api.sock"), "pause")?;
    ma(home, &["snapshot", "create", "lx", "--tag", "base"])?;
    ma(home, &["halt", "lx"])?;
    std::thread::sleep(Duration::from_millis(50));
    Ok(last_tick(&tail.log))
}

fn ma_linux_restore(home: &Path, lx: &Linux, mode: &str, saved: u64) -> Result<Progress, String> {
    let ws = home.join("workspaces/lx");
    warm(lx.mem + 256);
    let _ = std::fs::remove_file(ws.join("console.log"));
    let tail = Tail::new(ws.join("console.log"));
    let (t0, sys0) = (Instant::now(), SystemTime::now());
    let r = ma(
        home,
        &["start", "lx", "--from-snapshot", "base", "--memory", mode],
    );
    let returned = Instant::now();
    let r = r.and_then(|_| {
        let loaded = restored_at(&ws.join("vmm.log"), t0, sys0).unwrap_or(returned);
        let t1 = first_tick(&tail.log, saved)?;
        Ok((secs(loaded - t0), secs(t1 - t0)))
    });
    ma(home, &["halt", "lx"])?;
    r.map_err(|e| format!("{e}\n{}", tail.log.tail(5)))
}

fn qemu_linux(lx: &Linux, qmp: &Path, incoming: Option<&Path>) -> Result<Proc, String> {
    let mut c = qemu_command(&lx.kernel, lx.mem, 1, firecracker::LINUX_BOOT_ARGS);
    c.arg("-initrd").arg(&lx.initrd);
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(f) = incoming {
        c.arg("-incoming").arg(format!("exec:cat {}", f.display()));
    }
    let _ = std::fs::remove_file(qmp);
    Proc::spawn(&mut c)
}

fn qemu_linux_source(dir: &Path, lx: &Linux) -> Result<u64, String> {
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-linux.bin");
    let src = qemu_linux(lx, &sock, None)?;
    let r = (|| {
        let mut qmp = Qmp::connect(&sock, Instant::now() + Duration::from_secs(30))?;
        qmp.cmd(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
        )?;
        src.out
            .wait_from(0, Instant::now() + STEP, "the guest's ticks", |l| {
                tick_line(l).filter(|n| *n >= LINUX_TICKS)
            })?;
        qmp.cmd("stop", None)?;
        qmp.cmd(
            "migrate",
            Some(serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) })),
        )?;
        loop {
            let r = qmp.cmd("query-migrate", None)?;
            match r.get("status").and_then(|s| s.as_str()) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => return Err(format!("migration failed: {r}")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        Ok(qmp)
    })();
    match r {
        Ok(q) => {
            let saved = last_tick(&src.out);
            quit(src, Some(q));
            Ok(saved)
        }
        Err(e) => {
            let msg = format!("{e}\n{}", src.tails());
            quit(src, None);
            Err(msg)
        }
    }
}

/// A QEMU started with `-incoming`: waits until the migration has loaded, resumes the VM,
/// measures with (process, launched, resumed) and quits QEMU whatever the outcome.
fn incoming<T>(
    dst: Proc,
    sock: &Path,
    measure: impl FnOnce(&Proc, Instant, Instant) -> Result<T, String>,
) -> Result<T, String> {
    let t0 = dst.started;
    let r = (|| -> Result<_, String> {
        let mut qmp = Qmp::connect(sock, t0 + Duration::from_secs(30))?;
        let loaded = incoming_then_cont(&mut qmp)?;
        Ok((measure(&dst, t0, loaded)?, qmp))
    })();
    match r {
        Ok((r, q)) => {
            quit(dst, Some(q));
            Ok(r)
        }
        Err(e) => {
            let msg = format!("{e}\n{}", dst.tails());
            quit(dst, None);
            Err(msg)
        }
    }
}

/// Waits until QEMU's incoming migration has loaded (the VM paused, as it was saved), resumes
/// it and returns when it was resumed.
fn incoming_then_cont(qmp: &mut Qmp) -> Result<Instant, String> {
    let deadline = Instant::now() + STEP;
    loop {
        let r = qmp.cmd("query-status", None)?;
        match r.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "inmigrate" if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            "paused" => break,
            s => return Err(format!("after the incoming migration the VM is {s:?}")),
        }
    }
    qmp.cmd("cont", None)?;
    Ok(Instant::now())
}

fn qemu_linux_restore(dir: &Path, lx: &Linux, saved: u64) -> Result<Progress, String> {
    let sock = dir.join("q.sock");
    let file = dir.join("qemu-linux.bin");
    warm(lx.mem + 256);
    let dst = qemu_linux(lx, &sock, Some(&file))?;
    incoming(dst, &sock, |dst, t0, loaded| {
        let t1 = first_tick(&dst.out, saved)?;
        Ok((secs(loaded - t0), secs(t1 - t0)))
    })
}

fn fc_linux_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("fc-linux-state.bin"), dir.join("fc-linux-mem.bin"))
}

fn fc_linux_source(dir: &Path, bin: &Path, lx: &Linux) -> Result<u64, String> {
    let fc = firecracker::Firecracker::spawn(bin, dir, "fclxsrc")?;
    let r = (|| {
        fc.boot_initrd(
            &lx.kernel,
            Some(&lx.initrd),
            firecracker::LINUX_BOOT_ARGS,
            lx.mem,
            1,
        )?;
        fc.proc
            .out
            .wait_from(0, Instant::now() + STEP, "the guest's ticks", |l| {
                tick_line(l).filter(|n| *n >= LINUX_TICKS)
            })?;
        fc.pause()?;
        let (state, memf) = fc_linux_files(dir);
        fc.snapshot_full(&state, &memf)?;
        std::thread::sleep(Duration::from_millis(50));
        Ok(last_tick(&fc.proc.out))
    })();
    let r = r.map_err(|e: String| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

fn fc_linux_restore(dir: &Path, bin: &Path, lx: &Linux, saved: u64) -> Result<Progress, String> {
    warm(lx.mem + 256);
    let fc = firecracker::Firecracker::spawn(bin, dir, "fclxdst")?;
    let t0 = fc.proc.started;
    let (state, memf) = fc_linux_files(dir);
    let r = fc
        .load(&state, &memf, true)
        .and_then(|_| {
            let loaded = Instant::now();
            let t1 = first_tick(&fc.proc.out, saved)?;
            Ok((secs(loaded - t0), secs(t1 - t0)))
        })
        .map_err(|e| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

/// The Linux table: each tool boots the guest once, captures it after `LINUX_TICKS` ticks, and
/// restores it `reps` times (tool order rotating).
fn linux(dir: &Path, home: &Path, reps: usize, modes: &[String], fc_bin: Option<&Path>) {
    if std::env::var("MICROAGENT_BENCH_LINUX").is_ok_and(|v| v.trim() == "0") {
        return;
    }
    let Some(kernel) = std::env::var_os("MICROAGENT_TEST_KERNEL").map(PathBuf::from) else {
        println!(
            "restore: Linux guest rows skipped: MICROAGENT_TEST_KERNEL is not set (the test-only \
             kernel; MICROAGENT_BENCH_LINUX=0 skips them quietly)"
        );
        return;
    };
    let mem = env_usize("MICROAGENT_BENCH_LINUX_MIB", 1024) as u64;
    let lx = match Linux::new(dir, kernel, mem) {
        Ok(l) => l,
        Err(e) => {
            println!("restore: Linux guest rows skipped: {e}");
            return;
        }
    };
    println!(
        "\nrestore, Linux: {mem} MiB guest (the test kernel, a busybox initramfs printing `tick N` \
         in a loop, 1 vCPU), captured after {LINUX_TICKS} ticks; {reps} restores per tool"
    );
    // One guest at a time: Linux guests stall under CPU contention here.
    let ma_src = ma_linux_source(home, &lx).map_err(|e| eprintln!("microagent Linux source: {e}"));
    let q_src = if have_qemu() {
        qemu_linux_source(dir, &lx).map_err(|e| eprintln!("qemu Linux source: {e}"))
    } else {
        Err(())
    };
    let fc_src = match fc_bin {
        Some(bin) => {
            fc_linux_source(dir, bin, &lx).map_err(|e| eprintln!("firecracker Linux source: {e}"))
        }
        None => Err(()),
    };
    let mut rows: Vec<(String, Vec<Progress>)> = modes
        .iter()
        .map(|m| (format!("microagent --memory {m}"), Vec::new()))
        .collect();
    let (q_row, fc_row) = (rows.len(), rows.len() + 1);
    rows.push(("qemu -incoming".into(), Vec::new()));
    rows.push(("firecracker snapshot/load (File)".into(), Vec::new()));
    let failed = (f64::NAN, f64::NAN);
    for rep in 0..reps {
        for k in 0..3 {
            match (rep + k) % 3 {
                0 => {
                    let Ok(saved) = ma_src else { continue };
                    for (i, m) in modes.iter().enumerate() {
                        let r = ma_linux_restore(home, &lx, m, saved).unwrap_or_else(|e| {
                            eprintln!("microagent Linux {m} rep {rep}: {e}");
                            failed
                        });
                        println!("  rep {rep} microagent {m}: first progress {} s", f(r.1, 3));
                        rows[i].1.push(r);
                    }
                }
                1 => {
                    let Ok(saved) = q_src else { continue };
                    let r = qemu_linux_restore(dir, &lx, saved).unwrap_or_else(|e| {
                        eprintln!("qemu Linux rep {rep}: {e}");
                        failed
                    });
                    println!("  rep {rep} qemu: first progress {} s", f(r.1, 3));
                    rows[q_row].1.push(r);
                }
                _ => {
                    let (Some(bin), Ok(saved)) = (fc_bin, fc_src) else {
                        continue;
                    };
                    let r = fc_linux_restore(dir, bin, &lx, saved).unwrap_or_else(|e| {
                        eprintln!("firecracker Linux rep {rep}: {e}");
                        failed
                    });
                    println!("  rep {rep} firecracker: first progress {} s", f(r.1, 3));
                    rows[fc_row].1.push(r);
                }
            }
        }
    }
    let _ = ma(home, &["delete", "lx", "--yes"]);
    let first = |i: usize| median(&rows[i].1.iter().map(|r| r.1).collect::<Vec<_>>());
    let (q, fc) = (first(q_row), first(fc_row));
    let best = min(&[q, fc]);
    let table: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .filter(|(_, (_, v))| !v.is_empty())
        .map(|(i, (name, v))| {
            let ok = v.iter().filter(|r| r.1.is_finite()).count();
            let p = first(i);
            vec![
                name.clone(),
                format!("{ok}/{}", v.len()),
                f(median(&v.iter().map(|r| r.0).collect::<Vec<_>>()), 3),
                f(p, 3),
                ratio(p, q),
                ratio(p, fc),
                ratio(p, best),
            ]
        })
        .collect();
    println!(
        "\nLightly used Linux guest restore, medians, seconds from the command's / the VMM's \
         launch; loaded = vCPUs started (microagent: `VM restored` in vmm.log; QEMU: `cont` \
         returned; Firecracker: `PUT /snapshot/load` with `resume_vm` returned); first progress \
         = the first new `tick` line:"
    );
    print_table(
        &[
            "restore",
            "ok",
            "loaded s",
            "first progress s",
            "vs qemu",
            "vs firecracker",
            "vs best peer",
        ],
        &table,
    );
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if !have_kvm() {
        println!("restore benchmark skipped: /dev/kvm is not available");
        return;
    }
    let reps = env_usize("MICROAGENT_BENCH_REPS", 3);
    let mem = env_usize("MICROAGENT_BENCH_MEM_MIB", 1024) as u64;
    let region = env_usize("MICROAGENT_BENCH_REGION_MIB", 900) as u64;
    let modes: Vec<String> = std::env::var("MICROAGENT_BENCH_MODES")
        .unwrap_or_else(|_| "eager,mmap,uffd,hot".into())
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    let hot_pct = env_usize("MICROAGENT_BENCH_HOT_PCT", 100).min(100);
    let cmdline = format!("mode=counter mem={region} tick_ms=0 hot_pct={hot_pct}");
    let dir = scratch("restore");
    let home = dir.join("home");
    let elf = testguest(&dir);
    let with_qemu = have_qemu();
    let fc_bin = firecracker::binary_or_skip("restore");
    if std::env::var("MICROAGENT_BENCH_FULL").is_ok_and(|v| v.trim() == "0") {
        linux(&dir, &home, reps, &modes, fc_bin.as_deref());
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    println!(
        "restore: {mem} MiB test guest, \"{cmdline}\", {reps} repetitions (tool order \
         rotating), medians; modes {modes:?}{}",
        if with_qemu { "" } else { "; QEMU not found" }
    );

    let ma_src = ma_source(&home, mem, &cmdline);
    let q_src = if with_qemu {
        Some(qemu_source(&dir, &elf, mem, &cmdline))
    } else {
        None
    };
    let fc_src = fc_bin
        .as_deref()
        .map(|bin| fc_source(&dir, bin, &elf, mem, &cmdline));
    let mut rows: Vec<(String, f64, Vec<Restore>)> = Vec::new();
    match &ma_src {
        Ok(s) => {
            for m in &modes {
                rows.push((format!("microagent --memory {m}"), s.steady, Vec::new()));
            }
        }
        Err(e) => eprintln!("microagent source: {e}"),
    }
    let q_row = rows.len();
    match &q_src {
        Some(Ok(s)) => rows.push(("qemu -incoming".into(), s.steady, Vec::new())),
        Some(Err(e)) => eprintln!("qemu source: {e}"),
        None => {}
    }
    let fc_row = rows.len();
    match &fc_src {
        Some(Ok(s)) => rows.push((
            "firecracker snapshot/load (File)".into(),
            s.steady,
            Vec::new(),
        )),
        Some(Err(e)) => eprintln!("firecracker source: {e}"),
        None => {}
    }
    for rep in 0..reps {
        // The tool order rotates: microagent, QEMU, Firecracker; then QEMU first, ...
        for k in 0..3 {
            let tool = (rep + k) % 3;
            if tool == 2 {
                if let (Some(bin), Some(Ok(s))) = (&fc_bin, &fc_src) {
                    let r = fc_restore(&dir, bin, mem, s.saved).unwrap_or_else(|e| {
                        eprintln!("firecracker rep {rep}: {e}");
                        FAILED
                    });
                    println!(
                        "  rep {rep} firecracker: first count {} s, first round {} s",
                        f(r.first, 3),
                        f(r.first - r.loaded, 3)
                    );
                    rows[fc_row].2.push(r);
                }
            } else if tool == 0 {
                let Ok(s) = &ma_src else { continue };
                for (k, m) in modes.iter().enumerate() {
                    let r = ma_restore(&home, mem, m, s.saved).unwrap_or_else(|e| {
                        eprintln!("microagent {m} rep {rep}: {e}");
                        FAILED
                    });
                    println!(
                        "  rep {rep} microagent {m}: first count {} s, first round {} s",
                        f(r.first, 3),
                        f(r.first - r.loaded, 3)
                    );
                    rows[k].2.push(r);
                }
            } else if let Some(Ok(s)) = &q_src {
                let r = qemu_restore(&dir, &elf, mem, &cmdline, s.saved).unwrap_or_else(|e| {
                    eprintln!("qemu rep {rep}: {e}");
                    FAILED
                });
                println!(
                    "  rep {rep} qemu: first count {} s, first round {} s",
                    f(r.first, 3),
                    f(r.first - r.loaded, 3)
                );
                rows[q_row].2.push(r);
            }
        }
    }
    let _ = ma(&home, &["delete", "w", "--yes"]);

    let first_of = |row: usize| {
        rows.get(row).map_or(f64::NAN, |(_, _, v)| {
            median(&v.iter().map(|r| r.first).collect::<Vec<_>>())
        })
    };
    let q_first = if matches!(q_src, Some(Ok(_))) {
        first_of(q_row)
    } else {
        f64::NAN
    };
    let fc_first = if matches!(fc_src, Some(Ok(_))) {
        first_of(fc_row)
    } else {
        f64::NAN
    };
    let best_first = min(&[q_first, fc_first]);
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, steady, v)| {
            let m = |g: &dyn Fn(&Restore) -> f64| median(&v.iter().map(g).collect::<Vec<_>>());
            let ok = v.iter().filter(|r| r.first.is_finite()).count();
            let first = m(&|r| r.first);
            let round = m(&|r| r.first - r.loaded);
            vec![
                name.clone(),
                format!("{ok}/{}", v.len()),
                f(m(&|r| r.loaded), 3),
                f(first, 3),
                ratio(first, q_first),
                ratio(first, fc_first),
                ratio(first, best_first),
                f(round, 3),
                f(*steady, 3),
                ratio(round, *steady),
                f(m(&|r| r.next), 3),
                ratio(round, m(&|r| r.next)),
            ]
        })
        .collect();
    println!();
    println!(
        "Full-touch restore, medians, seconds from the command's / QEMU's launch. loaded = the \
         VMM logged `VM restored` (vCPUs started) / incoming migration done and `cont` returned; \
         first round = first count - loaded, against the source's steady round and the restored \
         guest's next rounds (medians of 5 rounds each):"
    );
    print_table(
        &[
            "restore",
            "ok",
            "loaded s",
            "first count s",
            "vs qemu",
            "vs firecracker",
            "vs best peer",
            "first round s",
            "steady round s",
            "first / steady",
            "next rounds s",
            "first / next",
        ],
        &table,
    );
    linux(&dir, &home, reps, &modes, fc_bin.as_deref());
    let _ = std::fs::remove_dir_all(&dir);
}
