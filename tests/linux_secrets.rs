//! Secrets never reach a snapshot (issue 16), with a Linux guest end to end: a secret delivered,
//! read through exec and copied through a deleted /tmp file leaves no copy in any snapshot file
//! (raw, hex or base64), and comes back after a restore and in a fork; a secret a guest process
//! keeps in its own memory is reported by name, refused by `--secrets strict` (nothing left
//! behind) and by `snapshot export`. The guest kernel gets no `init_on_free=1` on its command
//! line: the kernel config must turn it on.
//!
//! Needs MICROAGENT_TEST_KERNEL and MICROAGENT_TEST_ROOTFS (an ext4 image with the agent at
//! /usr/sbin/microagent-guest-agent and /tmp on tmpfs), which scripts/test.sh builds.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet root=/dev/vda rw";

fn inputs_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    match (
        std::env::var_os("MICROAGENT_TEST_KERNEL"),
        std::env::var_os("MICROAGENT_TEST_ROOTFS"),
    ) {
        (Some(k), Some(r)) => Some((k.into(), r.into())),
        _ => {
            common::require::skip(
                test,
                "linux",
                "MICROAGENT_TEST_KERNEL and MICROAGENT_TEST_ROOTFS are not set (scripts/test.sh sets them)",
            );
            None
        }
    }
}

/// A Linux guest is slow here (nested KVM): allow minutes, not the default two.
fn slow(h: &Home, args: &[&str]) -> std::process::Output {
    h.run_timeout(args, Duration::from_secs(600))
}

