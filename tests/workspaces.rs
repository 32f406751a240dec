//! The workspace lifecycle through the real binary with the test guest: create, start,
//! snapshot, roll back, fork, delete; and the state errors scripts rely on.

mod common;
use common::*;
use std::time::Duration;

const GUEST: &[&str] = &[
    "--kernel",
    "builtin:testguest",
    "--vcpus",
    "2",
    "--mem",
    "64",
    "--cmdline",
    "mode=counter mem=2 tick_ms=5 layout=1",
];

fn create(h: &Home, name: &str) {
    let mut args = vec!["create", name];
    args.extend_from_slice(GUEST);
    let out = h.ok(&args);
    assert_eq!(
        out.trim(),
        format!("workspace {name} created (64 MiB RAM, 2 vCPU, kernel builtin:testguest)")
    );
}

#[test]
fn lifecycle_snapshot_rollback_fork_delete() {
    if !kvm_or_skip("lifecycle_snapshot_rollback_fork_delete") {
        return;
    }
    let h = Home::new("lifecycle");
    create(&h, "w");
    assert!(h
        .ok(&["start", "w"])
        .starts_with("workspace w started (pid "));
    h.wait_counts("w", &[20, 20]);
    let list = h.ok(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("w ") && l.contains("running")),
        "{list}"
    );

    // Human form of snapshot create.
    let line = h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let re_ok = line
        .trim()
        .starts_with("snapshot base created (64 MiB RAM, 2 vCPU) at 20")
        && line.trim().ends_with('Z');
    assert!(re_ok, "{line}");
    // JSON form.
    let js: serde_json::Value =
        serde_json::from_str(&h.ok(&["--json", "snapshot", "create", "w", "--tag", "second"]))
            .unwrap();
    assert_eq!(js["snapshot"]["tag"], "second");
    assert_eq!(js["snapshot"]["vcpus"], 2);
    assert_eq!(js["snapshot"]["mem_mib"], 64);
    assert_eq!(js["snapshot"]["kind"], "full");
    let list = h.ok(&["snapshot", "list", "w"]);
    let lines: Vec<_> = list.lines().collect();
    assert!(
        lines[0].starts_with("TAG")
            && lines[0].contains("SIZE")
            && lines[0].contains("CREATED")
            && lines[0].contains("IMAGE"),
        "{list}"
    );
    assert!(
        lines[1].starts_with("base ") && lines[2].starts_with("second "),
        "{list}"
    );

    // The counts the snapshot holds, straight from its memory file.
    let addrs = state_addrs(&h.console("w"), 2);
    let snap_dir = h.ws("w").join("snapshots/base");
    let saved: Vec<u64> = addrs.iter().map(|a| memory_u64(&snap_dir, *a)).collect();
    // The source runs on past the snapshot, then halts.
    let before_halt = h.wait_counts("w", &[saved[0] + 300, saved[1] + 300]);
    let pid = h.pid("w").unwrap();
    h.ok(&["halt", "w"]);
    assert!(!alive(pid), "VMM still alive after halt");
    assert!(h
        .ok(&["list"])
        .lines()
        .any(|l| l.starts_with("w ") && l.contains("stopped")));

    // Roll back: the counter returns to the snapshot's value.
    assert!(h
        .ok(&["start", "w", "--from-snapshot", "base"])
        .starts_with("workspace w restored from snapshot base"));
    h.wait_counts("w", &[saved[0], saved[1]]);
    let text = h.console("w");
    let first: Vec<u64> = (0..2)
        .map(|cpu| {
            counts(&text)
                .into_iter()
                .find(|(c, _)| *c == cpu)
                .unwrap()
                .1
        })
        .collect();
    for cpu in 0..2 {
        assert!(
            first[cpu] >= saved[cpu] && first[cpu] < before_halt[cpu],
            "cpu{cpu}: first count after rollback {} (snapshot {}, before halt {})",
            first[cpu],
            saved[cpu],
            before_halt[cpu]
        );
    }

    // Fork three.
    let out = h.ok(&["create", "f", "--from-snapshot", "w:base", "--count", "3"]);
    for i in 1..=3 {
        assert!(
            out.contains(&format!("workspace f-{i} forked from w:base")),
            "{out}"
        );
        h.wait_counts(&format!("f-{i}"), &[saved[0], saved[1]]);
    }
    let js: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "list"])).unwrap();
    let states: Vec<_> = js["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_string(),
                w["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for n in ["f-1", "f-2", "f-3", "w"] {
        assert!(
            states.contains(&(n.to_string(), "running".to_string())),
            "{states:?}"
        );
    }

    // Delete: VMM gone, snapshots gone.
    let pids: Vec<i32> = ["w", "f-1", "f-2", "f-3"]
        .iter()
        .map(|n| h.pid(n).unwrap())
        .collect();
    for n in ["w", "f-1", "f-2", "f-3"] {
        assert_eq!(
            h.ok(&["delete", n, "--yes"]).trim(),
            format!("workspace {n} deleted")
        );
    }
    for p in pids {
        assert!(!alive(p), "VMM {p} left behind");
    }
    assert!(
        !h.ws("w").exists(),
        "workspace directory (and its snapshots) remain"
    );
    assert!(h.ok(&["list"]).lines().count() == 1);
}

