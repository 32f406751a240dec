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

/// The last count each of the first `vcpus` vCPUs printed (0 before any).
fn last_counts(text: &str, vcpus: usize) -> Vec<u64> {
    let mut last = vec![0; vcpus];
    for (cpu, n) in counts(text) {
        if let Some(slot) = last.get_mut(cpu as usize) {
            *slot = n;
        }
    }
    last
}

/// Creates and starts a 64 MiB test guest with `vcpus` vCPUs and its own command line.
fn boot_testguest(h: &Home, name: &str, vcpus: u8, cmdline: &str) {
    let vcpus = vcpus.to_string();
    let args = ["create", name, "--kernel", "builtin:testguest", "--vcpus"];
    h.ok(&[&args[..], &[&vcpus, "--mem", "64", "--cmdline", cmdline]].concat());
    h.ok(&["start", name]);
}

/// The first count `name`'s console shows for `cpu`.
fn first_count(h: &Home, name: &str, cpu: u32) -> u64 {
    counts(&h.console(name))
        .into_iter()
        .find(|(c, _)| *c == cpu)
        .map(|c| c.1)
        .unwrap_or_else(|| panic!("{name}: no count for cpu{cpu}"))
}

#[test]
fn an_idle_guest_halts_between_rounds_and_forks_exactly() {
    if !kvm_or_skip("an_idle_guest_halts_between_rounds_and_forks_exactly") {
        return;
    }
    const IDLE_MS: u64 = 50;
    let h = Home::new("idle");
    let cmdline = format!("mode=counter mem=2 tick_ms=0 idle={IDLE_MS} layout=1");
    boot_testguest(&h, "w", 2, &cmdline);
    h.wait_counts("w", &[3, 3]);
    let text = h.console("w");
    assert!(
        text.contains(&format!("testguest: idle ms={IDLE_MS} timer=tsc-deadline")),
        "{text}"
    );
    // Halting until its timer, a vCPU starts a round about every IDLE_MS of guest time; spinning,
    // it would do hundreds to thousands a second. The bound is twice the idle rate plus slack, not
    // the exact rate: the guest calibrates its TSC against the PIT, which under nested KVM on a
    // loaded host can be off by tens of percent (CI once saw 25 rounds in 1.009 s against 22), and
    // the console the counts are read from lags the guest by up to a round on each side.
    let before = last_counts(&h.console("w"), 2);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    let after = last_counts(&h.console("w"), 2);
    let most = 2 * (t0.elapsed().as_millis() as u64 / IDLE_MS) + 4;
    for cpu in 0..2 {
        let rounds = after[cpu] - before[cpu];
        assert!(
            rounds > 0 && rounds <= most,
            "cpu{cpu}: {rounds} rounds in {:?} (at most {most} when idling)",
            t0.elapsed()
        );
    }

    // Captured (most likely while both vCPUs are halted, a deadline armed), forked: each fork
    // wakes on its restored timer and continues from exactly the captured counts; every round
    // re-verifies the pattern memory (a mismatch is an ERROR line, which wait_counts rejects).
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let addrs = state_addrs(&h.console("w"), 2);
    let snap = h.ws("w").join("snapshots/base");
    let saved: Vec<u64> = addrs.iter().map(|a| memory_u64(&snap, *a)).collect();
    h.ok(&["halt", "w"]);
    h.ok(&["create", "f", "--from-snapshot", "w:base", "--count", "2"]);
    for f in ["f-1", "f-2"] {
        h.wait_counts(f, &[saved[0] + 3, saved[1] + 3]);
        for (cpu, &want) in saved.iter().enumerate() {
            let first = first_count(&h, f, cpu as u32);
            // The snapshot holds `count` after its increment; the round's line follows it
            // unless the capture fell between the two.
            assert!(
                first == want || first == want + 1,
                "{f} cpu{cpu}: first count {first}, snapshot {want}"
            );
        }
        assert!(!h.console(f).contains("ERROR"), "{f}: {}", h.console(f));
    }
    for n in ["f-1", "f-2", "w"] {
        h.ok(&["delete", n, "--yes"]);
    }
}