fn ok_slow(h: &Home, args: &[&str]) -> String {
    let o = slow(h, args);
    assert!(
        o.status.success(),
        "microagent {args:?} failed ({:?}):\n{}\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// A workspace `name` running with secret TOKEN = the returned value, delivered.
fn running_with_secret(h: &Home, name: &str, kernel: &Path, rootfs: &Path) -> String {
    h.ok(&[
        "create",
        name,
        "--kernel",
        kernel.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--mem",
        "256",
        "--cmdline",
        CMDLINE,
    ]);
    ok_slow(h, &["start", name]);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("tok-{}-{nanos}-Zq8vR2mX7pL4wN9c", std::process::id());
    let file = h.dir.join(format!("secret-{name}"));
    std::fs::write(&file, &secret).unwrap();
    let set = h.ok(&[
        "secret",
        "set",
        name,
        "TOKEN",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    assert!(set.contains("(delivered)"), "{set}");
    secret
}

fn read_secret(h: &Home, name: &str) -> String {
    let got = slow(h, &["exec", name, "--", "cat", "/run/secrets/TOKEN"]);
    assert!(got.status.success(), "{}", stderr(&got));
    stdout(&got)
}

/// Every form of `secret` a file could hold it in, written independently of the scanner: raw,
/// hex in both cases, and base64 (both alphabets) of the value at each of the three alignments
/// inside a longer text, less the characters its neighbours affect.
fn forms(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("raw".to_string(), secret.to_vec())];
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    out.push(("hex".into(), hex.clone().into_bytes()));
    out.push(("HEX".into(), hex.to_uppercase().into_bytes()));
    const STD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (alpha, table) in [
        ("base64", STD),
        (
            "base64url",
            &b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[..],
        ),
    ] {
        for lead in 0..3usize {
            let mut text = vec![b'#'; lead];
            text.extend_from_slice(secret);
            text.extend_from_slice(b"##");
            let mut enc = Vec::new();
            for g in text.chunks(3) {
                let n = (u32::from(g[0]) << 16)
                    | (u32::from(*g.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*g.get(2).unwrap_or(&0));
                for s in [18, 12, 6, 0] {
                    enc.push(table[((n >> s) & 63) as usize]);
                }
            }
            // Drop the group holding the lead bytes and the last two (suffix, padding).
            let stable = enc[4..enc.len() - 8].to_vec();
            out.push((format!("{alpha} lead {lead}"), stable));
        }
    }
    out
}

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Asserts that no file of snapshot `dir` holds `secret` in any form.
fn assert_clean(dir: &Path, secret: &str) {
    let forms = forms(secret.as_bytes());
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for (what, form) in &forms {
            assert_eq!(
                occurrences(&bytes, form),
                0,
                "{what} form of the secret is in {}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} files in {}", dir.display());
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn secrets_read_and_deleted_leave_no_copy_and_come_back_after_restore_and_fork() {
    let test = "secrets_read_and_deleted_leave_no_copy_and_come_back_after_restore_and_fork";
    let Some((kernel, rootfs)) = inputs_or_skip(test) else {
        return;
    };
    let h = Home::new("linux-secrets-clean");
    let secret = running_with_secret(&h, "lx", &kernel, &rootfs);
    // Read through exec (agent buffers, pipes, vsock packets), and copied by a guest process
    // into a /tmp file that is deleted again (a tmpfs: freed pages).
    assert_eq!(read_secret(&h, "lx"), secret);
    let copy = slow(
        &h,
        &[
            "exec",
            "lx",
            "--",
            "sh",
            "-c",
            "cp /run/secrets/TOKEN /tmp/token-copy && cat /tmp/token-copy > /dev/null && rm /tmp/token-copy && ! test -e /tmp/token-copy",
        ],
    );
    assert!(copy.status.success(), "{}", stderr(&copy));

    let out = ok_slow(&h, &["--json", "snapshot", "create", "lx", "--tag", "base"]);
    let v = json(&out);
    let scan = &v["snapshot"]["secret_scan"];
    assert_eq!(scan["scanned"], serde_json::json!(["TOKEN"]), "{v}");
    assert_eq!(scan["found"], serde_json::json!([]), "{v}");
    assert_clean(&h.ws("lx").join("snapshots/base"), &secret);

    // The source got its secret back after the capture.
    assert_eq!(read_secret(&h, "lx"), secret);

    // Restore in place, and a fork: both get it back in /run/secrets.
    h.ok(&["halt", "lx"]);
    ok_slow(&h, &["start", "lx", "--from-snapshot", "base"]);
    assert_eq!(read_secret(&h, "lx"), secret, "after restore");
    h.ok(&["halt", "lx"]);
    ok_slow(&h, &["create", "fk", "--from-snapshot", "lx:base"]);
    assert_eq!(read_secret(&h, "fk"), secret, "in the fork");
    h.ok(&["delete", "fk", "--yes"]);
    h.ok(&["delete", "lx", "--yes"]);
}

#[test]
fn a_secret_kept_in_guest_memory_is_reported_refused_by_strict_and_by_export() {
    let test = "a_secret_kept_in_guest_memory_is_reported_refused_by_strict_and_by_export";
    let Some((kernel, rootfs)) = inputs_or_skip(test) else {
        return;
    };
    let h = Home::new("linux-secrets-kept");
    let secret = running_with_secret(&h, "lx", &kernel, &rootfs);
    // A guest process that keeps the value in a shell variable, in the background. The exec
    // returns once it has read it (before the capture scrubs /run/secrets).
    let keep = slow(
        &h,
        &[
            "exec",
            "lx",
            "--",
            "sh",
            "-c",
            "sh -c 'S=$(cat /run/secrets/TOKEN); touch /tmp/kept; while :; do sleep 1000; done' </dev/null >/dev/null 2>&1 & \
             while [ ! -e /tmp/kept ]; do sleep 1; done",
        ],
    );
    assert!(keep.status.success(), "{}", stderr(&keep));

    // Reported, by name only: on stderr, in --json, in the manifest.
    let human = slow(&h, &["snapshot", "create", "lx", "--tag", "kept"]);
    assert!(human.status.success(), "{}", stderr(&human));
    let err = stderr(&human);
    assert!(err.contains("TOKEN") && err.contains("pages"), "{err}");
    assert!(!err.contains(&secret), "the value is on stderr: {err}");
    let manifest =
        std::fs::read_to_string(h.ws("lx").join("snapshots/kept/manifest.json")).unwrap();
    assert!(!manifest.contains(&secret));
    let m = json(&manifest);
    assert_eq!(m["secret_scan"]["found"][0]["name"], "TOKEN", "{m}");
    assert!(
        m["secret_scan"]["found"][0]["pages"].as_u64().unwrap() > 0,
        "{m}"
    );

    let out = ok_slow(
        &h,
        &["--json", "snapshot", "create", "lx", "--tag", "kept-json"],
    );
    assert!(!out.contains(&secret));
    let v = json(&out);
    let found = &v["snapshot"]["secret_scan"]["found"];
    assert_eq!(found[0]["name"], "TOKEN", "{v}");
    assert!(found[0]["pages"].as_u64().unwrap() > 0, "{v}");

    // --secrets strict refuses with exit 5, and leaves nothing: no snapshot, no temporary
    // directory, no tag.
    let strict = slow(
        &h,
        &[
            "snapshot",
            "create",
            "lx",
            "--tag",
            "strict",
            "--secrets",
            "strict",
        ],
    );
    assert_eq!(strict.status.code(), Some(5), "{}", stderr(&strict));
    assert!(stderr(&strict).contains("TOKEN"), "{}", stderr(&strict));
    assert!(!stderr(&strict).contains(&secret));
    let left: Vec<String> = std::fs::read_dir(h.ws("lx").join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kept" && n != "kept-json")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let list = h.ok(&["snapshot", "list", "lx"]);
    assert!(!list.contains("strict"), "{list}");
    // The workspace goes on, with its secret back.
    assert_eq!(read_secret(&h, "lx"), secret);

    // An archive leaves the host: export refuses, unless told otherwise.
    let archive = h.dir.join("kept.tar.zst");
    let export = slow(
        &h,
        &[
            "snapshot",
            "export",
            "lx",
            "kept",
            archive.to_str().unwrap(),
        ],
    );
    assert_eq!(export.status.code(), Some(5), "{}", stderr(&export));
    assert!(stderr(&export).contains("TOKEN"), "{}", stderr(&export));
    assert!(!archive.exists());
    ok_slow(
        &h,
        &[
            "snapshot",
            "export",
            "lx",
            "kept",
            archive.to_str().unwrap(),
            "--allow-secrets",
        ],
    );
    assert!(archive.exists());
    h.ok(&["delete", "lx", "--yes"]);
}
