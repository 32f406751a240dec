//! Lazy restore through the userfaultfd page server, through the real binary: forks continue
//! exactly, the working set is recorded, and a page server that dies stops its VMs with a clear
//! error instead of leaving them hung.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn uffd_forks_continue_record_a_working_set_and_fail_cleanly_without_their_server() {
    if !kvm_or_skip(
        "uffd_forks_continue_record_a_working_set_and_fail_cleanly_without_their_server",
    ) {
        return;
    }
    let h = Home::new("uffd");
    h.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--vcpus",
        "2",
        "--mem",
        "64",
        "--cmdline",
        "mode=counter mem=2 tick_ms=5 layout=1",
    ]);
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[10, 10]);
    let addrs = state_addrs(&h.console("w"), 2);
    h.ok(&["snapshot", "create", "w", "--tag", "b"]);
    let snap = h.ws("w").join("snapshots/b");
    let saved: Vec<u64> = addrs.iter().map(|a| memory_u64(&snap, *a)).collect();

    h.ok(&[
        "create",
        "f",
        "--from-snapshot",
        "w:b",
        "--count",
        "2",
        "--memory",
        "uffd",
    ]);
    for f in ["f-1", "f-2"] {
        h.wait_counts(f, &[saved[0] + 100, saved[1] + 100]);
        let text = h.console(f);
        for cpu in 0..2u32 {
            let first = counts(&text)
                .into_iter()
                .find(|(c, _)| *c == cpu)
                .unwrap()
                .1;
            assert!(
                first >= saved[cpu as usize] && first < saved[cpu as usize] + 1000,
                "{f} cpu{cpu} started at {first}, snapshot holds {}",
                saved[cpu as usize]
            );
        }
    }
    // Once the recording VM goes (whichever fork connected first), its working set is written
    // next to the snapshot.
    h.ok(&["delete", "f-1", "--yes"]);
    h.ok(&["delete", "f-2", "--yes"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !snap.join("workingset.bin").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        snap.join("workingset.bin").exists(),
        "no working set recorded"
    );
    // Later lazy forks (prefetching that set) continue as well.
    h.ok(&[
        "create",
        "g",
        "--from-snapshot",
        "w:b",
        "--count",
        "2",
        "--memory",
        "uffd",
    ]);
    for g in ["g-1", "g-2"] {
        h.wait_counts(g, &[saved[0] + 100, saved[1] + 100]);
    }

    // Kill the page server: its VMs stop with a clear error, they do not hang.
    let server_pid: i32 = {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "__pageserver"])
            .output()
            .unwrap();
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .map(|c| c.contains(snap.to_str().unwrap()))
                    .unwrap_or(false)
            })
            .collect();
        // A jailed page server is two processes: a waiter on the host and the server, its
        // child in its own PID namespace. The server is the one whose parent is listed too.
        let ppid = |p: i32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let servers: Vec<i32> = match pids.len() {
            1 => pids.clone(),
            _ => pids
                .iter()
                .copied()
                .filter(|&p| pids.contains(&ppid(p)))
                .collect(),
        };
        assert_eq!(servers.len(), 1, "one page server per snapshot: {pids:?}");
        servers[0]
    };
    let vmms = [h.pid("g-1").unwrap(), h.pid("g-2").unwrap()];
    // SAFETY: killing the page server this test started.
    unsafe { libc::kill(server_pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while vmms.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, pid) in ["g-1", "g-2"].iter().zip(vmms) {
        assert!(
            !alive(pid),
            "{name}'s VMM still runs without its page server"
        );
        let log = std::fs::read_to_string(h.ws(name).join("vmm.log")).unwrap();
        assert!(log.contains("page server is gone"), "{name}: {log}");
    }
    let l: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "list"])).unwrap();
    for w in l["workspaces"].as_array().unwrap() {
        if w["name"] != "w" {
            assert_eq!(w["state"], "crashed", "{w}");
        }
    }
    for n in ["g-1", "g-2", "w"] {
        h.ok(&["delete", n, "--yes"]);
    }
}
