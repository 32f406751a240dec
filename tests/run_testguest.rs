//! `microagent run` with the embedded test guest: ready line, every vCPU's count, clean exit.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn two_vcpus_count_and_exit_zero_on_guest_reset() {
    if !kvm_or_skip("two_vcpus_count_and_exit_zero_on_guest_reset") {
        return;
    }
    let out = microagent(
        &[
            "run",
            "--kernel",
            "builtin:testguest",
            "--vcpus",
            "2",
            "--mem",
            "64",
            "--cmdline",
            "mode=counter count=300 mem=1 tick_ms=1",
        ],
        Duration::from_secs(60),
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{text}\n{}",
        out.status,
        stderr(&out)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("testguest: ready vcpus=2 mode=counter mem=1")),
        "{text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
    let done = done_counts(&text).unwrap_or_else(|| panic!("no done line:\n{text}"));
    assert_eq!(done.len(), 2, "{text}");
    assert_eq!(done[0], 300, "the BSP stops exactly at count=300");
    assert!(done[1] > 0, "the AP counted: {text}");
    let c = counts(&text);
    for cpu in [0, 1] {
        assert!(
            c.iter().any(|(i, _)| *i == cpu),
            "no count from cpu{cpu}:\n{text}"
        );
    }
    // Each vCPU's counts only go up.
    for cpu in [0, 1] {
        let mine: Vec<u64> = c
            .iter()
            .filter(|(i, _)| *i == cpu)
            .map(|(_, n)| *n)
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "cpu{cpu}: {mine:?}");
    }
}

#[test]
fn one_vcpu_large_region_verifies_and_exits() {
    if !kvm_or_skip("one_vcpu_large_region_verifies_and_exits") {
        return;
    }
    let out = microagent(
        &[
            "run",
            "--kernel",
            "builtin:testguest",
            "--mem",
            "256",
            "--cmdline",
            "mode=counter count=5 mem=64",
        ],
        Duration::from_secs(60),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert_eq!(done_counts(&text), Some(vec![5]), "{text}");
}

#[test]
fn console_goes_to_a_file_when_asked() {
    if !kvm_or_skip("console_goes_to_a_file_when_asked") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ma-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let out = microagent(
        &[
            "run",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "count=3",
            "--console",
            log.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("testguest:"),
        "console leaked to stdout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(done_counts(&text), Some(vec![3]), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_guest_that_crashes_is_exit_7_with_registers() {
    if !kvm_or_skip("a_guest_that_crashes_is_exit_7_with_registers") {
        return;
    }
    // crash=pf makes the test guest take a page fault; its handler triple-faults the VM.
    let out = microagent(
        &[
            "run",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "count=1000000 crash=pf",
        ],
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        stdout(&out).contains("testguest: exception 14"),
        "{}",
        stdout(&out)
    );
    assert!(
        err.contains("triple fault") && err.contains("rip=0x"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
