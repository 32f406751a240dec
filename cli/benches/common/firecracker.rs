//! Firecracker as a peer in the benchmarks: a process with an API socket, driven by a tiny
//! HTTP/1.1 client over that socket (one connection per request), the guest's serial console
//! read from its stdout (its own log goes to a file beside the socket).
//!
//! The binary is never built by the project: `MICROAGENT_BENCH_FIRECRACKER=/path/to/firecracker`
//! names it; without it a benchmark prints one line saying its Firecracker columns are skipped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Proc;

pub const ENV: &str = "MICROAGENT_BENCH_FIRECRACKER";

/// Boot arguments for the test-only Linux kernel under Firecracker (`../shared` PEERS notes).
pub const LINUX_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 noxsave clearcpuid=popcnt,smap quiet";

/// A response body is a short JSON document; anything longer is not Firecracker talking.
const MAX_BODY: usize = 1 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The Firecracker binary from `MICROAGENT_BENCH_FIRECRACKER`, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    let Some(p) = std::env::var_os(ENV).filter(|v| !v.is_empty()) else {
        return Err(format!(
            "{ENV} is not set (the path to a firecracker binary)"
        ));
    };
    let p = PathBuf::from(p);
    let out = Command::new(&p)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{ENV}={}: cannot run it: {e}", p.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{ENV}={}: `--version` failed ({})",
            p.display(),
            out.status
        ));
    }
    Ok(p)
}

/// The binary, or `None` after printing the one line that says `bench`'s Firecracker columns
/// are skipped and why.
pub fn binary_or_skip(bench: &str) -> Option<PathBuf> {
    match binary() {
        Ok(p) => Some(p),
        Err(why) => {
            println!("{bench}: Firecracker columns skipped: {why}");
            None
        }
    }
}

/// One Firecracker process.
pub struct Firecracker {
    pub proc: Proc,
    pub sock: PathBuf,
}

impl Firecracker {
    /// Starts `bin` with its API socket `dir/<id>.sock` (log in `dir/<id>.log`) and waits until
    /// the socket accepts a connection.
    pub fn spawn(bin: &Path, dir: &Path, id: &str) -> Result<Self, String> {
        let sock = dir.join(format!("{id}.sock"));
        let log = dir.join(format!("{id}.log"));
        let _ = std::fs::remove_file(&sock);
        let mut c = Command::new(bin);
        c.arg("--api-sock")
            .arg(&sock)
            .args(["--id", id, "--level", "Warning"])
            .arg("--log-path")
            .arg(&log);
        let proc = Proc::spawn(&mut c)?;
        let deadline = proc.started + Duration::from_secs(30);
        loop {
            if UnixStream::connect(&sock).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "firecracker's API socket {} never accepted\n{}",
                    sock.display(),
                    proc.tails()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(Self { proc, sock })
    }

    /// Starts `bin` with no API, booting straight from a configuration file (`--config-file`).
    pub fn spawn_configured(
        bin: &Path,
        dir: &Path,
        id: &str,
        kernel: &Path,
        boot_args: &str,
        mem_mib: u64,
        vcpus: u8,
    ) -> Result<Proc, String> {
        let cfg = dir.join(format!("{id}.json"));
        let log = dir.join(format!("{id}.log"));
        let doc = serde_json::json!({
            "boot-source": { "kernel_image_path": kernel, "boot_args": boot_args },
            "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib },
            "drives": [],
        });
        std::fs::write(&cfg, doc.to_string()).map_err(|e| format!("{}: {e}", cfg.display()))?;
        let mut c = Command::new(bin);
        c.args(["--no-api", "--id", id, "--level", "Warning"])
            .arg("--config-file")
            .arg(&cfg)
            .arg("--log-path")
            .arg(&log);
        Proc::spawn(&mut c)
    }

    /// One request; returns the body of a 2xx answer, an error naming the status otherwise.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, String> {
        request(&self.sock, method, path, body)
            .map_err(|e| format!("firecracker {method} {path}: {e}"))
    }

    pub fn put(&self, path: &str, body: serde_json::Value) -> Result<String, String> {
        self.request("PUT", path, Some(&body))
    }

    /// machine-config, boot-source, InstanceStart.
    pub fn boot(
        &self,
        kernel: &Path,
        boot_args: &str,
        mem_mib: u64,
        vcpus: u8,
    ) -> Result<(), String> {
        self.boot_initrd(kernel, None, boot_args, mem_mib, vcpus)
    }

    /// `boot` with an optional initramfs.
    pub fn boot_initrd(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        boot_args: &str,
        mem_mib: u64,
        vcpus: u8,
    ) -> Result<(), String> {
        self.put(
            "/machine-config",
            serde_json::json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib }),
        )?;
        let mut source = serde_json::json!({ "kernel_image_path": kernel, "boot_args": boot_args });
        if let Some(i) = initrd {
            source["initrd_path"] = serde_json::json!(i);
        }
        self.put("/boot-source", source)?;
        self.put(
            "/actions",
            serde_json::json!({ "action_type": "InstanceStart" }),
        )?;
        Ok(())
    }

    pub fn pause(&self) -> Result<(), String> {
        self.request(
            "PATCH",
            "/vm",
            Some(&serde_json::json!({ "state": "Paused" })),
        )
        .map(drop)
    }

    pub fn resume(&self) -> Result<(), String> {
        self.request(
            "PATCH",
            "/vm",
            Some(&serde_json::json!({ "state": "Resumed" })),
        )
        .map(drop)
    }

    /// A full snapshot of the paused VM: its state to `state`, its memory to `mem` (always
    /// the whole guest size; Firecracker does not fsync it).
    pub fn snapshot_full(&self, state: &Path, mem: &Path) -> Result<(), String> {
        self.put(
            "/snapshot/create",
            serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": state,
                "mem_file_path": mem,
            }),
        )
        .map(drop)
    }

    /// Loads a snapshot into this (fresh) process with the File memory back end (the memory file
    /// mapped MAP_PRIVATE), running it at once when `resume`.
    pub fn load(&self, state: &Path, mem: &Path, resume: bool) -> Result<(), String> {
        self.put(
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": state,
                "mem_backend": { "backend_type": "File", "backend_path": mem },
                "resume_vm": resume,
            }),
        )
        .map(drop)
    }

    /// The process's proportional set size in MiB (0 if it cannot be read).
    pub fn pss_mib(&self) -> f64 {
        pss_mib(self.proc.child.id())
    }

    pub fn kill(mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.sock);
    }
}

pub fn pss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// One HTTP/1.1 request on a fresh connection to `sock`; the answer's body if its status is 2xx.
fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<String, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut msg =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if !body.is_empty() {
        msg.push_str("Content-Type: application/json\r\n");
    }
    msg.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;

    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).map_err(|e| format!("read: {e}"))? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| format!("bad header {h:?}"))?;
            }
        }
    }
    if len > MAX_BODY {
        return Err(format!("answer body of {len} bytes"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|e| format!("read body: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(format!("HTTP {status}: {text}"))
    }
}
