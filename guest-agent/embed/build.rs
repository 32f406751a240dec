//! Builds the guest agent statically for x86_64 Linux and hands its path to this crate, which
//! embeds it. A nested cargo with its own target directory (beside the outer one, shared by every
//! profile), so it never waits on the outer build's lock and is compiled once per checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let agent_dir = manifest_dir.join("..");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", agent_dir.join(p).display());
    }
    let elf = build_agent(&agent_dir, &target_dir(&out_dir));
    println!("cargo:rustc-env=MICROAGENT_AGENT_ELF={}", elf.display());
}

/// `<outer target>/guest-agent-static`: OUT_DIR is `<target>/<profile>/build/<pkg>/out`.
fn target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("guest-agent-static"))
        .unwrap_or_else(|| out_dir.join("guest-agent-static"))
}

fn build_agent(agent_dir: &Path, target_dir: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(agent_dir)
        .args([
            "build",
            "--release",
            "--bin",
            "microagent-agent",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(target_dir);
    // The outer build's flags and settings are for the host build; the agent gets its own.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Static (the guest has no libc of ours) and stripped (it is copied into every image).
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-C", "target-feature=+crt-static", "-C", "strip=symbols"].join("\x1f"),
    );
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run cargo to build the guest agent: {e}");
    });
    if !out.status.success() {
        panic!(
            "building the static guest agent in {} failed:\n{}",
            agent_dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    target_dir
        .join(TARGET)
        .join("release")
        .join("microagent-agent")
}