fn expect_code(h: &Home, args: &[&str], code: i32, needle: &str) -> String {
    let o = h.run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(needle), "{args:?}: {err}");
    err
}

#[test]
fn state_errors_have_documented_codes() {
    if !kvm_or_skip("state_errors_have_documented_codes") {
        return;
    }
    let h = Home::new("errors");
    create(&h, "w");
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[5, 5]);
    h.ok(&["snapshot", "create", "w", "--tag", "t"]);

    expect_code(
        &h,
        &["start", "w", "--from-snapshot", "t"],
        4,
        "is running; halt it first",
    );
    expect_code(
        &h,
        &["create", "x", "--from-snapshot", "w:nope"],
        3,
        "has no snapshot nope",
    );
    expect_code(
        &h,
        &["create", "x", "--from-snapshot", "ghost:t"],
        3,
        "workspace ghost does not exist",
    );
    expect_code(&h, &["delete", "w"], 2, "without --yes");
    expect_code(
        &h,
        &["snapshot", "create", "w", "--tag", "t"],
        4,
        "already exists",
    );
    expect_code(
        &h,
        &["create", "w", "--kernel", "builtin:testguest"],
        4,
        "already exists",
    );
    expect_code(&h, &["status", "nobody"], 3, "does not exist");
    // JSON errors carry a stable code.
    let err = expect_code(&h, &["--json", "start", "w"], 4, "\"code\":\"conflict\"");
    assert!(err.contains("already running"), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["code"], "conflict");
    // The failed commands changed nothing: still running, one snapshot, no fork.
    assert!(h.ok(&["status", "w"]).contains("state:     running"));
    assert_eq!(h.ok(&["snapshot", "list", "w"]).lines().count(), 2);
    assert!(!h.ws("x").exists());
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn concurrent_snapshots_one_wins_one_conflicts() {
    if !kvm_or_skip("concurrent_snapshots_one_wins_one_conflicts") {
        return;
    }
    let h = Home::new("concurrent");
    // A large guest, so a capture takes long enough to overlap.
    h.ok(&[
        "create",
        "big",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "256",
        "--cmdline",
        "mode=counter mem=200 tick_ms=50",
    ]);
    h.ok(&["start", "big"]);
    h.wait_counts("big", &[1]);
    let spawn = |tag: &str| {
        std::process::Command::new(bin())
            .env("MICROAGENT_HOME", &h.dir)
            .args(["snapshot", "create", "big", "--tag", tag])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn("a");
    let b = spawn("b");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let codes = [a.status.code(), b.status.code()];
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(4)),
        "{codes:?}\n{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let loser = if a.status.code() == Some(4) { &a } else { &b };
    assert!(stderr(loser).contains("busy"), "{}", stderr(loser));
    // Exactly one snapshot, complete; no leftovers.
    let entries: Vec<_> = std::fs::read_dir(h.ws("big").join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let tag = &entries[0];
    h.ok(&["snapshot", "inspect", "big", tag, "--verify"]);
    h.ok(&["delete", "big", "--yes"]);
}

#[test]
fn a_killed_vmm_is_noticed_and_the_workspace_restarts() {
    if !kvm_or_skip("a_killed_vmm_is_noticed_and_the_workspace_restarts") {
        return;
    }
    let h = Home::new("killed");
    create(&h, "w");
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[5, 5]);
    let pid = h.pid("w").unwrap();
    // SAFETY: killing the VMM this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let js: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "list"])).unwrap();
    assert_eq!(js["workspaces"][0]["state"], "crashed", "{js}");
    assert!(h.ok(&["list"]).contains("crashed"));
    // start cleans up after the dead VMM and boots again.
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[5, 5]);
    assert_ne!(h.pid("w"), Some(pid));
    h.ok(&["delete", "w", "--yes"]);
}
