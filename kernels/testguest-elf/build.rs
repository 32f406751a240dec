//! Builds the bare-metal test guest (kernels/testguest) for x86_64-unknown-none and hands its
//! ELF to this crate, which embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.join("../testguest");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "linker.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(p).display());
    }
    let elf = build_guest(&guest_dir, &out_dir);
    println!("cargo:rustc-env=MICROAGENT_TESTGUEST_ELF={}", elf.display());
}

fn build_guest(guest_dir: &Path, out_dir: &Path) -> PathBuf {
    let target_dir = out_dir.join("testguest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest_dir)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags are for the host target; the guest brings its own.
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
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run cargo to build the test guest: {e}");
    });
    if !out.status.success() {
        panic!(
            "building the test guest in {} failed; is the target installed? \
             (rustup target add {TARGET})\n{}",
            guest_dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    target_dir.join(TARGET).join("release").join("testguest")
}
