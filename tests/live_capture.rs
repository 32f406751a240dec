//! `snapshot create --live`: memory copied while the test guest keeps rewriting and verifying its
//! pattern memory, then restored and forked. The guest checks every word of its region against
//! the pattern of its count each round, so a page the capture copied before its last write shows
//! up as an ERROR line (and a crash) after the restore; its counter shows it continues from the
//! state at the stop, not from a reboot.

mod common;
use common::*;

const VCPUS: usize = 2;

/// 256 MiB, two vCPUs each rewriting 32 MiB as fast as they can, a count line every round.
fn boot(h: &Home, name: &str) {
    h.ok(&[
        "create",
        name,
        "--kernel",
        "builtin:testguest",
        "--vcpus",
        "2",
        "--mem",
        "256",
        "--cmdline",
        "mode=counter mem=32 tick_ms=0 layout=1",
    ]);
    h.ok(&["start", name]);
    h.wait_counts(name, &[3; VCPUS]);
}

fn first_count(h: &Home, name: &str, cpu: u32) -> u64 {
    counts(&h.console(name))
        .into_iter()
        .find(|(c, _)| *c == cpu)
        .map(|c| c.1)
        .unwrap_or_else(|| panic!("{name}: no count for cpu{cpu}"))
}

/// The snapshot `tag` of `w` restores in place and forks to guests that continue from its
/// counts and pass their own memory checks for several full rounds.
fn restores_exactly(h: &Home, w: &str, tag: &str) {
    let addrs = state_addrs(&h.console(w), VCPUS);
    let dir = h.ws(w).join("snapshots").join(tag);
    let saved: Vec<u64> = addrs.iter().map(|a| memory_u64(&dir, *a)).collect();
    h.ok(&["halt", w]);
    h.ok(&["start", w, "--from-snapshot", tag]);
    let fork = format!("{w}-fork");
    h.ok(&["create", &fork, "--from-snapshot", &format!("{w}:{tag}")]);
    for name in [w, fork.as_str()] {
        // Each round verifies the whole region first: five more rounds, no ERROR.
        let floor: Vec<u64> = saved.iter().map(|s| s + 5).collect();
        h.wait_counts(name, &floor);
        for (cpu, s) in saved.iter().enumerate() {
            let first = first_count(h, name, cpu as u32);
            // The saved count is printed once its round's rewrite ends: next, or already done.
            assert!(
                first == *s || first == s + 1,
                "{name} cpu{cpu}: first count {first} after the restore, snapshot holds {s}"
            );
        }
    }
}

#[test]
fn a_live_capture_of_a_writing_guest_restores_exactly() {
    if !kvm_or_skip("a_live_capture_of_a_writing_guest_restores_exactly") {
        return;
    }
    let h = Home::new("live");
    boot(&h, "w");
    let js: serde_json::Value = serde_json::from_str(&h.ok(&[
        "--json", "snapshot", "create", "w", "--tag", "live", "--live",
    ]))
    .unwrap();
    assert_eq!(js["snapshot"]["kind"], "full", "{js}");
    let live = &js["live"];
    assert!(live["rounds"].as_u64().unwrap() >= 1, "{js}");
    // The guest never stops writing, so the stop nearly always has pages to copy; on a host so
    // loaded that its vCPU did not run between the last round and the stop it has none, and the
    // exactness check below is what proves the capture either way.
    let final_bytes = live["final_bytes"].as_u64().expect("final_bytes");
    if final_bytes == 0 {
        eprintln!(
            "note: the guest wrote nothing between the last round and the stop (a loaded host)"
        );
    }
    assert!(js["pause_ms"].as_f64().unwrap() > 0.0, "{js}");
    assert_eq!(js["pause_ms"], live["pause_ms"], "{js}");
    // The guest runs on after the capture.
    let after = h.wait_counts("w", &[0; VCPUS]);
    h.wait_counts("w", &after);
    assert!(h
        .ok(&["list"])
        .lines()
        .any(|l| l.starts_with("w ") && l.contains("running")));
    restores_exactly(&h, "w", "live");
}

#[test]
fn a_bound_the_guest_cannot_meet_falls_back_to_stop_and_copy_exactly() {
    if !kvm_or_skip("a_bound_the_guest_cannot_meet_falls_back_to_stop_and_copy_exactly") {
        return;
    }
    let h = Home::new("live-fallback");
    boot(&h, "w");
    // No remaining set is written in under zero time: the rounds end, the guest is stopped.
    let out = h.run(&[
        "snapshot",
        "create",
        "w",
        "--tag",
        "stopped",
        "--live",
        "--max-pause",
        "0ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("snapshot stopped created (256 MiB RAM, 2 vCPU) at "),
        "{text}"
    );
    assert!(
        text.contains("guest paused ") && text.contains("did not converge"),
        "{text}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("live capture did not converge") && err.contains("stopped the guest"),
        "{err}"
    );
    restores_exactly(&h, "w", "stopped");
}

#[test]
fn live_refuses_diff_and_disk_snapshots_and_bad_bounds() {
    if !kvm_or_skip("live_refuses_diff_and_disk_snapshots_and_bad_bounds") {
        return;
    }
    let h = Home::new("live-usage");
    boot(&h, "w");
    for args in [
        &["snapshot", "create", "w", "--live", "--type", "diff"][..],
        &["snapshot", "create", "w", "--live", "--type", "disk"][..],
        &["snapshot", "create", "w", "--live", "--max-pause", "20"][..],
        &["snapshot", "create", "w", "--max-pause", "20ms"][..],
    ] {
        let out = h.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = h.run(&["snapshot", "create", "w", "--live", "--type", "diff"]);
    assert!(
        stderr(&out).contains("--live captures a full snapshot"),
        "{}",
        stderr(&out)
    );
    // Nothing was captured, and the guest still runs.
    assert!(h.ok(&["snapshot", "list", "w"]).lines().count() == 1);
    let now = h.wait_counts("w", &[0; VCPUS]);
    h.wait_counts("w", &now);
}
