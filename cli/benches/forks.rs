//! Fork fan-out per memory mode, through the real binary, in one run: a test guest that filled
//! all of its memory once and then keeps touching 5% of it is snapshotted; then for each mode
//! (eager, mmap, uffd, uffd with the recorded working set prefetched) N forks are created and
//! timed until every one reports a count, and their PSS is read. Prints one table.
//!
//! Then fan-out to many forks of a 256 MiB test guest (`MICROAGENT_BENCH_FANOUT`, default 1000;
//! empty to skip), idle (it halts until its timer between rounds, one round a second) and busy
//! (its vCPU never halts): time to the first fork reported ready, until the command returns
//! with all of them running, until every one has printed a count, and PSS per fork. Every fork
//! is deleted afterwards. `MICROAGENT_BENCH_FORKS=` (empty) skips the per-mode table.
//!
//! Then, with `MICROAGENT_BENCH_FIRECRACKER=/path/to/firecracker`, the same fan-out against
//! Firecracker (`MICROAGENT_BENCH_PEER_FORKS`, default 10,50,100; empty to skip): N forks of a
//! 256 MiB test guest (filled once, then touching 5%), microagent `create --count N` against N
//! Firecracker processes each loading the same full snapshot (File back end, MAP_PRIVATE),
//! their N loads issued by N parallel clients; time until every fork has printed a count, PSS.
//!
//! `MICROAGENT_BENCH_BASELINE=/path/to/an/older/microagent` runs each fan-out with that binary
//! too, side by side in the same run (the same source snapshot, alternating which goes first).
//! A run's forks are stopped (SIGSTOP), not deleted, until its pair has run: on a filesystem
//! without a journal (ext4 here) every inode created within a minute or more of a mass deletion
//! scans past the deleted ones, so the run after a deletion of 1000 workspaces pays for it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ma(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home)
        .args(args)
        .output()
        .expect("run microagent");
    assert!(
        out.status.success(),
        "microagent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ws(home: &Path, name: &str) -> PathBuf {
    home.join("workspaces").join(name)
}

fn counting(home: &Path, name: &str) -> bool {
    std::fs::read_to_string(ws(home, name).join("console.log"))
        .map(|t| t.lines().any(|l| l.starts_with("cpu0 count=")))
        .unwrap_or(false)
}

