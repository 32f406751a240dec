//! The sandbox's cost, side by side in one run: boot to ready, snapshot capture and a fork of 10,
//! with jail + seccomp (the default) and with `--no-jail --no-seccomp`, through the real binary.
//! Rounds alternate between the two so drift on a shared machine hits both alike. Prints one
//! table of medians and the overhead.

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

fn wait_counting(home: &Path, names: &[String], since: Instant) -> Duration {
    while !names.iter().all(|n| counting(home, n)) {
        assert!(
            since.elapsed() < Duration::from_secs(600),
            "never counted: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    since.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Default)]
struct Times {
    boot: Vec<f64>,
    capture: Vec<f64>,
    fork10: Vec<f64>,
}

fn round(home: &Path, label: &str, extra: &[&str], mem: &str, forks: usize, t: &mut Times) {
    let name = format!("b{label}");
    let mut create = vec![
        "create",
        &name,
        "--kernel",
        "builtin:testguest",
        "--mem",
        mem,
        "--cmdline",
        "mode=counter mem=8 tick_ms=5",
    ];
    create.extend_from_slice(extra);
    ma(home, &create);
    // Boot to ready: `start` until the guest's first count line.
    let t0 = Instant::now();
    ma(home, &["start", &name]);
    t.boot
        .push(wait_counting(home, std::slice::from_ref(&name), t0).as_secs_f64());
    let t0 = Instant::now();
    ma(home, &["snapshot", "create", &name, "--tag", "s"]);
    t.capture.push(t0.elapsed().as_secs_f64());
    let src = format!("{name}:s");
    let prefix = format!("f{label}");
    let n = forks.to_string();
    let mut fork = vec!["create", &prefix, "--from-snapshot", &src, "--count", &n];
    fork.extend_from_slice(extra);
    let t0 = Instant::now();
    ma(home, &fork);
    let names: Vec<String> = (1..=forks).map(|i| format!("{prefix}-{i}")).collect();
    t.fork10.push(wait_counting(home, &names, t0).as_secs_f64());
    for f in &names {
        ma(home, &["delete", f, "--yes"]);
    }
    ma(home, &["delete", &name, "--yes"]);
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        println!("sandbox bench skipped: /dev/kvm is not available");
        return;
    }
    let rounds: usize = std::env::var("MICROAGENT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let forks: usize = std::env::var("MICROAGENT_BENCH_FORKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mem = std::env::var("MICROAGENT_BENCH_MEM_MIB").unwrap_or_else(|_| "256".into());
    let home = std::env::temp_dir().join(format!("ma-sandbox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let mut on = Times::default();
    let mut off = Times::default();
    // One warm-up of each, not counted (page cache, first-run effects).
    round(&home, "won", &[], &mem, 2, &mut Times::default());
    round(
        &home,
        "woff",
        &["--no-jail", "--no-seccomp"],
        &mem,
        2,
        &mut Times::default(),
    );
    for _ in 0..rounds {
        round(&home, "on", &[], &mem, forks, &mut on);
        round(
            &home,
            "off",
            &["--no-jail", "--no-seccomp"],
            &mem,
            forks,
            &mut off,
        );
    }
    println!(
        "sandbox overhead: {mem} MiB test guest, 1 vCPU, median of {rounds} alternating rounds"
    );
    println!("| what                      | jail + seccomp s | no jail, no seccomp s | overhead |");
    println!("|---------------------------|-----------------:|----------------------:|---------:|");
    for (what, a, b) in [
        ("boot to ready", on.boot, off.boot),
        ("snapshot capture", on.capture, off.capture),
        (
            &*format!("fork of {forks} (all counting)"),
            on.fork10,
            off.fork10,
        ),
    ] {
        let (a, b) = (median(a), median(b));
        println!(
            "| {what:<25} | {a:>16.3} | {b:>21.3} | {:>+7.1}% |",
            (a / b - 1.0) * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&home);
}
