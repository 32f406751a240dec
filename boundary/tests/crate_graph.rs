//! The layering docs/architecture.md promises, checked against the manifests: the VMM and the
//! snapshot engine meet only in this crate. A build dependency of `vmm` on `snapshot` (or the
//! other way round) fails here; dev-dependencies (tests drive the engine) are allowed.

use std::process::Command;

fn normal_deps(meta: &serde_json::Value, package: &str) -> Vec<String> {
    let pkg = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == package)
        .unwrap_or_else(|| panic!("no package {package} in the workspace"));
    pkg["dependencies"]
        .as_array()
        .expect("dependencies")
        .iter()
        .filter(|d| d["kind"].is_null())
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn vmm_and_the_snapshot_engine_meet_only_in_the_boundary() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let vmm = normal_deps(&meta, "vmm");
    let engine = normal_deps(&meta, "snapshot");
    let boundary = normal_deps(&meta, "snapshot-boundary");
    assert!(vmm.contains(&"snapshot-boundary".to_string()), "{vmm:?}");
    assert!(
        !vmm.contains(&"snapshot".to_string()),
        "vmm links the engine: {vmm:?}"
    );
    assert!(
        engine.contains(&"snapshot-boundary".to_string()),
        "{engine:?}"
    );
    assert!(
        !engine.contains(&"vmm".to_string()),
        "the engine links vmm: {engine:?}"
    );
    assert!(
        boundary.iter().all(|d| d != "vmm" && d != "snapshot"),
        "the boundary depends on a side: {boundary:?}"
    );
}