/// A batch of busy forks (vCPUs that never halt, more of them than cores) returns with every
/// fork ready; with --json each fork is one line, printed once it runs, and the summary last.
#[test]
fn a_busy_fork_batch_reports_each_fork_running_then_the_summary() {
    if !kvm_or_skip("a_busy_fork_batch_reports_each_fork_running_then_the_summary") {
        return;
    }
    use std::io::BufRead;
    const N: usize = 24;
    let h = Home::new("batch");
    boot_testguest(&h, "w", 1, "mode=counter mem=1 tick_ms=5 layout=1");
    h.wait_counts("w", &[10]);
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let addr = state_addrs(&h.console("w"), 1)[0];
    let saved = memory_u64(&h.ws("w").join("snapshots/base"), addr);
    h.ok(&["halt", "w"]);

    let n = N.to_string();
    let mut child = std::process::Command::new(bin())
        .env("MICROAGENT_HOME", &h.dir)
        .args([
            "--json",
            "create",
            "f",
            "--from-snapshot",
            "w:base",
            "--count",
            &n,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            // SAFETY: killing the command this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut lines = Vec::new();
    let mut reported: Vec<(String, u64)> = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(r) = v.get("ready") {
            let name = r["name"].as_str().unwrap().to_string();
            assert_eq!(r["done"], reported.len() as u64 + 1, "{line}");
            assert_eq!(r["total"], N as u64, "{line}");
            assert_eq!(r["from"], "w:base", "{line}");
            // Reported means running: its VMM says so now, while the batch goes on.
            let st: serde_json::Value =
                serde_json::from_str(&h.ok(&["--json", "status", &name])).unwrap();
            assert_eq!(st["state"], "running", "{name} reported ready: {st}");
            assert!(
                !reported.iter().any(|(n, _)| *n == name),
                "{name} reported twice"
            );
            reported.push((name, r["pid"].as_u64().unwrap()));
        }
        lines.push(v);
    }
    let status = child.wait().unwrap();
    watchdog.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(lines.len(), N + 1, "{lines:?}");
    assert_eq!(reported.len(), N, "{lines:?}");
    let summary = lines.last().unwrap();
    let forked = summary["forked"].as_array().unwrap();
    assert_eq!(forked.len(), N, "{summary}");
    let mut want: Vec<(String, u64)> = forked
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    want.sort();
    reported.sort();
    assert_eq!(reported, want);
    // While the batch resumed, running forks' vCPUs were at the lowest priority; once the
    // command has returned, every one is back at normal priority.
    for (name, pid) in &reported {
        let vcpus = vcpu_nice(*pid);
        assert!(
            !vcpus.is_empty(),
            "{name}: no vCPU thread in /proc/{pid}/task"
        );
        assert!(
            vcpus.iter().all(|&n| n == 0),
            "{name}: vCPU nice values {vcpus:?} after the batch returned"
        );
    }
    // Every fork runs on from the captured count.
    for i in 1..=N {
        let f = format!("f-{i}");
        h.wait_counts(&f, &[saved + 1]);
        let first = first_count(&h, &f, 0);
        assert!(
            first >= saved && first < saved + 1000,
            "{f} started at {first}, snapshot at {saved}"
        );
    }
    let list: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "list"])).unwrap();
    let running = list["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "running")
        .count();
    assert_eq!(running, N, "{list}");
    for i in 1..=N {
        h.ok(&["delete", &format!("f-{i}"), "--yes"]);
    }
    h.ok(&["delete", "w", "--yes"]);
}

/// The nice value of each vCPU thread (`vcpuN`) of process `pid`.
fn vcpu_nice(pid: u64) -> Vec<i64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("vcpu"))
                })
                .filter_map(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                    // Fields after the command name (which ends with ')'): nice is the 17th.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(16)?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `MICROAGENT_LOG` reaches the VMM (started by `start`, which inherits it): its debug lines
/// land in vmm.log only when asked for, and what is logged by default is INFO and above.
#[test]
fn log_level_from_the_environment_reaches_vmm_log() {
    if !kvm_or_skip("log_level_from_the_environment_reaches_vmm_log") {
        return;
    }
    let h = Home::new("loglevel");
    create(&h, "w");
    let log_path = h.ws("w").join("vmm.log");
    // One run: start (with `level` in the environment), an API request, halt. Returns what the
    // run added to vmm.log.
    let run = |level: &str| {
        let before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
        let env = [("MICROAGENT_LOG".to_string(), level.to_string())];
        let o = microagent_env(
            Some(&h.dir),
            &["start", "w"],
            &env,
            Duration::from_secs(600),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        h.wait_counts("w", &[5, 5]);
        assert!(h.ok(&["status", "w"]).contains("running"));
        h.ok(&["halt", "w"]);
        let log = std::fs::read_to_string(&log_path).unwrap();
        log.get(before..).unwrap_or_default().to_string()
    };

    // An empty variable is the default: info.
    let default = run("");
    assert!(
        default.contains(" INFO microagent::vmm_process: VM booted"),
        "{default}"
    );
    assert!(!default.contains(" DEBUG "), "{default}");

    let debug = run("debug");
    assert!(
        debug.contains(" INFO microagent::vmm_process: VM booted"),
        "{debug}"
    );
    assert!(
        debug.contains(" DEBUG microagent::vmm_process: VMM starting workspace=w"),
        "{debug}"
    );
    assert!(debug.contains("API request request=Status"), "{debug}");

    // Lowered: not even the info lines.
    let quiet = run("warn");
    assert!(
        !quiet.contains(" INFO ") && !quiet.contains(" DEBUG "),
        "{quiet}"
    );
    h.ok(&["delete", "w", "--yes"]);
}
