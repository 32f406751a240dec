//! Exact snapshot tests with the bare-metal test guest in counter mode: a restored guest goes on
//! from the saved count with consistent memory (the guest checks every word of its region every
//! round and prints ERROR otherwise), and forks never see each other's writes.

mod common;

use std::time::Duration;

use common::*;
use snapshot::restore::RestoreMode;
use snapshot::{capture, CaptureRequest, Snapshot, VerifyOptions};
use vmm::component_state::Persist;

const T: Duration = Duration::from_secs(30);

fn take(vm: &vmm::Vm, dir: &std::path::Path, tag: &str, kernel: &std::path::Path) -> Snapshot {
    capture(
        vm,
        &CaptureRequest {
            dir,
            tag,
            kernel,
            cmdline: CMDLINE,
            rootfs: None,
            image: None,
            workspace: Some("test"),
            note: None,
            parent: None,
            secrets: None,
        },
        &mut |_| {},
    )
    .unwrap();
    Snapshot::open(&dir.join(tag)).unwrap()
}

fn restore_continues_exactly(vcpus: u8, mode: RestoreMode) {
    let dir = scratch(&format!("exact-{vcpus}-{mode:?}"));
    let kernel = testguest(&dir);
    let (src, src_out) = boot(&kernel, vcpus, 64, CMDLINE);
    let n = vcpus as usize;
    src_out.wait_counts_above(&vec![50; n], T);
    let addrs = src_out.state_addrs(n);

    src.pause().unwrap();
    let at_pause = memory_counts(&src, &addrs);
    let snap = take(&src, &dir.join("snapshots"), "s1", &kernel);
    let saved = file_counts(&snap, &addrs);
    assert_eq!(
        saved, at_pause,
        "the snapshot holds the counts of the moment it was taken"
    );

    // The source runs on well past the snapshot.
    src.resume().unwrap();
    let later = src_out.wait_counts_above(&saved.iter().map(|c| c + 500).collect::<Vec<_>>(), T);
    drop(src);

    let (vm, out) = restore(&snap, &kernel, mode, true);
    assert_eq!(
        memory_counts(&vm, &addrs),
        saved,
        "restored memory is the snapshot's"
    );
    vm.resume().unwrap();
    out.wait_counts_above(&saved, T);
    let first = out.first_counts(n);
    for cpu in 0..n {
        let f = first[cpu].unwrap();
        // The guest prints a count right after storing it, so a snapshot taken between the
        // two shows its saved count as the first line after restore.
        assert!(
            f >= saved[cpu],
            "cpu{cpu} restarted below the snapshot: {f} < {}",
            saved[cpu]
        );
        assert!(
            f < later[cpu],
            "cpu{cpu} continued from where the source got to ({f} >= {}), not from the snapshot",
            later[cpu]
        );
    }
    // A few hundred more verified rounds on every vCPU without an ERROR line.
    out.wait_counts_above(&saved.iter().map(|c| c + 200).collect::<Vec<_>>(), T);
    assert!(!out.text().contains("ERROR"), "{}", out.text());
    drop(vm);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn restore_continues_from_saved_count_1_vcpu() {
    if !kvm_or_skip("restore_continues_from_saved_count_1_vcpu") {
        return;
    }
    restore_continues_exactly(1, RestoreMode::Eager);
    restore_continues_exactly(1, RestoreMode::PrivateMap);
}

#[test]
fn restore_continues_from_saved_count_2_vcpus() {
    if !kvm_or_skip("restore_continues_from_saved_count_2_vcpus") {
        return;
    }
    restore_continues_exactly(2, RestoreMode::Eager);
    restore_continues_exactly(2, RestoreMode::PrivateMap);
}

#[test]
fn forks_and_source_diverge_and_five_forks_run_at_once() {
    if !kvm_or_skip("forks_and_source_diverge_and_five_forks_run_at_once") {
        return;
    }
    let dir = scratch("forks");
    let kernel = testguest(&dir);
    let (src, src_out) = boot(&kernel, 2, 64, CMDLINE);
    src_out.wait_counts_above(&[20, 20], T);
    let addrs = src_out.state_addrs(2);
    src.pause().unwrap();
    let snap = take(&src, &dir.join("snapshots"), "base", &kernel);
    let saved = file_counts(&snap, &addrs);
    src.resume().unwrap();

    let forks: Vec<_> = (0..5)
        .map(|i| {
            let mode = if i % 2 == 0 {
                RestoreMode::PrivateMap
            } else {
                RestoreMode::Eager
            };
            restore(&snap, &kernel, mode, false)
        })
        .collect();
    let target: Vec<u64> = saved.iter().map(|c| c + 300).collect();
    for (_, out) in &forks {
        out.wait_counts_above(&target, T);
    }
    src_out.wait_counts_above(&target, T);

    // Every fork started from the snapshot and checked its memory every round.
    for (i, (_, out)) in forks.iter().enumerate() {
        let first = out.first_counts(2);
        for cpu in 0..2 {
            assert!(first[cpu].unwrap() >= saved[cpu], "fork {i} cpu{cpu}");
        }
        assert!(!out.text().contains("ERROR"), "fork {i}:\n{}", out.text());
    }
    // Pause everything and compare counters in memory: each VM has its own.
    src.pause().unwrap();
    let mut all = vec![memory_counts(&src, &addrs)];
    for (vm, _) in &forks {
        vm.pause().unwrap();
        all.push(memory_counts(vm, &addrs));
    }
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            assert_ne!(all[i], all[j], "VMs {i} and {j} share counters");
        }
    }
    // Copy-on-write: nothing a fork wrote reached the snapshot's files.
    snap.verify(&VerifyOptions {
        kernel: Some(&kernel),
        contents: true,
        recheck: false,
    })
    .unwrap();
    assert_eq!(file_counts(&snap, &addrs), saved);
    drop(forks);
    drop(src);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn twenty_forks_run_at_once_each_with_its_own_memory() {
    if !kvm_or_skip("twenty_forks_run_at_once_each_with_its_own_memory") {
        return;
    }
    let dir = scratch("fanout");
    let kernel = testguest(&dir);
    let cmdline = "mode=counter mem=1 tick_ms=2 layout=1";
    let (src, src_out) = boot(&kernel, 1, 32, cmdline);
    src_out.wait_counts_above(&[20], T);
    let addrs = src_out.state_addrs(1);
    src.pause().unwrap();
    let snap = take(&src, &dir.join("snapshots"), "base", &kernel);
    let saved = file_counts(&snap, &addrs);
    drop(src);

    let t0 = std::time::Instant::now();
    let forks: Vec<_> = (0..20)
        .map(|_| restore(&snap, &kernel, RestoreMode::PrivateMap, false))
        .collect();
    eprintln!("20 restores: {:?}", t0.elapsed());
    let target = [saved[0] + 200];
    for (i, (_, out)) in forks.iter().enumerate() {
        out.wait_counts_above(&target, T);
        assert!(
            out.first_counts(1)[0].unwrap() >= saved[0],
            "fork {i} did not continue from the snapshot"
        );
        eprintln!("fork {i} at target: {:?}", t0.elapsed());
    }
    // Each fork's counter is its own: pause all, then every pair differs, and a write into one
    // fork's memory shows in no other.
    for (vm, _) in &forks {
        vm.pause().unwrap();
    }
    let counts: Vec<u64> = forks
        .iter()
        .map(|(vm, _)| memory_counts(vm, &addrs)[0])
        .collect();
    use vm_memory::{Bytes, GuestAddress};
    let probe = GuestAddress(0x7f000);
    forks[3]
        .0
        .memory()
        .write_obj(0xfeed_f00du64, probe)
        .unwrap();
    for (i, (vm, out)) in forks.iter().enumerate() {
        let v: u64 = vm.memory().read_obj(probe).unwrap();
        assert_eq!(v == 0xfeed_f00d, i == 3, "fork {i} sees fork 3's write");
        assert!(!out.text().contains("ERROR"), "fork {i}:\n{}", out.text());
    }
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert!(
        sorted.len() > 1,
        "all forks report the same count: {counts:?}"
    );
    drop(forks);
    std::fs::remove_dir_all(dir).unwrap();
}

