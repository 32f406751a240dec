//! Snapshot management through the real binary with the test guest: pause/force control, notes,
//! edit and search, prune, hibernate, forks with a lifetime, export and import.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn create(h: &Home, name: &str) {
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
}

fn boot(h: &Home, name: &str) {
    create(h, name);
    h.ok(&["start", name]);
    h.wait_counts(name, &[10]);
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn tags(h: &Home, name: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--json", "snapshot", "list", name];
    args.extend_from_slice(extra);
    json(&h.ok(&args))["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_str().unwrap().to_string())
        .collect()
}

fn saved_count(h: &Home, name: &str, tag: &str) -> u64 {
    let addr = state_addrs(&h.console(name), 1)[0];
    memory_u64(&h.ws(name).join("snapshots").join(tag), addr)
}

#[test]
fn no_resume_and_force() {
    if !kvm_or_skip("no_resume_and_force") {
        return;
    }
    let h = Home::new("noresume");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "p", "--no-resume"]);
    let st = json(&h.ok(&["--json", "status", "w"]));
    assert_eq!(st["state"], "paused", "{st}");
    // Paused means no progress.
    let a = h.console("w").len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.console("w").len(), a, "the guest printed while paused");
    // A paused workspace is captured in place and stays paused.
    h.ok(&["snapshot", "create", "w", "--tag", "q"]);
    assert_eq!(json(&h.ok(&["--json", "status", "w"]))["state"], "paused");
    let want = saved_count(&h, "w", "p");
    // --force rolls back a running (here: paused) workspace instead of refusing.
    let o = h.run(&["start", "w", "--from-snapshot", "p"]);
    assert_eq!(o.status.code(), Some(4));
    h.ok(&["start", "w", "--from-snapshot", "p", "--force"]);
    assert_eq!(json(&h.ok(&["--json", "status", "w"]))["state"], "running");
    h.wait_counts("w", &[want]);
    let first = counts(&h.console("w"))[0].1;
    assert!(
        first >= want && first < want + 1000,
        "rolled back to {first}, snapshot at {want}"
    );
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn notes_edit_search_and_prune() {
    if !kvm_or_skip("notes_edit_search_and_prune") {
        return;
    }
    let h = Home::new("prune");
    boot(&h, "w");
    for (t, note) in [
        ("s1", "before upgrade"),
        ("s2", "after upgrade"),
        ("s3", "nightly"),
        ("s4", "nightly"),
    ] {
        h.ok(&["snapshot", "create", "w", "--tag", t, "--note", note]);
    }
    assert_eq!(tags(&h, "w", &["--search", "UPGRADE"]), vec!["s1", "s2"]);
    let e = json(&h.ok(&[
        "--json", "snapshot", "edit", "w", "s3", "--tag", "golden", "--note", "keep me",
    ]));
    assert_eq!(e["snapshot"]["tag"], "golden");
    assert_eq!(e["snapshot"]["note"], "keep me");
    assert_eq!(tags(&h, "w", &["--search", "keep"]), vec!["golden"]);
    assert_eq!(tags(&h, "w", &["--search", "nightly"]), vec!["s4"]);
    h.ok(&["snapshot", "inspect", "w", "golden", "--verify"]);
    let o = h.run(&["snapshot", "edit", "w", "golden", "--tag", "s1"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));

    // The dry run names exactly what the real run deletes, and nothing else goes.
    let dry = json(&h.ok(&[
        "--json",
        "snapshot",
        "prune",
        "w",
        "--keep",
        "2",
        "--dry-run",
    ]));
    assert_eq!(dry["dry_run"], true);
    let would: Vec<String> = dry["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    assert_eq!(tags(&h, "w", &[]).len(), 4, "dry run deleted something");
    let real = json(&h.ok(&["--json", "snapshot", "prune", "w", "--keep", "2"]));
    let did: Vec<String> = real["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    assert_eq!(would, did);
    assert_eq!(
        did,
        vec!["s2", "s1"],
        "newest first, so a diff always goes before its parent"
    );
    assert_eq!(tags(&h, "w", &[]), vec!["golden", "s4"]);
    // Nothing is older than a week.
    let none = json(&h.ok(&["--json", "snapshot", "prune", "w", "--older-than", "7d"]));
    assert_eq!(none["deleted"].as_array().unwrap().len(), 0);
    let bad = h.run(&["snapshot", "prune", "w", "--older-than", "7 days"]);
    assert_eq!(bad.status.code(), Some(2));
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn hibernate_then_start_continues_with_no_vmm_in_between() {
    if !kvm_or_skip("hibernate_then_start_continues_with_no_vmm_in_between") {
        return;
    }
    let h = Home::new("hibernate");
    boot(&h, "w");
    let addr = state_addrs(&h.console("w"), 1)[0];
    let pid = h.pid("w").unwrap();
    h.ok(&["hibernate", "w"]);
    assert!(!alive(pid), "the VMM process is still there");
    assert_eq!(
        json(&h.ok(&["--json", "list"]))["workspaces"][0]["state"],
        "hibernated"
    );
    let at = memory_u64(&h.ws("w").join("hibernation/slot"), addr);
    let before: u64 = counts(&h.console("w")).last().unwrap().1;
    assert!(at >= before);
    assert!(h.ok(&["start", "w"]).contains("resumed from hibernation"));
    h.wait_counts("w", &[at]);
    let first = counts(&h.console("w"))[0].1;
    assert!(
        first >= at && first < at + 1000,
        "resumed at {first}, hibernated at {at}"
    );
    assert!(
        !h.ws("w").join("hibernation").exists(),
        "the slot is dropped after resume"
    );
    assert_eq!(json(&h.ok(&["--json", "status", "w"]))["state"], "running");
    h.ok(&["delete", "w", "--yes"]);
}

/// The VMM stops itself after a hibernation capture; it must not stop before its answer is out. The VMM here waits 400 ms before each answer (longer than its main loop's
/// 100 ms poll), which lost the answer every time while the stop flag was set before writing it
/// (seen once in CI, through the API, as "VMM closed the connection without an answer").
#[test]
fn hibernate_answers_before_the_vmm_stops() {
    if !kvm_or_skip("hibernate_answers_before_the_vmm_stops") {
        return;
    }
    let h = Home::new("hibernate-answer");
    create(&h, "w");
    let slow = [(
        "MICROAGENT_TEST_SLOW_AT".to_string(),
        "vmm-answer:400".to_string(),
    )];
    let run = |args: &[&str]| {
        let o = microagent_env(Some(&h.dir), args, &slow, Duration::from_secs(600));
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    run(&["start", "w"]);
    h.wait_counts("w", &[10]);
    run(&["hibernate", "w"]);
    assert_eq!(
        json(&h.ok(&["--json", "list"]))["workspaces"][0]["state"],
        "hibernated"
    );
    assert!(run(&["start", "w"]).contains("resumed from hibernation"));
    run(&["halt", "w"]);
    assert_eq!(json(&h.ok(&["--json", "status", "w"]))["state"], "stopped");
}

#[test]
fn forks_with_a_ttl_vanish_with_their_process() {
    if !kvm_or_skip("forks_with_a_ttl_vanish_with_their_process") {
        return;
    }
    let h = Home::new("ttl");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "t"]);
    let t0 = Instant::now();
    h.ok(&[
        "create",
        "f",
        "--from-snapshot",
        "w:t",
        "--count",
        "2",
        "--ttl",
        "3s",
    ]);
    let pids: Vec<i32> = ["f-1", "f-2"].iter().map(|n| h.pid(n).unwrap()).collect();
    let l = json(&h.ok(&["--json", "list"]));
    let ttl = l["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "f-1")
        .unwrap()["expires_in_s"]
        .as_u64()
        .unwrap();
    assert!((1..=3).contains(&ttl), "time left {ttl}");
    assert!(h
        .ok(&["list"])
        .lines()
        .any(|l| l.starts_with("f-1 ") && l.contains("s  ")));
    while (h.ws("f-1").exists() || h.ws("f-2").exists()) && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !h.ws("f-1").exists() && !h.ws("f-2").exists(),
        "forks outlived their ttl"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "gone too early: {:?}",
        t0.elapsed()
    );
    for p in pids {
        assert!(!alive(p), "VMM {p} outlived its workspace");
    }
    assert_eq!(
        json(&h.ok(&["--json", "list"]))["workspaces"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    h.ok(&["delete", "w", "--yes"]);
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn export_delete_import_restore_and_hostile_archives() {
    if !kvm_or_skip("export_delete_import_restore_and_hostile_archives") {
        return;
    }
    let h = Home::new("archive");
    boot(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "x"]);
    let saved = saved_count(&h, "w", "x");
    let addr = state_addrs(&h.console("w"), 1)[0];
    let file = h.dir.join("x.tar.zst");
    h.ok(&["snapshot", "export", "w", "x", file.to_str().unwrap()]);
    h.ok(&["delete", "w", "--yes"]);
    h.ok(&["snapshot", "import", file.to_str().unwrap(), "--as", "back"]);
    h.ok(&["start", "back", "--from-snapshot", "x"]);
    h.wait_counts("back", &[saved]);
    let first = counts(&h.console("back"))[0].1;
    assert!(
        first >= saved && first < saved + 1000,
        "continued at {first}, exported at {saved}"
    );
    assert_eq!(memory_u64(&h.ws("back").join("snapshots/x"), addr), saved);
    h.ok(&["halt", "back"]);

    let bytes = std::fs::read(&file).unwrap();
    let snaps = h.ws("back").join("snapshots");
    // Delete the imported copy so a re-import could succeed if the checks failed.
    h.ok(&["snapshot", "delete", "back", "x"]);
    let refuse = |name: &str, data: &[u8]| {
        let p = h.dir.join(name);
        std::fs::write(&p, data).unwrap();
        let o = h.run(&[
            "--json",
            "snapshot",
            "import",
            p.to_str().unwrap(),
            "--as",
            "back",
        ]);
        assert_ne!(o.status.code(), Some(0), "{name} was imported");
        let err = json(stderr(&o).trim());
        assert!(err["error"]["code"].is_string(), "{err}");
        assert!(
            leftovers(&snaps).is_empty(),
            "{name} left {:?}",
            leftovers(&snaps)
        );
    };
    refuse("truncated.tar.zst", &bytes[..bytes.len() / 2]);
    // Flip a byte inside the compressed memory: zstd's checksum or our digest must catch it.
    let mut flipped = bytes.clone();
    let at = flipped.len() * 2 / 3;
    flipped[at] ^= 0x55;
    refuse("flipped.tar.zst", &flipped);
    refuse(
        "escape.tar.zst",
        &escape_archive(&h.dir.join("x-src"), &bytes),
    );
    assert!(!h.dir.join("evil").exists() && !h.ws("evil").exists());
    h.ok(&["delete", "back", "--yes"]);
}

/// A copy of a good archive with a `../evil` entry after the manifest.
fn escape_archive(scratch: &Path, good: &[u8]) -> Vec<u8> {
    let dec = zstd::decode_all(good).unwrap();
    let mut src = tar::Archive::new(&dec[..]);
    let mut out = tar::Builder::new(Vec::new());
    for (i, e) in src.entries().unwrap().enumerate() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let mut hdr = e.header().clone();
        out.append(&hdr, &data[..]).unwrap();
        if i == 0 {
            let evil = b"pwned\n";
            hdr.set_size(evil.len() as u64);
            let name = b"../evil";
            let gnu = hdr.as_old_mut();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name);
            hdr.set_cksum();
            out.append(&hdr, &evil[..]).unwrap();
        }
    }
    let _ = scratch;
    zstd::encode_all(&out.into_inner().unwrap()[..], 3).unwrap()
}

#[test]
fn diff_chains_list_restore_and_cascade() {
    if !kvm_or_skip("diff_chains_list_restore_and_cascade") {
        return;
    }
    let h = Home::new("diffs");
    boot(&h, "w");
    let no_parent = h.run(&[
        "snapshot", "create", "w", "--tag", "orphan", "--type", "diff",
    ]);
    assert_eq!(no_parent.status.code(), Some(4), "{}", stderr(&no_parent));
    assert!(stderr(&no_parent).contains("needs a parent"));
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let addr = state_addrs(&h.console("w"), 1)[0];
    h.ok(&["snapshot", "create", "w", "--tag", "d1", "--type", "diff"]);
    h.ok(&["snapshot", "create", "w", "--tag", "d2", "--type", "diff"]);
    let l = json(&h.ok(&["--json", "snapshot", "list", "w"]));
    let rows: Vec<(String, String, String)> = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["tag"].as_str().unwrap().into(),
                s["kind"].as_str().unwrap().into(),
                s["parent"].as_str().unwrap_or("-").into(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("base".into(), "full".into(), "-".into()),
            ("d1".into(), "diff".into(), "base".into()),
            ("d2".into(), "diff".into(), "d1".into())
        ]
    );
    let human = h.ok(&["snapshot", "list", "w"]);
    // Columns: TAG SIZE CREATED IMAGE KIND PARENT, one word each.
    assert!(
        human.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 6 && f[0] == "d2" && f[4] == "diff" && f[5] == "d1"
        }),
        "{human}"
    );

    let refused = h.run(&["snapshot", "delete", "w", "base"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(stderr(&refused).contains("d1, d2"), "{}", stderr(&refused));

    // Roll back to the end of the chain: it continues from d2's count.
    let want = memory_u64(&h.ws("w").join("snapshots/d2"), addr);
    assert_ne!(want, 0);
    h.ok(&["halt", "w"]);
    h.ok(&["start", "w", "--from-snapshot", "d2"]);
    h.wait_counts("w", &[want]);
    let first = counts(&h.console("w"))[0].1;
    assert!(
        first >= want && first < want + 1000,
        "continued at {first}, d2 holds {want}"
    );
    // A diff of the restored run names the snapshot it came from.
    h.ok(&["snapshot", "create", "w", "--tag", "d3", "--type", "diff"]);
    let d3 = json(&h.ok(&["--json", "snapshot", "inspect", "w", "d3", "--verify"]));
    assert_eq!(d3["parent"], "d2");

    let gone = json(&h.ok(&["--json", "snapshot", "delete", "w", "base", "--cascade"]));
    assert_eq!(gone["deleted"].as_array().unwrap().len(), 4, "{gone}");
    assert!(tags(&h, "w", &[]).is_empty());
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn disk_snapshots_need_a_halted_workspace_and_restore_the_disk() {
    if !kvm_or_skip("disk_snapshots_need_a_halted_workspace_and_restore_the_disk") {
        return;
    }
    let h = Home::new("disk");
    let img = h.dir.join("disk.img");
    std::fs::write(&img, vec![0xabu8; 1 << 20]).unwrap();
    h.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
        "--rootfs",
        img.to_str().unwrap(),
        "--cmdline",
        "mode=counter mem=1 tick_ms=5",
    ]);
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[5]);
    let busy = h.run(&["snapshot", "create", "w", "--tag", "d", "--type", "disk"]);
    assert_eq!(busy.status.code(), Some(4), "{}", stderr(&busy));
    assert!(stderr(&busy).contains("needs a halted workspace"));
    h.ok(&["halt", "w"]);
    let made = h.ok(&["snapshot", "create", "w", "--tag", "d", "--type", "disk"]);
    assert!(made.starts_with("snapshot d created (disk only)"), "{made}");
    let files: Vec<String> = leftovers(&h.ws("w").join("snapshots/d"));
    assert!(
        files.contains(&"rootfs.ext4".to_string()) && !files.contains(&"memory.bin".to_string()),
        "{files:?}"
    );
    assert!(h
        .ok(&["snapshot", "list", "w"])
        .lines()
        .any(|l| l.starts_with("d ") && l.contains(" disk ")));
    // Change the disk, then roll it back: the disk returns, the VM boots afresh.
    std::fs::write(h.ws("w").join("rootfs.ext4"), vec![0x11u8; 1 << 20]).unwrap();
    h.ok(&["start", "w", "--from-snapshot", "d"]);
    assert_eq!(
        std::fs::read(h.ws("w").join("rootfs.ext4")).unwrap(),
        vec![0xabu8; 1 << 20]
    );
    h.wait_counts("w", &[5]);
    assert!(h.console("w").contains("testguest: ready"), "booted afresh");
    h.ok(&["delete", "w", "--yes"]);
}
