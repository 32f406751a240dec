//! Fork fan-out per memory mode, through the real binary, in one run: a test guest that filled
//! all of its memory once and then keeps touching 5% of it is snapshotted; then for each mode
//! (eager, mmap, uffd, uffd with the recorded working set prefetched) N forks are created and
//! timed until every one reports a count, and their PSS is read. Prints one table.

use std::path::{Path, PathBuf};
use std::process::Command;
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
    let home = std::env::temp_dir().join(format!("ma-forks-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let region = mem.saturating_sub(24).max(1);
    let cmdline = format!("mode=counter mem={region} hot_pct=5 tick_ms=20");
    let mem_s = mem.to_string();
    ma(
        &home,
        &[
            "create",
            "w",
            "--kernel",
            "builtin:testguest",
            "--mem",
            &mem_s,
            "--cmdline",
            &cmdline,
        ],
    );
    ma(&home, &["start", "w"]);
    // Count 3 means round 0 filled the whole region and rounds since touch only 5%.
    let t = Instant::now();
    while !std::fs::read_to_string(ws(&home, "w").join("console.log"))
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
    ma(&home, &["snapshot", "create", "w", "--tag", "s"]);
    ma(&home, &["halt", "w"]);

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
        for &n in &counts {
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
                &home,
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
            while !names.iter().all(|f| counting(&home, f)) {
                assert!(
                    t0.elapsed() < Duration::from_secs(900),
                    "{label} x{n}: forks never counted"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let all = t0.elapsed();
            // Let each fork run a few rounds over its 5% before reading its memory.
            std::thread::sleep(Duration::from_millis(500));
            let pss: f64 = names.iter().map(|f| pss_mib(&home, f)).sum::<f64>() / n as f64;
            println!(
                "| {label:<15} | {n:>5} | {:>16.2} | {:>14.2} | {:>19.3} | {:>16.1} |",
                created.as_secs_f64(),
                all.as_secs_f64(),
                all.as_secs_f64() / n as f64,
                pss
            );
            for f in &names {
                ma(&home, &["delete", f, "--yes"]);
            }
        }
    }
    println!("(uffd+prefetch: the working set the first uffd forks recorded is prefetched)");
    ma(&home, &["delete", "w", "--yes"]);
    let _ = std::fs::remove_dir_all(&home);
}