fn take_diff(
    vm: &vmm::Vm,
    dir: &std::path::Path,
    tag: &str,
    parent: &str,
    kernel: &std::path::Path,
) -> Snapshot {
    capture(
        vm,
        &CaptureRequest {
            dir,
            tag,
            kernel,
            cmdline: CMDLINE,
            rootfs: None,
            image: None,
            workspace: Some("test"),
            note: None,
            parent: Some(parent),
            secrets: None,
        },
        &mut |_| {},
    )
    .unwrap();
    Snapshot::open(&dir.join(tag)).unwrap()
}

#[test]
fn a_diff_chain_of_three_restores_exactly_like_a_full_snapshot() {
    if !kvm_or_skip("a_diff_chain_of_three_restores_exactly_like_a_full_snapshot") {
        return;
    }
    diff_chain_restores_exactly(false);
}

#[test]
fn a_diff_chain_taken_with_the_dirty_log_restores_exactly_too() {
    if !kvm_or_skip("a_diff_chain_taken_with_the_dirty_log_restores_exactly_too") {
        return;
    }
    diff_chain_restores_exactly(true);
}

/// Diffs find their pages by content (page digests), or from KVM's dirty log when it is armed.
fn diff_chain_restores_exactly(dirty_log: bool) {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let dir = scratch(if dirty_log {
        "diffchain-log"
    } else {
        "diffchain"
    });
    let kernel = testguest(&dir);
    let snaps = dir.join("snapshots");
    let (vm, out) = boot(&kernel, 2, 64, CMDLINE);
    if dirty_log {
        vm.enable_dirty_tracking().unwrap();
    }
    out.wait_counts_above(&[10, 10], T);
    vm.pause().unwrap();
    take(&vm, &snaps, "base", &kernel);
    let mut parent = "base".to_string();
    for d in ["d1", "d2", "d3"] {
        vm.resume().unwrap();
        let now = out
            .last_counts(2)
            .into_iter()
            .map(|c| c.unwrap_or(0))
            .collect::<Vec<_>>();
        out.wait_counts_above(&now.iter().map(|c| c + 50).collect::<Vec<_>>(), T);
        vm.pause().unwrap();
        let s = take_diff(&vm, &snaps, d, &parent, &kernel);
        assert_eq!(s.manifest.kind, snapshot::Kind::Diff);
        assert_eq!(s.manifest.parent.as_deref(), Some(parent.as_str()));
        parent = d.to_string();
    }
    // The same moment, captured in full (the VM is still paused).
    let full = take(&vm, &snaps, "full", &kernel);
    let d3 = Snapshot::open(&snaps.join("d3")).unwrap();
    assert_eq!(d3.chain().unwrap().len(), 4);
    // A diff holds far less than the whole memory.
    let data = |s: &Snapshot| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(s.memory_path()).unwrap().blocks() * 512
    };
    assert!(
        data(&d3) < data(&full),
        "diff {} >= full {}",
        data(&d3),
        data(&full)
    );
    drop(vm);

    let (a, _) = restore(&d3, &kernel, RestoreMode::PrivateMap, true);
    let (b, _) = restore(&full, &kernel, RestoreMode::Eager, true);
    for (ra, rb) in a.memory().iter().zip(b.memory().iter()) {
        let mut x = vec![0u8; ra.len() as usize];
        let mut y = vec![0u8; rb.len() as usize];
        a.memory().read_slice(&mut x, ra.start_addr()).unwrap();
        b.memory().read_slice(&mut y, rb.start_addr()).unwrap();
        assert!(
            x == y,
            "guest memory differs between the diff chain and the full snapshot"
        );
    }
    let (sa, sb) = (a.save().unwrap(), b.save().unwrap());
    for (va, vb) in sa.vcpus.iter().zip(&sb.vcpus) {
        assert_eq!(va.regs.rip, vb.regs.rip);
        assert_eq!(va.regs.rsp, vb.regs.rsp);
    }
    // And the restored chain runs on with consistent memory.
    a.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    drop(b);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A snapshot from a host whose TSC ran at another rate: restored at that rate where KVM can