fn pss_mib(home: &Path, name: &str) -> f64 {
    let pid = std::fs::read_to_string(ws(home, name).join("vmm.pid")).unwrap_or_default();
    let rollup =
        std::fs::read_to_string(format!("/proc/{}/smaps_rollup", pid.trim())).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn main() {
    let mem: u64 = std::env::var("MICROAGENT_BENCH_MEM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let counts: Vec<usize> = std::env::var("MICROAGENT_BENCH_FORKS")
        .unwrap_or_else(|_| "1,10,50".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let fanout: Vec<usize> = std::env::var("MICROAGENT_BENCH_FANOUT")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let home = std::env::temp_dir().join(format!("ma-forks-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    if !counts.is_empty() {
        per_mode(&home, mem, &counts);
    }
    if !fanout.is_empty() {
        fan_out(&home, &fanout);
    }
    peer_fan_out(&home);
    let _ = std::fs::remove_dir_all(&home);
}

/// Boots `name` with `cmdline`, waits until its BSP has counted to 3 (round 0 filled the whole
/// region), captures snapshot `s` and halts it.
fn source(home: &Path, name: &str, mem: u64, cmdline: &str) {
    let mem_s = mem.to_string();
    ma(
        home,
        &[
            "create",
            name,
            "--kernel",
            "builtin:testguest",
            "--mem",
            &mem_s,
            "--cmdline",
            cmdline,
        ],
    );
    ma(home, &["start", name]);
    let t = Instant::now();
    while !std::fs::read_to_string(ws(home, name).join("console.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.strip_prefix("cpu0 count=")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= 3)
        })
    {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the guest never filled its memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ma(home, &["snapshot", "create", name, "--tag", "s"]);
    ma(home, &["halt", name]);
}

fn per_mode(home: &Path, mem: u64, counts: &[usize]) {
    let region = mem.saturating_sub(24).max(1);
    // Count 3 means round 0 filled the whole region and rounds since touch only 5%.
    source(
        home,
        "w",
        mem,
        &format!("mode=counter mem={region} hot_pct=5 tick_ms=20"),
    );

    println!("fork fan-out: {mem} MiB test guest (filled once, then touching 5%), 1 vCPU each");
    println!("| mode            | forks | create returns s | all counting s | per fork to count s | PSS per fork MiB |");
    println!("|-----------------|------:|-----------------:|---------------:|--------------------:|-----------------:|");
    let modes = [
        ("eager", "eager"),
        ("mmap", "mmap"),
        ("uffd", "uffd"),
        ("uffd+prefetch", "uffd"),
    ];
    for (label, mode) in modes {
        for &n in counts {
            if mode == "eager" && (n as u64) * mem * 2 > available_mib() {
                println!(
                    "| {label:<15} | {n:>5} | skipped: {n} x {mem} MiB does not fit in host RAM |"
                );
                continue;
            }
            let prefix = format!("f{}", label.replace('+', ""));
            let n_s = n.to_string();
            let t0 = Instant::now();
            ma(
                home,
                &[
                    "create",
                    &prefix,
                    "--from-snapshot",
                    "w:s",
                    "--count",
                    &n_s,
                    "--memory",
                    mode,
                ],
            );
            let created = t0.elapsed();
            let names: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i}")).collect();
            while !names.iter().all(|f| counting(home, f)) {
                assert!(
                    t0.elapsed() < Duration::from_secs(900),
                    "{label} x{n}: forks never counted"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let all = t0.elapsed();
            // Let each fork run a few rounds over its 5% before reading its memory.
            std::thread::sleep(Duration::from_millis(500));
            let pss: f64 = names.iter().map(|f| pss_mib(home, f)).sum::<f64>() / n as f64;
            println!(
                "| {label:<15} | {n:>5} | {:>16.2} | {:>14.2} | {:>19.3} | {:>16.1} |",
                created.as_secs_f64(),
                all.as_secs_f64(),
                all.as_secs_f64() / n as f64,
                pss
            );
            for f in &names {
                ma(home, &["delete", f, "--yes"]);
            }
        }
    }
    println!("(uffd+prefetch: the working set the first uffd forks recorded is prefetched)");
    ma(home, &["delete", "w", "--yes"]);
}

/// Deletes every workspace in `names`, a few at a time. Their VMMs are killed first: a clean
/// shutdown of each, one after another, waits behind every busy guest still running.
fn delete_all(home: &Path, names: &[String]) {
    for f in names {
        let pid = std::fs::read_to_string(ws(home, f).join("vmm.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: a plain signal to a VMM this benchmark started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(f) = names.get(i) else { break };
                ma(home, &["delete", f, "--yes"]);
            });
        }
    });
}

/// What one fan-out run measured.
struct FanOut {
    first_ready: Duration,
    returned: Duration,
    counting: Duration,
    pss_mib: f64,
    host_mib: f64,
}

/// Stops every VMM in `names` (SIGSTOP): they keep their memory but take no CPU from the runs
/// after them.
fn stop_all(home: &Path, names: &[String]) {
    for f in names {
        let pid = std::fs::read_to_string(ws(home, f).join("vmm.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: a plain signal to a VMM this benchmark started.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
    }
}

/// `create PREFIX --from-snapshot SRC:s --count N --json` with `bin`, reading its per-fork lines
/// as they come; then waits until every fork has printed a count, reads PSS, stops them all
/// (the caller deletes them).
fn fan_out_once(home: &Path, bin: &Path, src: &str, prefix: &str, n: usize) -> FanOut {
    let n_s = n.to_string();
    let from = format!("{src}:s");
    let avail_before = available_mib();
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .env("MICROAGENT_HOME", home)
        .args([
            "--json",
            "create",
            prefix,
            "--from-snapshot",
            &from,
            "--count",
            &n_s,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run microagent");
    let mut first_ready = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        if first_ready.is_none() && line.is_ok_and(|l| l.starts_with("{\"ready\"")) {
            first_ready = Some(t0.elapsed());
        }
    }
    let status = child.wait().expect("wait for microagent");
    let returned = t0.elapsed();
    let names: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i}")).collect();
    if !status.success() {
        delete_all(home, &names);
        panic!("{prefix} x{n}: create failed ({status})");
    }
    let mut pending: Vec<&String> = names.iter().collect();
    while !pending.is_empty() {
        pending.retain(|f| !counting(home, f));
        assert!(
            t0.elapsed() < Duration::from_secs(1800),
            "{prefix} x{n}: {} forks never counted",
            pending.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let counting_at = t0.elapsed();
    // A few rounds each before reading memory.
    std::thread::sleep(Duration::from_secs(3));
    let pss = names.iter().map(|f| pss_mib(home, f)).sum::<f64>() / n as f64;
    let host = avail_before.saturating_sub(available_mib()) as f64 / n as f64;
    stop_all(home, &names);
    FanOut {
        first_ready: first_ready.unwrap_or(returned),
        returned,
        counting: counting_at,
        pss_mib: pss,
        host_mib: host,
    }
}

fn fan_out(home: &Path, counts: &[usize]) {
    const MEM: u64 = 256;
    // One round a second over 1% of a 1 MiB region; between rounds the vCPU halts (idle) or
    // spins (busy). Every round prints, so "counting" is the first round after the fork.
    let guests = [
        ("idle", "mode=counter mem=1 hot_pct=1 tick_ms=0 idle=1000"),
        ("busy", "mode=counter mem=1 hot_pct=1 tick_ms=1000"),
    ];
    let this = PathBuf::from(env!("CARGO_BIN_EXE_microagent"));
    let baseline = std::env::var_os("MICROAGENT_BENCH_BASELINE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    println!();
    println!("fork fan-out: {MEM} MiB test guest, 1 vCPU, memory mmap (MAP_PRIVATE)");
    println!("| guest | forks | binary   | first ready s | create returns (all running) s | all counted s | PSS per fork MiB | host MiB per fork |");
    println!("|-------|------:|----------|--------------:|-------------------------------:|--------------:|-----------------:|------------------:|");
    let mut turn = 0;
    for (label, cmdline) in guests {
        let src = format!("src{label}");
        source(home, &src, MEM, cmdline);
        for &n in counts {
            let mut bins = vec![("this", this.clone())];
            if let Some(b) = &baseline {
                bins.push(("baseline", b.clone()));
                // Alternate which goes first: the first of a pair runs closest to the deletion
                // of the pair before it.
                if turn % 2 == 1 {
                    bins.reverse();
                }
                turn += 1;
            }
            let mut made = Vec::new();
            let mut rows = Vec::new();
            for (i, (which, bin)) in bins.iter().enumerate() {
                let prefix = format!("{label}{i}f");
                let r = fan_out_once(home, bin, &src, &prefix, n);
                made.extend((1..=n).map(|k| format!("{prefix}-{k}")));
                rows.push((*which, r));
            }
            rows.sort_by_key(|(w, _)| *w != "baseline");
            for (which, r) in &rows {
                println!(
                    "| {label:<5} | {n:>5} | {which:<8} | {:>13.2} | {:>30.2} | {:>13.2} | {:>16.2} | {:>17.2} |",
                    r.first_ready.as_secs_f64(),
                    r.returned.as_secs_f64(),
                    r.counting.as_secs_f64(),
                    r.pss_mib,
                    r.host_mib
                );
            }
            if let [(_, a), (_, b)] = rows.as_slice() {
                println!(
                    "|       |       | ratio    | {:>13.2} | {:>30.2} | {:>13.2} | {:>16.2} | {:>17.2} |",
                    b.first_ready.as_secs_f64() / a.first_ready.as_secs_f64(),
                    b.returned.as_secs_f64() / a.returned.as_secs_f64(),
                    b.counting.as_secs_f64() / a.counting.as_secs_f64(),
                    b.pss_mib / a.pss_mib,
                    b.host_mib / a.host_mib
                );
            }
            delete_all(home, &made);
        }
        ma(home, &["delete", &src, "--yes"]);
    }
    println!("(idle: halts until its TSC-deadline timer between rounds; busy: never halts; the forks' vCPUs run only once every fork of the batch is set up; ratio: this / baseline)");
}

// ---------------------------------------------------------------------------------------------
// Fan-out against Firecracker.

mod common;

use common::firecracker::{self, Firecracker};

struct PeerRun {
    counting: Duration,
    pss_mib: f64,
}

/// N Firecracker processes started and loaded from parallel clients, until each one printed a
/// count; then their mean PSS. Every process is killed before returning.
fn fc_fan_out(bin: &Path, dir: &Path, n: usize) -> Result<PeerRun, String> {
    let (state, mem) = (dir.join("fc-state.bin"), dir.join("fc-mem.bin"));
    let t0 = Instant::now();
    let started: Vec<Result<Firecracker, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (state, mem) = (&state, &mem);
                s.spawn(move || {
                    let fc = Firecracker::spawn(bin, dir, &format!("fcf{i}"))?;
                    match fc.load(state, mem, true) {
                        Ok(()) => Ok(fc),
                        Err(e) => {
                            let e = format!("{e}\n{}", fc.proc.tails());
                            fc.kill();
                            Err(e)
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("client panicked".into())))
            .collect()
    });
    let mut forks = Vec::new();
    let mut err = None;
    for r in started {
        match r {
            Ok(fc) => forks.push(fc),
            Err(e) => err = err.or(Some(e)),
        }
    }
    let r = match err {
        Some(e) => Err(e),
        None => (|| {
            let deadline = t0 + Duration::from_secs(1800);
            for fc in &forks {
                fc.proc
                    .out
                    .wait_count(0, 0, 0, deadline)
                    .map_err(|e| format!("{e}\n{}", fc.proc.tails()))?;
            }
            let counting = t0.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            let pss = forks.iter().map(|f| f.pss_mib()).sum::<f64>() / n as f64;
            Ok(PeerRun {
                counting,
                pss_mib: pss,
            })
        })(),
    };
    for fc in forks {
        fc.kill();
    }
    r
}

/// Boots the Firecracker source, waits until its BSP has counted to 3 and writes a full
/// snapshot of it into `dir`.
fn fc_source(bin: &Path, dir: &Path, mem: u64, cmdline: &str) -> Result<(), String> {
    let elf = common::testguest(dir);
    let fc = Firecracker::spawn(bin, dir, "fcsrc")?;
    let r = (|| {
        fc.boot(&elf, cmdline, mem, 1)?;
        fc.proc
            .out
            .wait_all_counts(1, 3, Instant::now() + Duration::from_secs(600))?;
        fc.pause()?;
        fc.snapshot_full(&dir.join("fc-state.bin"), &dir.join("fc-mem.bin"))
    })();
    let r = r.map_err(|e| format!("{e}\n{}", fc.proc.tails()));
    fc.kill();
    r
}

fn peer_fan_out(home: &Path) {
    const MEM: u64 = 256;
    let counts: Vec<usize> = std::env::var("MICROAGENT_BENCH_PEER_FORKS")
        .unwrap_or_else(|_| "10,50,100".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if counts.is_empty() {
        return;
    }
    let Some(bin) = firecracker::binary_or_skip("forks") else {
        return;
    };
    let cmdline = format!("mode=counter mem={} hot_pct=5 tick_ms=20", MEM - 24);
    let dir = home.join("fc");
    let _ = std::fs::create_dir_all(&dir);
    source(home, "peer", MEM, &cmdline);
    if let Err(e) = fc_source(&bin, &dir, MEM, &cmdline) {
        println!("Firecracker source failed: {e}");
        ma(home, &["delete", "peer", "--yes"]);
        return;
    }
    let mut rows = Vec::new();
    for &n in &counts {
        let names: Vec<String> = (1..=n).map(|i| format!("pf-{i}")).collect();
        let t0 = Instant::now();
        ma(
            home,
            &[
                "create",
                "pf",
                "--from-snapshot",
                "peer:s",
                "--count",
                &n.to_string(),
            ],
        );
        let mut pending: Vec<&String> = names.iter().collect();
        while !pending.is_empty() {
            pending.retain(|f| !counting(home, f));
            assert!(
                t0.elapsed() < Duration::from_secs(1800),
                "peer fan-out x{n}: {} forks never counted",
                pending.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let ma_all = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(500));
        let ma_pss = names.iter().map(|f| pss_mib(home, f)).sum::<f64>() / n as f64;
        delete_all(home, &names);
        let fc = fc_fan_out(&bin, &dir, n).unwrap_or_else(|e| {
            eprintln!("firecracker x{n}: {e}");
            PeerRun {
                counting: Duration::MAX,
                pss_mib: f64::NAN,
            }
        });
        let fc_all = if fc.counting == Duration::MAX {
            f64::NAN
        } else {
            fc.counting.as_secs_f64()
        };
        println!(
            "  x{n}: microagent {ma_all:.2} s, {ma_pss:.1} MiB; firecracker {} s, {} MiB",
            common::f(fc_all, 2),
            common::f(fc.pss_mib, 1)
        );
        rows.push(vec![
            n.to_string(),
            common::f(ma_all, 2),
            common::f(fc_all, 2),
            common::ratio(ma_all, fc_all),
            common::f(ma_pss, 1),
            common::f(fc.pss_mib, 1),
            common::ratio(ma_pss, fc.pss_mib),
        ]);
    }
    println!();
    println!(
        "fork fan-out against Firecracker (the only peer that forks): {MEM} MiB test guest \
         (filled once, then touching 5%), 1 vCPU each; microagent `create --count N` (default \
         memory mode) vs N Firecracker processes loading one full snapshot (File back end) from \
         N parallel clients; seconds from the command / the first spawn until every fork counted"
    );
    common::print_table(
        &[
            "forks",
            "microagent all counting s",
            "firecracker all counting s",
            "vs firecracker (best peer)",
            "microagent PSS per fork MiB",
            "firecracker PSS per fork MiB",
            "PSS vs firecracker",
        ],
        &rows,
    );
    ma(home, &["delete", "peer", "--yes"]);
}
