//! Bad input to `microagent run`: one clear line on stderr, a documented non-zero exit, no panic.

mod common;
use common::*;
use std::time::Duration;

fn run_err(args: &[&str]) -> (i32, String) {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let out = microagent(&all, Duration::from_secs(30));
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    (out.status.code().unwrap_or(-1), err)
}

fn assert_one_line(err: &str) {
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("microagent: "), "{err:?}");
}

#[test]
fn missing_kernel_is_not_found() {
    let (code, err) = run_err(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 3, "{err}");
    assert_one_line(&err);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn non_elf_kernel_is_refused() {
    if !kvm_or_skip("non_elf_kernel_is_refused") {
        return;
    }
    let f = std::env::temp_dir().join(format!("ma-notkernel-{}", std::process::id()));
    std::fs::write(&f, b"this is not a kernel\n").unwrap();
    let (code, err) = run_err(&["--kernel", f.to_str().unwrap()]);
    std::fs::remove_file(&f).unwrap();
    assert_eq!(code, 2, "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("neither an x86_64 ELF vmlinux nor a bzImage"),
        "{err}"
    );
}

#[test]
fn bad_memory_sizes_are_refused() {
    for mem in ["0", "999999999"] {
        let (code, err) = run_err(&["--kernel", "builtin:testguest", "--mem", mem]);
        assert_eq!(code, 2, "--mem {mem}: {err}");
        assert_one_line(&err);
        assert!(err.contains("MiB"), "{err}");
    }
}

#[test]
fn bad_vcpu_counts_are_refused() {
    for n in ["0", "9", "300"] {
        let (code, err) = run_err(&["--kernel", "builtin:testguest", "--vcpus", n]);
        assert_eq!(code, 2, "--vcpus {n}: {err}");
        assert_one_line(&err);
        assert!(err.contains("between 1 and 8"), "{err}");
    }
}

#[test]
fn unknown_builtin_is_not_found() {
    let (code, err) = run_err(&["--kernel", "builtin:nope"]);
    assert_eq!(code, 3, "{err}");
    assert_one_line(&err);
}