/// scale the TSC, else at this host's rate (with a warning). Either way the guest continues
/// exactly; before, a host without scaling refused it (KVM_SET_TSC_KHZ: EINVAL).
#[test]
fn a_snapshot_from_a_host_with_another_tsc_rate_continues_exactly() {
    if !kvm_or_skip("a_snapshot_from_a_host_with_another_tsc_rate_continues_exactly") {
        return;
    }
    let dir = scratch("tsc-rate");
    let kernel = testguest(&dir);
    let (src, src_out) = boot(&kernel, 1, 64, CMDLINE);
    src_out.wait_counts_above(&[50], T);
    let addrs = src_out.state_addrs(1);
    src.pause().unwrap();
    let snap = take(&src, &dir.join("snapshots"), "s1", &kernel);
    drop(src);
    let saved = file_counts(&snap, &addrs);

    let mut state: vmm::vm::VmState = snap.load_state().unwrap();
    let khz = state.vcpus[0]
        .tsc_khz
        .expect("this host reports its TSC rate");
    // Slower than this host: without TSC scaling KVM accepts a faster rate (it catches the
    // TSC up) but refuses a slower one, which is what a newer host meets with an older
    // host's snapshot.
    for v in &mut state.vcpus {
        v.tsc_khz = Some(khz - khz / 4);
    }
    let out = Output::default();
    let layout = vmm::memory::layout(state.mem_mib).unwrap();
    let config = vmm::vm::RestoreConfig {
        memory: snapshot::restore::GuestRam::from_file(
            &layout,
            &snap.memory_path(),
            RestoreMode::Eager,
        )
        .unwrap()
        .into_restored(),
        console: vmm::vm::Console::Writer(Box::new(out.clone())),
        paused: false,
        devices: None,
    };
    let vm = vmm::Vm::restore(config, &state)
        .expect("a different TSC rate is not a reason to refuse a snapshot");
    out.wait_counts_above(&saved.iter().map(|c| c + 100).collect::<Vec<_>>(), T);
    assert!(!out.text().contains("ERROR"), "{}", out.text());
    drop(vm);
    std::fs::remove_dir_all(dir).unwrap();
}
