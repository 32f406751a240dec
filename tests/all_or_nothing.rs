//! Nothing half-done: every command a user can be half-served by either completes or leaves
//! nothing behind, with the failure injected where it would really happen (the binary is built
//! with the test-only hooks of cli/src/testhooks.rs). Also pause and resume.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn boot(h: &Home, name: &str) {
    h.ok(&[
        "create",
        name,
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
        "--cmdline",
        "mode=counter mem=2 tick_ms=5 layout=1",
    ]);
    h.ok(&["start", name]);
    h.wait_counts(name, &[10]);
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Every entry of the workspaces directory, hidden ones included.
fn entries(h: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(h.dir.join("workspaces"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs the binary with one extra environment variable (a test hook).
fn run_with(h: &Home, env: (&str, &str), args: &[&str]) -> std::process::Output {
    let child = Command::new(bin())
        .env("MICROAGENT_HOME", &h.dir)
        .env(env.0, env.1)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn last_count(h: &Home, name: &str) -> u64 {
    counts(&h.console(name)).last().map(|c| c.1).unwrap_or(0)
}

#[test]
fn refused_import_leaves_no_workspace() {
    if !kvm_or_skip("refused_import_leaves_no_workspace") {
        return;
    }
    let h = Home::new("import-none");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "x"]);
    let file = h.dir.join("x.tar.zst");
    h.ok(&["snapshot", "export", "w", "x", file.to_str().unwrap()]);
    let bytes = std::fs::read(&file).unwrap();
    let mut flipped = bytes.clone();
    let at = flipped.len() * 2 / 3;
    flipped[at] ^= 0x55;
    for (what, data) in [
        ("truncated", &bytes[..bytes.len() / 2]),
        ("flipped", &flipped[..]),
    ] {
        let p = h.dir.join(format!("{what}.tar.zst"));
        std::fs::write(&p, data).unwrap();
        let o = h.run(&["snapshot", "import", p.to_str().unwrap(), "--as", "fresh"]);
        assert_ne!(o.status.code(), Some(0), "{what} archive was imported");
        assert!(
            !h.ws("fresh").exists(),
            "{what}: the refused import left workspace `fresh` behind"
        );
        assert_eq!(entries(&h), ["w"], "{what}: leftovers");
        let names: Vec<_> = json(&h.ok(&["--json", "list"]))["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["w"]);
    }
    // The good archive still imports under that name: the refusals blocked nothing.
    h.ok(&[
        "snapshot",
        "import",
        file.to_str().unwrap(),
        "--as",
        "fresh",
    ]);
    assert!(h.ws("fresh").join("snapshots/x/manifest.json").is_file());
    h.ok(&["delete", "w", "--yes"]);
    h.ok(&["delete", "fresh", "--yes"]);
}

#[test]
fn failed_create_leaves_no_workspace() {
    let h = Home::new("create-none");
    // A build step that fails after the directory is being filled.
    let o = run_with(
        &h,
        ("MICROAGENT_TEST_FAIL_AT", "create-fill"),
        &["create", "w", "--kernel", "builtin:testguest"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("injected failure at create-fill"));
    assert!(entries(&h).is_empty(), "left {:?}", entries(&h));
    // An image that cannot be had: no workspace either.
    let o = h.run(&[
        "create",
        "img",
        "--image",
        "docker-archive:/nonexistent/image.tar",
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(!h.ws("img").exists(), "{:?}", entries(&h));
    // And the same command without the failure works.
    h.ok(&["create", "w", "--kernel", "builtin:testguest"]);
    assert_eq!(entries(&h), ["w"]);
}

#[test]
fn a_failing_fork_removes_its_whole_batch_and_is_named() {
    if !kvm_or_skip("a_failing_fork_removes_its_whole_batch_and_is_named") {
        return;
    }
    let h = Home::new("fork-batch");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let o = run_with(
        &h,
        ("MICROAGENT_TEST_FAIL_AT", "fork-spawn-f-2"),
        &["create", "f", "--from-snapshot", "w:base", "--count", "3"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("fork f-2 failed"), "{err}");
    // f-1 had already started: it is gone with its process.
    assert_eq!(entries(&h), ["w"], "{err}");
    let vmms = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("__vmm")
                        && c.contains(&*h.dir.to_string_lossy())
                        && c.contains("/f-")
                })
                .unwrap_or(false)
        })
        .count();
    assert_eq!(vmms, 0, "a fork's VMM outlived its removed batch");
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn a_delete_killed_half_way_is_finished_by_the_next_command() {
    let h = Home::new("delete-crash");
    h.ok(&["create", "w", "--kernel", "builtin:testguest"]);
    let o = run_with(
        &h,
        ("MICROAGENT_TEST_CRASH_AT", "delete-renamed"),
        &["delete", "w", "--yes"],
    );
    assert_eq!(o.status.code(), None, "the delete was not killed");
    // Killed after the rename: no workspace w, only the hidden remains.
    let left = entries(&h);
    assert!(
        left.len() == 1 && left[0].starts_with(".deleting-w-"),
        "{left:?}"
    );
    let o = h.run(&["status", "w"]);
    assert_eq!(o.status.code(), Some(3));
    // The next command sweeps what the killed one left.
    let l = json(&h.ok(&["--json", "list"]));
    assert_eq!(l["workspaces"].as_array().unwrap().len(), 0);
    assert!(entries(&h).is_empty(), "{:?}", entries(&h));
    assert!(!Path::new(&h.dir.join("workspaces").join(&left[0])).exists());
}

#[test]
fn pause_snapshot_resume_continues_the_count() {
    if !kvm_or_skip("pause_snapshot_resume_continues_the_count") {
        return;
    }
    let h = Home::new("pause");
    boot(&h, "w");
    let p = json(&h.ok(&["--json", "pause", "w"]));
    assert_eq!(p["state"], "paused");
    std::thread::sleep(Duration::from_millis(100));
    let stopped_at = last_count(&h, "w");
    let len = h.console("w").len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.console("w").len(), len, "the guest printed while paused");
    let st = json(&h.ok(&["--json", "status", "w"]));
    assert_eq!(st["state"], "paused");
    assert!(st["paused_ms"].as_u64().unwrap() >= 300, "{st}");
    assert!(h.ok(&["status", "w"]).contains("state:     paused for "));
    // A capture of a paused workspace leaves it paused.
    h.ok(&["snapshot", "create", "w", "--tag", "p"]);
    assert_eq!(json(&h.ok(&["--json", "status", "w"]))["state"], "paused");
    assert_eq!(
        h.console("w").len(),
        len,
        "the guest ran during the capture"
    );
    // Pausing twice is harmless; resume continues from where it stopped.
    assert!(h.ok(&["pause", "w"]).contains("already paused"));
    assert_eq!(json(&h.ok(&["--json", "resume", "w"]))["state"], "running");
    let after = h.wait_counts("w", &[stopped_at])[0];
    let first = counts(&h.console("w"))
        .into_iter()
        .map(|c| c.1)
        .find(|&c| c > stopped_at)
        .unwrap();
    assert!(
        first <= stopped_at + 100,
        "after resume the count jumped from {stopped_at} to {first}"
    );
    assert!(after > stopped_at);
    // `start` on a paused workspace resumes it too.
    h.ok(&["pause", "w"]);
    let again = last_count(&h, "w");
    assert!(h.ok(&["start", "w"]).contains("workspace w resumed"));
    h.wait_counts("w", &[again + 5]);
    // Only a running workspace pauses.
    h.ok(&["halt", "w"]);
    assert_eq!(h.run(&["pause", "w"]).status.code(), Some(4));
    assert_eq!(h.run(&["resume", "w"]).status.code(), Some(4));
    h.ok(&["delete", "w", "--yes"]);
}

/// Restores skip re-hashing files a verified stamp vouches for; a byte changed in memory.bin
/// after the stamp was taken (right after a capture and after a restore) must still be refused,
/// by a rollback and by a fork, with the workspace left as it was.
#[test]
fn a_flipped_byte_in_memory_is_refused_after_stamps() {
    if !kvm_or_skip("a_flipped_byte_in_memory_is_refused_after_stamps") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let h = Home::new("stamp-flip");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "s"]);
    let dir = h.ws("w").join("snapshots/s");
    assert!(
        dir.join("verified.json").exists(),
        "the capture stamps what it wrote"
    );
    h.ok(&["halt", "w"]);
    h.ok(&["start", "w", "--from-snapshot", "s"]);
    h.wait_counts("w", &[1]);
    h.ok(&["halt", "w"]);

    // The counter's page: a byte the guest reads, flipped in place without changing the size.
    let mem = dir.join("memory.bin");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&mem)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 0x1000).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], 0x1000).unwrap();
    drop(f);

    for args in [
        vec!["start", "w", "--from-snapshot", "s"],
        vec!["create", "f", "--from-snapshot", "w:s"],
    ] {
        let out = h.run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("memory.bin"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!h.ws("f").exists(), "a refused fork leaves no workspace");
    let status = json(&h.ok(&["--json", "status", "w"]));
    assert_ne!(status["state"], "running", "{status}");
    let out = h.run(&["snapshot", "inspect", "w", "s", "--verify"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
}

/// A snapshot names the kernel it was captured under: once the workspace's kernel file differs,
/// rolling back and forking are both refused (exit 5, the kernel named), no fork workspace is
/// left, and the source keeps its snapshot.
#[test]
fn a_changed_kernel_refuses_rollback_and_fork_and_leaves_nothing() {
    if !kvm_or_skip("a_changed_kernel_refuses_rollback_and_fork_and_leaves_nothing") {
        return;
    }
    let h = Home::new("aon-kernel");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    h.ok(&["halt", "w"]);
    let before = entries(&h);
    let kernel = h.ws("w").join("kernel.elf");
    let mut bytes = std::fs::read(&kernel).expect("the workspace's copy of the built-in kernel");
    bytes.push(0);
    std::fs::write(&kernel, &bytes).unwrap();

    let o = h.run(&["start", "w", "--from-snapshot", "base"]);
    assert_eq!(o.status.code(), Some(5), "rollback: {}", stderr(&o));
    assert!(stderr(&o).contains("kernel"), "{}", stderr(&o));
    let o = h.run(&["create", "f", "--from-snapshot", "w:base", "--count", "2"]);
    assert_eq!(o.status.code(), Some(5), "fork: {}", stderr(&o));
    assert!(stderr(&o).contains("kernel"), "{}", stderr(&o));
    assert_eq!(entries(&h), before, "a refused fork left something behind");
    assert!(h.ok(&["snapshot", "list", "w"]).contains("base"));
    assert!(
        h.pid("w").is_none_or(|p| !alive(p)),
        "w runs after a refused rollback"
    );
}
