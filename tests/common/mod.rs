//! Helpers shared by the end-to-end tests: run the real `microagent` binary and read its output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_microagent"))
}

/// True when this host can run VMs; otherwise prints why the calling test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("{test}: skipped: /dev/kvm is not available on this host");
    false
}

/// Runs `microagent ARGS` to completion, killing it after `timeout`.
pub fn microagent(args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(bin())
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
