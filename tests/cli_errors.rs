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

/// Without --kernel, `run` and `create` use the cached default kernel; when there is none, the
/// error names the one command that makes it, and nothing is created.
#[test]
fn no_default_kernel_names_the_command_that_builds_it() {
    let cache = std::env::temp_dir().join(format!("ma-nocache-{}", std::process::id()));
    let home = std::env::temp_dir().join(format!("ma-nokernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&home);
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("MICROAGENT_CACHE", &cache)
            .env("MICROAGENT_HOME", &home)
            .output()
            .unwrap()
    };
    for args in [&["run"][..], &["create", "w"][..]] {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {err}");
        assert_one_line(&err);
        assert!(err.contains("`microagent kernel build`"), "{err}");
    }
    assert!(!home.join("workspaces/w").exists());
    let o = run(&["--json", "kernel", "list"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kernels"].as_array().unwrap().len(), 0, "{v}");
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .split_whitespace()
        .any(|f| f == "vmx" || f == "svm");
    assert_eq!(
        v["host_variant"],
        if hw { "production" } else { "nested-test" }
    );
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&home);
}

/// With the default kernel built (CI builds it), `kernel list` marks it and `create` without
/// --kernel pins exactly that file.
#[test]
fn the_default_kernel_is_listed_and_used() {
    let home = std::env::temp_dir().join(format!("ma-defkernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("MICROAGENT_HOME", &home)
            .output()
            .unwrap()
    };
    let v: serde_json::Value =
        serde_json::from_slice(&run(&["--json", "kernel", "list"]).stdout).unwrap();
    let Some(default) = v["kernels"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["default"] == true))
    else {
        require::skip(
            "the_default_kernel_is_listed_and_used",
            "linux",
            "this host's default kernel is not built (`microagent kernel build`)",
        );
        return;
    };
    let path = default["path"].as_str().unwrap();
    let sha = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&sha.stdout).starts_with(default["sha256"].as_str().unwrap()));
    let o = run(&["--json", "create", "w"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("workspaces/w/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["kernel"], path);
    let _ = std::fs::remove_dir_all(&home);
}
