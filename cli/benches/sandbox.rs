//! The sandbox's cost, side by side in one run: boot to ready, snapshot capture, a fork of 10 and
//! a vsock round trip, with jail + seccomp (the default) and with `--no-jail --no-seccomp`,
//! through the real binary. Rounds alternate between the two so drift on a shared machine hits
//! both alike. Prints one table of medians and the overhead.
//!
//! The round trip: a host client on the workspace's `vsock.sock` (`CONNECT 5000`), through the
//! VMM's vsock device, to the test guest's echo service (`mode=vsock`) and back, 64 bytes at a
//! time; the median of many per round.
//!
//! `MICROAGENT_BENCH_BASELINE=/path/to/an/older/microagent` also measures this build against
//! that binary, side by side in the same run, both with the default jail + seccomp, rounds
//! alternating which binary goes first, each binary in its own `MICROAGENT_HOME` (an older
//! state layout may differ): boot to ready, snapshot capture, rollback (`start NAME
//! --from-snapshot TAG` of the halted workspace, `--memory eager` and `--memory mmap`, to the
//! first count line of the restored guest's fresh console) and a fork of 10 (until every fork
//! counts). Prints a second table: medians (with the rounds' range) and the ratio this /
//! baseline. Only flags both binaries have are used.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ma(home: &Path, args: &[&str]) -> String {
    ma_with(Path::new(env!("CARGO_BIN_EXE_microagent")), home, args)
}

/// `ma` with the binary `bin` (this build or the baseline).
fn ma_with(bin: &Path, home: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
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
    rtt: Vec<f64>,
}

/// Round trips timed per round (after as many untimed ones).
const ROUND_TRIPS: usize = 300;

fn console_has(home: &Path, name: &str, what: &str) -> bool {
    std::fs::read_to_string(ws(home, name).join("console.log"))
        .map(|t| t.contains(what))
        .unwrap_or(false)
}

