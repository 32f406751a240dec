//! Agent benchmarks over the Unix-socket transport on the host (no VM): exec round trip of `true`,
//! stdout throughput of `cat` of a large file, and file transfer, printed as one table.
//!
//! `cargo bench -p guest-agent --bench agent` (env `AGENT_BENCH_RUNS`, `AGENT_BENCH_MIB` to resize).
//! Numbers, not assertions: compare against earlier runs on the same machine.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_agent::protocol::messages::{ExecRequest, WriteFileRequest};
use guest_agent::{Client, Server, ServerConfig};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `len` bytes of a repeating non-zero pattern.
struct Pattern(u64);

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.0) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        self.0 -= n as u64;
        Ok(n)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs = env_or("AGENT_BENCH_RUNS", 500);
    let mib = env_or("AGENT_BENCH_MIB", 256);
    let dir = TempDir(std::env::temp_dir().join(format!("agent-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let socket = dir.0.join("agent.sock");
    let server = Server::new(ServerConfig {
        secrets_dir: dir.0.join("secrets"),
        freeze_only: Some(Vec::new()),
        etc_dir: dir.0.clone(),
        set_kernel_hostname: false,
        log_errors: false,
        vm_sysctl_dir: None,
        ..ServerConfig::default()
    });
    server.spawn(UnixListener::bind(&socket)?)?;
    let client = Client::connect_unix(&socket)?;

    let mut rows: Vec<(String, String, String)> = Vec::new();

    // Ping round trip.
    let mut pings: Vec<Duration> = (0..runs.max(1) * 4)
        .map(|_| client.ping())
        .collect::<Result<_, _>>()?;
    pings.sort();
    let mean = pings.iter().sum::<Duration>() / pings.len() as u32;
    rows.push((
        "ping round trip".into(),
        format!("{} runs", pings.len()),
        format!(
            "mean {} · p50 {} · p99 {}",
            micros(mean),
            micros(percentile(&pings, 0.5)),
            micros(percentile(&pings, 0.99))
        ),
    ));

    // Exec round trip of `true`, interleaved with the same spawn done locally (std::process, output
    // piped and waited for) so that both see the same machine load.
    for _ in 0..10 {
        client.exec_output(cmd(&["true"]))?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut local = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = client.exec_output(cmd(&["true"]))?;
        times.push(start.elapsed());
        if out.status.code != Some(0) {
            return Err(format!("true exited with {:?}", out.status).into());
        }
        let start = Instant::now();
        std::process::Command::new("true").output()?;
        local.push(start.elapsed());
    }
    for (name, mut samples) in [
        ("exec `true` round trip", times),
        ("baseline: local spawn of `true`", local),
    ] {
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
        rows.push((
            name.into(),
            format!("{runs} runs"),
            format!(
                "mean {} · p50 {} · p99 {}",
                micros(mean),
                micros(percentile(&samples, 0.5)),
                micros(percentile(&samples, 0.99))
            ),
        ));
    }

    // A large file to cat and to transfer.
    let bytes = (mib as u64) << 20;
    let big = dir.0.join("big.bin");
    let start = Instant::now();
    let req = WriteFileRequest {
        path: big.to_string_lossy().into_owned(),
        mode: 0o644,
        uid: None,
        gid: None,
        create_dirs: false,
    };
    client.write_file(req, Pattern(bytes))?;
    let up = start.elapsed();
    rows.push((
        "write-file (upload, fsync)".into(),
        format!("{mib} MiB"),
        format!("{:.0} MiB/s", mib as f64 / up.as_secs_f64()),
    ));

    let mut best_cat = Duration::MAX;
    let mut best_read = Duration::MAX;
    for _ in 0..3 {
        let mut got = 0u64;
        let start = Instant::now();
        let status = client.exec(cmd(&["cat", &big.to_string_lossy()]), |_, d| {
            got += d.len() as u64
        })?;
        best_cat = best_cat.min(start.elapsed());
        if status.code != Some(0) || got != bytes {
            return Err(format!("cat: {status:?}, {got} bytes").into());
        }
        let mut sink = Counter(0);
        let start = Instant::now();
        client.read_file(&big.to_string_lossy(), &mut sink)?;
        best_read = best_read.min(start.elapsed());
        if sink.0 != bytes {
            return Err(format!("read-file: {} bytes", sink.0).into());
        }
    }
    rows.push((
        "exec `cat` stdout throughput".into(),
        format!("{mib} MiB, best of 3"),
        format!("{:.0} MiB/s", mib as f64 / best_cat.as_secs_f64()),
    ));
    rows.push((
        "read-file (download)".into(),
        format!("{mib} MiB, best of 3"),
        format!("{:.0} MiB/s", mib as f64 / best_read.as_secs_f64()),
    ));

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    println!(
        "guest-agent over a Unix socket (host, no VM; {} CPUs)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| {:w0$} | {:w1$} | result", "benchmark", "size");
    println!("|-{}-|-{}-|-------", "-".repeat(w0), "-".repeat(w1));
    for (a, b, c) in rows {
        println!("| {a:w0$} | {b:w1$} | {c}");
    }
    Ok(())
}
