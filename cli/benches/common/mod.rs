//! Shared pieces of the microagent benchmarks: a console that timestamps every line, child
//! processes whose output is read into one, a tiny QMP client, and table/statistics helpers.
//!
//! Benchmarks print tables and never assert on time: the machines they run on are noisy and
//! shared, so only ratios measured side by side in one run mean anything.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";

// ---------------------------------------------------------------------------------------------
// Timestamped console lines.

#[derive(Default)]
struct Inner {
    partial: Vec<u8>,
    lines: Vec<(Instant, String)>,
    closed: bool,
}

/// Everything a guest printed, one entry per line with the instant its `\n` arrived.
/// Usable as a `vmm::Console::Writer` (in-process VMs) or fed from a child's stdout.
#[derive(Clone, Default)]
pub struct LineLog(Arc<(Mutex<Inner>, Condvar)>);

impl Write for LineLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for &c in b {
            if c == b'\n' {
                let now = Instant::now();
                let line = String::from_utf8_lossy(&g.partial)
                    .trim_end_matches('\r')
                    .to_string();
                g.partial.clear();
                g.lines.push((now, line));
                any = true;
            } else {
                g.partial.push(c);
            }
        }
        drop(g);
        if any {
            cv.notify_all();
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `cpu<i> count=<n>`
pub fn count_line(l: &str) -> Option<(u32, u64)> {
    let rest = l.strip_prefix("cpu")?;
    let (cpu, count) = rest.split_once(" count=")?;
    Some((cpu.parse().ok()?, count.trim().parse().ok()?))
}

fn is_failure(l: &str) -> bool {
    l.contains("ERROR") || l.contains("testguest: exception") || l.contains("testguest: panic")
}

impl LineLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the stream as ended (the process exited): waits fail at once from now on.
    pub fn close(&self) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_all();
    }

    pub fn len(&self) -> usize {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .len()
    }

    pub fn text(&self) -> String {
        let g = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        for (_, l) in &g.lines {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&String::from_utf8_lossy(&g.partial));
        s
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let g = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        let start = g.lines.len().saturating_sub(n);
        g.lines[start..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn has_failure(&self) -> Option<String> {
        let g = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        g.lines
            .iter()
            .find(|(_, l)| is_failure(l))
            .map(|(_, l)| l.clone())
    }

    /// Waits for the first line at index `from` or later for which `f` says `Some`; returns its
    /// index, arrival instant and `f`'s value. Fails on a guest error line, on the end of the
    /// stream, or at `deadline`.
    pub fn wait_from<T>(
        &self,
        from: usize,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<(usize, Instant, T), String> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        let mut i = from;
        loop {
            while i < g.lines.len() {
                let (t, l) = &g.lines[i];
                if is_failure(l) {
                    return Err(format!("guest failed while waiting for {what}: {l}"));
                }
                if let Some(v) = f(l) {
                    return Ok((i, *t, v));
                }
                i += 1;
            }
            if g.closed {
                return Err(format!("output ended while waiting for {what}"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until every vCPU `0..vcpus` has printed a count of at least `min`; returns the
    /// index just past the line that completed it.
    pub fn wait_all_counts(
        &self,
        vcpus: usize,
        min: u64,
        deadline: Instant,
    ) -> Result<usize, String> {
        let mut best = vec![0u64; vcpus];
        let (i, _, ()) =
            self.wait_from(0, deadline, &format!("every vCPU at count {min}"), |l| {
                if let Some((cpu, n)) = count_line(l) {
                    if let Some(b) = best.get_mut(cpu as usize) {
                        *b = (*b).max(n);
                    }
                }
                best.iter().all(|b| *b >= min).then_some(())
            })?;
        Ok(i + 1)
    }

    /// The next `cpu<cpu> count=` line at index `from` or later with a count above `above`.
    pub fn wait_count(
        &self,
        from: usize,
        cpu: u32,
        above: u64,
        deadline: Instant,
    ) -> Result<(usize, Instant, u64), String> {
        self.wait_from(from, deadline, &format!("cpu{cpu} count > {above}"), |l| {
            count_line(l).and_then(|(c, n)| (c == cpu && n > above).then_some(n))
        })
    }
}

/// Copies a child's pipe into `log` on a thread; closes the log at end of stream.
pub fn pump(mut r: impl Read + Send + 'static, log: LineLog) {
    std::thread::spawn(move || {
        let mut log = log;
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = log.write_all(&buf[..n]);
                }
            }
        }
        log.close();
    });
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A child process whose stdout and stderr are being collected.
pub struct Proc {
    pub child: Child,
    pub out: LineLog,
    pub err: LineLog,
    pub started: Instant,
}

impl Proc {
    /// Spawns `cmd` with stdin closed; `started` is taken just before the spawn.
    pub fn spawn(cmd: &mut Command) -> Result<Self, String> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let out = LineLog::new();
        let err = LineLog::new();
        pump(child.stdout.take().unwrap(), out.clone());
        pump(child.stderr.take().unwrap(), err.clone());
        Ok(Self {
            child,
            out,
            err,
            started,
        })
    }

    /// Waits for the exit (polling every 200 µs), killing the child at `deadline`.
    /// Returns the exit instant and whether it exited with status 0.
    pub fn wait_exit(&mut self, deadline: Instant) -> Result<(Instant, bool), String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok((Instant::now(), st.success())),
                Ok(None) => {}
                Err(e) => return Err(format!("wait: {e}")),
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err("timed out waiting for the process to exit".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Kills this child (by its own pid) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stdout and stderr tails, for error messages.
    pub fn tails(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.out.tail(15),
            self.err.tail(15)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

pub fn have_kvm() -> bool {
    Path::new("/dev/kvm").exists()
}

pub fn have_qemu() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The QEMU command line that boots the test guest the way the platform notes prescribe.
pub fn qemu_command(elf: &Path, mem_mib: u64, vcpus: u8, cmdline: &str) -> Command {
    let mut c = Command::new(QEMU);
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &mem_mib.to_string()])
    .args(["-smp", &vcpus.to_string()])
    .args(["-nographic", "-no-reboot"])
    .arg("-kernel")
    .arg(elf)
    .args(["-append", cmdline]);
    c
}

/// A scratch directory for one benchmark run (`MICROAGENT_BENCH_DIR` or the temp dir). Short,
/// because QMP socket paths must fit in `sun_path`.
pub fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("MICROAGENT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("ma-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("cannot create the benchmark scratch directory");
    d
}

/// Writes the embedded test guest ELF where QEMU (and an in-process VM) can read it.
pub fn testguest(dir: &Path) -> PathBuf {
    let p = dir.join("testguest.elf");
    std::fs::write(&p, testguest_elf::ELF).expect("cannot write the test guest ELF");
    p
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// QMP.

/// A minimal QMP client: one JSON object per line each way.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects (retrying until the socket accepts or `deadline`), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Self, String> {
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to QMP at {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut q = Self {
            w: s.try_clone().map_err(|e| e.to_string())?,
            r: BufReader::new(s),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON {line:?}: {e}"))
    }

    /// Runs one command and returns its `return` value; events in between are skipped.
    pub fn cmd(
        &mut self,
        name: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let mut msg = serde_json::json!({ "execute": name });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.w
            .write_all(text.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {name}: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and tables.

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Median of the finite values (NaN marks a failed run); NaN if there are none.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NAN, |a, b| if a.is_nan() || b < a { b } else { a })
}

/// `x` with `prec` decimals, or `-` for NaN.
pub fn f(x: f64, prec: usize) -> String {
    if x.is_finite() {
        format!("{x:.prec$}")
    } else {
        "-".into()
    }
}

/// `a / b` as `0.00x`, or `-`.
pub fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// Prints rows as a Markdown-style table with aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("| {} |", s.join(" | "));
    };
    line(header.to_vec());
    println!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
    println!();
}

/// Firecracker as a peer (`MICROAGENT_BENCH_FIRECRACKER`).
pub mod firecracker;
