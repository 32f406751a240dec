//! Full-touch restore through the real binary: a test guest that writes and verifies almost all
//! of its memory every round continues exactly after a rollback or a fork in every memory mode
//! (the default for one VM, eager, mmap, hot without and with a recorded working set, uffd, and
//! the default for a batch), and a memory file changed by one byte (in data or in a hole) is
//! refused before any VM runs.

mod common;
use common::*;

/// 160 MiB of RAM, 128 MiB of it the guest's pattern region: more than a few of the eager
/// reader's windows, small enough for CI.
const MEM: &str = "160";
const CMDLINE: &str = "mode=counter mem=128 tick_ms=0 layout=1";

/// cpu0's count lines in a console, in order.
fn cpu0_counts(text: &str) -> Vec<u64> {
    counts(text)
        .into_iter()
        .filter(|(c, _)| *c == 0)
        .map(|(_, n)| n)
        .collect()
}

/// The restored (or forked) `name` resumed from the snapshot's own count and went on for three
/// more whole rounds, each of which verified the entire region against the pattern of the
/// previous round (a wrong byte anywhere prints an ERROR line and stops the guest).
fn continues_exactly(h: &Home, name: &str, saved: u64, what: &str) {
    h.wait_counts(name, &[saved + 3]);
    let text = h.console(name);
    assert!(!text.contains("ERROR"), "{what}: {name}:\n{text}");
    let seen = cpu0_counts(&text);
    // The capture fell after the count was stored and either after its line was printed (the
    // next line is saved + 1) or before (the line is printed again after the restore).
    assert!(
        seen.first().is_some_and(|f| *f == saved || *f == saved + 1),
        "{what}: {name} resumed at {:?}, the snapshot holds count {saved}",
        seen.first()
    );
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: {name} skipped or repeated a round: {seen:?}"
    );
}

#[test]
fn a_full_touch_guest_continues_exactly_in_every_memory_mode() {
    if !kvm_or_skip("a_full_touch_guest_continues_exactly_in_every_memory_mode") {
        return;
    }
    let h = Home::new("fulltouch");
    h.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--mem",
        MEM,
        "--cmdline",
        CMDLINE,
    ]);
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[3]);
    let addr = state_addrs(&h.console("w"), 1)[0];
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    let snap = h.ws("w").join("snapshots/base");
    let saved = memory_u64(&snap, addr);

    // Roll back in place, once per mode (the default first). `hot` before any lazy restore
    // has recorded a working set reads everything (as eager); after the `uffd` run recorded
    // one, it reads that set into huge pages over a copy-on-write map.
    let ws_file = snap.join("workingset.bin");
    for mode in [
        None,
        Some("eager"),
        Some("mmap"),
        Some("hot"),
        Some("uffd"),
        Some("hot"),
    ] {
        let mut args = vec!["start", "w", "--from-snapshot", "base", "--force"];
        if let Some(m) = mode {
            args.extend(["--memory", m]);
        }
        h.ok(&args);
        continues_exactly(&h, "w", saved, &format!("rollback {mode:?}"));
        if mode == Some("uffd") {
            // The page server writes the working set once its recording VM is gone.
            h.ok(&["halt", "w"]);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !ws_file.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert!(ws_file.exists(), "the uffd restore recorded no working set");
        }
    }
    h.ok(&["halt", "w"]);

    // One fork (default: eager) and a batch (default: copy-on-write map).
    h.ok(&["create", "one", "--from-snapshot", "w:base"]);
    continues_exactly(&h, "one", saved, "single fork");
    h.ok(&["create", "b", "--from-snapshot", "w:base", "--count", "2"]);
    for f in ["b-1", "b-2"] {
        continues_exactly(&h, f, saved, "fork batch");
    }
    for n in ["one", "b-1", "b-2", "w"] {
        h.ok(&["delete", n, "--yes"]);
    }
}

#[test]
fn a_flipped_byte_in_memory_bin_is_refused_in_every_memory_mode() {
    use std::os::unix::fs::FileExt;
    if !kvm_or_skip("a_flipped_byte_in_memory_bin_is_refused_in_every_memory_mode") {
        return;
    }
    let h = Home::new("fullflip");
    h.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--mem",
        MEM,
        "--cmdline",
        CMDLINE,
    ]);
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[2]);
    let addr = state_addrs(&h.console("w"), 1)[0];
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    h.ok(&["halt", "w"]);
    let mem = h.ws("w").join("snapshots/base/memory.bin");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mem)
        .unwrap();
    let size = file.metadata().unwrap().len();
    // A byte of the guest's data (its counter), then a byte in the last page (beyond the
    // pattern region, never written by the guest: a hole in the sparse file).
    let last = size - 4096 + 100;
    let mut hole = [0u8; 1];
    file.read_exact_at(&mut hole, last).unwrap();
    assert_eq!(hole[0], 0, "the last page was expected to be a zero page");
    for (at, what) in [(addr, "data"), (last, "hole")] {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        for mode in [None, Some("eager"), Some("mmap"), Some("uffd"), Some("hot")] {
            let mut args = vec!["start", "w", "--from-snapshot", "base"];
            if let Some(m) = mode {
                args.extend(["--memory", m]);
            }
            let o = h.run(&args);
            assert_eq!(
                o.status.code(),
                Some(5),
                "flipped {what} byte, {mode:?}: {}{}",
                stdout(&o),
                stderr(&o)
            );
            assert!(stderr(&o).contains("memory.bin"), "{}", stderr(&o));
            assert!(h.pid("w").is_none(), "a VMM started from a corrupt file");
        }
        let o = h.run(&["create", "f", "--from-snapshot", "w:base"]);
        assert_eq!(o.status.code(), Some(5), "fork, flipped {what} byte");
        // Put it back: the snapshot is accepted again (the refusal was that byte).
        file.write_all_at(&b, at).unwrap();
        h.ok(&["start", "w", "--from-snapshot", "base"]);
        h.ok(&["halt", "w"]);
    }
    h.ok(&["delete", "w", "--yes"]);
}