/// `CONNECT port` on the workspace's hybrid vsock socket, up to the VMM's `OK <hostport>`.
fn vsock_connect(home: &Path, name: &str, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(ws(home, name).join("vsock.sock")).expect("vsock.sock");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(
            s.read(&mut b).expect("answer to CONNECT"),
            1,
            "vsock.sock closed"
        );
        line.push(b[0]);
        assert!(line.len() < 64, "bad answer to CONNECT: {line:?}");
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

/// The median time of a 64-byte message to the guest's echo service and back.
fn vsock_rtt(home: &Path, label: &str, extra: &[&str], mem: &str) -> f64 {
    let name = format!("v{label}");
    let mut create = vec![
        "create",
        &name,
        "--kernel",
        "builtin:testguest",
        "--mem",
        mem,
        "--cmdline",
        "mode=vsock vsock_port=5000",
    ];
    create.extend_from_slice(extra);
    ma(home, &create);
    ma(home, &["start", &name]);
    let t0 = Instant::now();
    while !console_has(home, &name, "testguest: vsock ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "{name} never ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut s = vsock_connect(home, &name, 5000);
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..2 * ROUND_TRIPS {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).expect("echo");
        if i >= ROUND_TRIPS {
            times.push(t.elapsed().as_secs_f64());
        }
        assert_eq!(back, msg);
    }
    drop(s);
    ma(home, &["delete", &name, "--yes"]);
    median(times)
}

/// `create NAME` of the counting test guest with `mem` MiB.
fn counter_create<'a>(name: &'a str, mem: &'a str) -> Vec<&'a str> {
    vec![
        "create",
        name,
        "--kernel",
        "builtin:testguest",
        "--mem",
        mem,
        "--cmdline",
        "mode=counter mem=8 tick_ms=5",
    ]
}

fn round(home: &Path, label: &str, extra: &[&str], mem: &str, forks: usize, t: &mut Times) {
    let name = format!("b{label}");
    let mut create = counter_create(&name, mem);
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
    t.rtt.push(vsock_rtt(home, label, extra, mem));
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
    println!(
        "| what                           | jail + seccomp | no jail, no seccomp | overhead |"
    );
    println!(
        "|--------------------------------|---------------:|--------------------:|---------:|"
    );
    for (what, scale, a, b) in [
        ("boot to ready (s)", 1.0, on.boot, off.boot),
        ("snapshot capture (s)", 1.0, on.capture, off.capture),
        (
            &*format!("fork of {forks}, all counting (s)"),
            1.0,
            on.fork10,
            off.fork10,
        ),
        ("vsock round trip, 64 B (us)", 1e6, on.rtt, off.rtt),
    ] {
        let (a, b) = (median(a), median(b));
        println!(
            "| {what:<30} | {:>14.3} | {:>19.3} | {:>+7.1}% |",
            a * scale,
            b * scale,
            (a / b - 1.0) * 100.0
        );
    }
    let _ = std::fs::remove_dir_all(&home);
    let baseline = std::env::var_os("MICROAGENT_BENCH_BASELINE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(b) = baseline {
        against_baseline(&b, rounds, forks, &mem);
    }
}

// ---------------------------------------------------------------------------------------------
// This build against an older binary (`MICROAGENT_BENCH_BASELINE`).

/// The memory modes a rollback is timed in (both binaries have `--memory`; their defaults
/// differ, so each is given explicitly).
const ROLLBACK_MODES: [&str; 2] = ["eager", "mmap"];

#[derive(Default)]
struct Versus {
    boot: Vec<f64>,
    capture: Vec<f64>,
    rollback: [Vec<f64>; ROLLBACK_MODES.len()],
    fork: Vec<f64>,
}

/// One round with `bin` in `home`, jail + seccomp (the default): boot to ready, capture, a fork
/// of `forks` until all count, then rollbacks of the halted workspace to the capture, one per
/// mode, each to its first count line. Everything is deleted afterwards.
fn versus_round(bin: &Path, home: &Path, label: &str, mem: &str, forks: usize, t: &mut Versus) {
    let name = format!("r{label}");
    ma_with(bin, home, &counter_create(&name, mem));
    let t0 = Instant::now();
    ma_with(bin, home, &["start", &name]);
    t.boot
        .push(wait_counting(home, std::slice::from_ref(&name), t0).as_secs_f64());
    let t0 = Instant::now();
    ma_with(bin, home, &["snapshot", "create", &name, "--tag", "s"]);
    t.capture.push(t0.elapsed().as_secs_f64());
    let src = format!("{name}:s");
    let prefix = format!("g{label}");
    let n = forks.to_string();
    let t0 = Instant::now();
    ma_with(
        bin,
        home,
        &["create", &prefix, "--from-snapshot", &src, "--count", &n],
    );
    let names: Vec<String> = (1..=forks).map(|i| format!("{prefix}-{i}")).collect();
    t.fork.push(wait_counting(home, &names, t0).as_secs_f64());
    for f in &names {
        ma_with(bin, home, &["delete", f, "--yes"]);
    }
    ma_with(bin, home, &["halt", &name]);
    for (i, mode) in ROLLBACK_MODES.iter().enumerate() {
        // A fresh console: its first count line is the restored guest's (the VMM is halted,
        // nothing writes the old one).
        let _ = std::fs::remove_file(ws(home, &name).join("console.log"));
        let t0 = Instant::now();
        ma_with(
            bin,
            home,
            &["start", &name, "--from-snapshot", "s", "--memory", mode],
        );
        t.rollback[i].push(wait_counting(home, std::slice::from_ref(&name), t0).as_secs_f64());
        ma_with(bin, home, &["halt", &name]);
    }
    ma_with(bin, home, &["delete", &name, "--yes"]);
}

/// The median and the rounds' range, scaled.
fn cell(v: &[f64], scale: f64) -> (f64, String) {
    let m = median(v.to_vec());
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (
        m,
        format!("{:.3} ({:.3}-{:.3})", m * scale, lo * scale, hi * scale),
    )
}

fn against_baseline(baseline: &Path, rounds: usize, forks: usize, mem: &str) {
    let this = PathBuf::from(env!("CARGO_BIN_EXE_microagent"));
    let pid = std::process::id();
    let homes = [
        std::env::temp_dir().join(format!("ma-sandbox-bench-{pid}-this")),
        std::env::temp_dir().join(format!("ma-sandbox-bench-{pid}-baseline")),
    ];
    for h in &homes {
        let _ = std::fs::remove_dir_all(h);
        std::fs::create_dir_all(h).unwrap();
    }
    let bins = [("t", this.as_path()), ("o", baseline)];
    let mut times = [Versus::default(), Versus::default()];
    // One warm-up of each, not counted.
    for (i, (label, bin)) in bins.iter().enumerate() {
        let l = format!("w{label}");
        versus_round(bin, &homes[i], &l, mem, 2, &mut Versus::default());
    }
    for r in 0..rounds {
        // Alternate which binary goes first.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (label, bin) = bins[i];
            versus_round(bin, &homes[i], label, mem, forks, &mut times[i]);
        }
    }
    let [a, b] = times;
    println!();
    println!(
        "this build against the baseline ({}): {mem} MiB test guest, 1 vCPU, jail + seccomp, median of {rounds} alternating rounds (range in brackets)",
        baseline.display()
    );
    println!(
        "| measured                        | this build            | baseline              | ratio |"
    );
    println!(
        "|---------------------------------|----------------------:|----------------------:|------:|"
    );
    let mut rows = vec![
        ("boot to ready (s)".to_string(), &a.boot, &b.boot),
        ("snapshot capture (s)".to_string(), &a.capture, &b.capture),
    ];
    for (i, mode) in ROLLBACK_MODES.iter().enumerate() {
        rows.push((
            format!("rollback, --memory {mode} (s)"),
            &a.rollback[i],
            &b.rollback[i],
        ));
    }
    rows.push((
        format!("fork of {forks}, all counting (s)"),
        &a.fork,
        &b.fork,
    ));
    for (what, x, y) in rows {
        let (mx, cx) = cell(x, 1.0);
        let (my, cy) = cell(y, 1.0);
        println!("| {what:<31} | {cx:>21} | {cy:>21} | {:>5.2} |", mx / my);
    }
    println!("(boot: `start` to the first count line; rollback: `start --from-snapshot` of the halted workspace to its first count line; ratio: this / baseline)");
    for h in &homes {
        let _ = std::fs::remove_dir_all(h);
    }
}
