//! Helpers shared by the end-to-end tests: run the real `microagent` binary and read its output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub mod oci;
#[path = "require.rs"]
pub mod require;
pub mod s3;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_microagent"))
}

/// True when this host can run VMs; otherwise prints why the calling test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    require::skip(test, "kvm", "/dev/kvm is not available on this host");
    false
}

/// Runs `microagent ARGS` to completion, killing it after `timeout`.
pub fn microagent(args: &[&str], timeout: Duration) -> Output {
    microagent_in(None, args, timeout)
}

/// As `microagent`, with `MICROAGENT_HOME` set for the child only (tests run in parallel).
pub fn microagent_in(home: Option<&Path>, args: &[&str], timeout: Duration) -> Output {
    microagent_env(home, args, &[], timeout)
}

/// As `microagent_in`, with extra environment variables for the child.
pub fn microagent_env(
    home: Option<&Path>,
    args: &[&str],
    env: &[(String, String)],
    timeout: Duration,
) -> Output {
    let mut cmd = Command::new(bin());
    if let Some(h) = home {
        cmd.env("MICROAGENT_HOME", h);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microagent");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: signal 0 only probes whether the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return false;
            }
        }
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output().expect("wait microagent");
    let killed = killer.join().unwrap_or(false);
    assert!(
        !killed,
        "microagent {args:?} did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every `cpu<i> count=<n>` line as (i, n).
pub fn counts(out: &str) -> Vec<(u32, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cpu")?;
            let (cpu, count) = rest.split_once(" count=")?;
            Some((cpu.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// The values of `testguest: done cpu0=<a> cpu1=<b> ...`, in vCPU order.
pub fn done_counts(out: &str) -> Option<Vec<u64>> {
    let line = out.lines().find(|l| l.starts_with("testguest: done "))?;
    line["testguest: done ".len()..]
        .split_whitespace()
        .map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect()
}

/// A private state root for one test; removed (with any VMM still running in it) on drop.
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ma-home-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Home { dir }
    }

    /// Runs `microagent ARGS` with this state root. The leash is long because a Linux guest's boot
    /// (to its agent) or capture takes minutes on a loaded nested-KVM host, where 120 s was seen
    /// to run out; a command that hangs still fails the test, only later. The command's own
    /// deadlines (the agent's, the VMM's ready line) are what the tests check.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_timeout(args, Duration::from_secs(600))
    }

    pub fn run_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        microagent_in(Some(&self.dir), args, timeout)
    }

    /// Runs and insists on success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "microagent {args:?} failed ({:?}):\n{}\n{}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    pub fn ws(&self, name: &str) -> PathBuf {
        self.dir.join("workspaces").join(name)
    }

    pub fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.ws(name).join("console.log")).unwrap_or_default()
    }

    pub fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.ws(name).join("vmm.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Waits until `name`'s console shows every vCPU above `floor`; returns the last counts.
    pub fn wait_counts(&self, name: &str, floor: &[u64]) -> Vec<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.console(name);
            let mut last = vec![None; floor.len()];
            for (cpu, n) in counts(&text) {
                if let Some(slot) = last.get_mut(cpu as usize) {
                    *slot = Some(n);
                }
            }
            if last
                .iter()
                .zip(floor)
                .all(|(l, f)| l.is_some_and(|l| l > *f))
            {
                return last.into_iter().map(|l| l.unwrap_or(0)).collect();
            }
            assert!(!text.contains("ERROR"), "{name}: guest error:\n{text}");
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: counts never passed {floor:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Stop any VMM a failed test left behind, then remove the state.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("workspaces")) {
            for e in entries.flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path().join("vmm.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: killing a VMM this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only probes.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// The u64 at guest-physical `addr` in a snapshot's memory file.
pub fn memory_u64(snapshot_dir: &Path, addr: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(snapshot_dir.join("memory.bin")).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, addr).unwrap();
    u64::from_le_bytes(b)
}

/// The guest-physical address of each vCPU's counter, from `layout=1` lines.
pub fn state_addrs(console: &str, vcpus: usize) -> Vec<u64> {
    (0..vcpus)
        .map(|cpu| {
            let prefix = format!("testguest: layout cpu={cpu} ");
            let line = console
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no layout line for cpu{cpu}:\n{console}"));
            let v = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("state=0x"))
                .unwrap();
            u64::from_str_radix(v, 16).unwrap()
        })
        .collect()
}
