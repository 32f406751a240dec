//! Format compatibility as a promise: every state format version this build reads has a golden
//! snapshot under tests/golden (made by `scripts/make-golden.sh` with the build that introduced
//! that version), and each one imports, restores and continues exactly with the current code.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

struct Golden {
    archive: PathBuf,
    /// The test guest the golden was captured with (a restore refuses any other kernel).
    kernel: PathBuf,
    tag: String,
    state_addr: u64,
    count: u64,
}

fn golden(version: u32) -> Golden {
    let dir = golden_dir();
    let meta = dir.join(format!("v{version}.json"));
    let text = std::fs::read_to_string(&meta).unwrap_or_else(|e| {
        panic!(
            "no golden snapshot for state format {version} ({}: {e}); make it with \
             scripts/make-golden.sh {version} and the build that introduced the version",
            meta.display()
        )
    });
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format_version"].as_u64(), Some(u64::from(version)));
    Golden {
        archive: dir.join(format!("v{version}.tar.zst")),
        kernel: dir.join(format!("v{version}.testguest")),
        tag: v["tag"].as_str().unwrap().to_string(),
        state_addr: v["state_addr"].as_u64().unwrap(),
        count: v["count"].as_u64().unwrap(),
    }
}

/// The state format version recorded in a snapshot's vmstate.bin header.
fn header_version(snapshot: &Path) -> u32 {
    let bytes = std::fs::read(snapshot.join("vmstate.bin")).unwrap();
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn every_state_format_version_restores_and_continues_exactly() {
    if !kvm_or_skip("every_state_format_version_restores_and_continues_exactly") {
        return;
    }
    // The goldens' VM had a virtio-net device (a Linux-style workspace defaults to user-mode
    // networking), so their device state covers it, and restoring them needs passt.
    if common::oci::tool("passt").is_none() {
        require::skip(
            "every_state_format_version_restores_and_continues_exactly",
            "net",
            "passt is not installed (apt-get install passt)",
        );
        return;
    }
    let oldest = snapshot::vmstate::OLDEST_STATE_FORMAT_VERSION;
    let newest = snapshot::vmstate::STATE_FORMAT_VERSION;
    for version in oldest..=newest {
        let g = golden(version);
        let h = Home::new(&format!("golden-v{version}"));
        let name = format!("g{version}");
        h.ok(&[
            "snapshot",
            "import",
            g.archive.to_str().unwrap(),
            "--as",
            &name,
            "--kernel",
            g.kernel.to_str().unwrap(),
        ]);
        let status: serde_json::Value =
            serde_json::from_str(&h.ok(&["--json", "status", &name])).unwrap();
        assert_eq!(
            status["net"], "user",
            "v{version}: the import gives the captured virtio-net device a backend: {status}"
        );
        let snap = h.ws(&name).join("snapshots").join(&g.tag);
        assert_eq!(header_version(&snap), version, "golden v{version}'s header");
        assert_eq!(
            memory_u64(&snap, g.state_addr),
            g.count,
            "v{version}: the counter in memory.bin as captured"
        );
        h.ok(&["start", &name, "--from-snapshot", &g.tag]);
        h.wait_counts(&name, &[g.count]);
        let first = counts(&h.console(&name))[0].1;
        assert!(
            first >= g.count && first < g.count + 1000,
            "v{version}: continued at {first}, captured at {}",
            g.count
        );
        // A capture of the restored guest is written in the current version.
        h.ok(&["snapshot", "create", &name, "--tag", "again"]);
        assert_eq!(header_version(&h.ws(&name).join("snapshots/again")), newest);
        h.ok(&["halt", &name]);
    }
}

/// A snapshot from a future format version is refused, naming both versions, and leaves the
/// workspace as it was.
#[test]
fn a_future_format_version_is_refused_with_the_versions_named() {
    if !kvm_or_skip("a_future_format_version_is_refused_with_the_versions_named") {
        return;
    }
    let newest = snapshot::vmstate::STATE_FORMAT_VERSION;
    let g = golden(newest);
    let h = Home::new("golden-future");
    h.ok(&[
        "snapshot",
        "import",
        g.archive.to_str().unwrap(),
        "--as",
        "f",
        "--kernel",
        g.kernel.to_str().unwrap(),
    ]);
    let state = h.ws("f").join("snapshots").join(&g.tag).join("vmstate.bin");
    let mut bytes = std::fs::read(&state).unwrap();
    let future = newest + 1;
    bytes[8..12].copy_from_slice(&future.to_le_bytes());
    // Keep the CRC valid so that only the version can be the reason.
    let end = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&state, &bytes).unwrap();
    // And the manifest's digest of the file, resealed, so the digest check passes too.
    let dir = state.parent().unwrap();
    let mut m = snapshot::Manifest::load(dir).unwrap();
    let (digest, size) = snapshot::digest::file_digest(&state).unwrap();
    let entry = m
        .files
        .iter_mut()
        .find(|f| f.name == "vmstate.bin")
        .unwrap();
    entry.digest = digest;
    entry.size = size;
    std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
    let o = h.run(&["start", "f", "--from-snapshot", &g.tag]);
    assert!(!o.status.success(), "a future format restored");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("version {future}")) && err.contains(&newest.to_string()),
        "the error names both versions: {err}"
    );
    assert_eq!(
        h.pid("f").filter(|p| alive(*p)),
        None,
        "no VMM left running"
    );
}
