//! `microagent kernel list|build`, and the default kernel for `create` and `run`.
//!
//! The kernel recipe (kernels/linux: build.sh, its config fragments and the test-only patch) is
//! built into the binary, so an installed `microagent` can build its own guest kernel from the
//! distribution's source package. The recipe writes its results into a cache keyed by a digest
//! of what went into them; the default kernel is the cached build of the variant this host needs
//! (`nested-test` where KVM is nested and emulates guest kernel mode, else `production`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Subcommand;
use serde_json::json;

use crate::exit::{Code, Failure};
use crate::output::Out;

const RECIPE: &[(&str, &str)] = &[
    ("build.sh", include_str!("../../kernels/linux/build.sh")),
    (
        "microvm.config",
        include_str!("../../kernels/linux/microvm.config"),
    ),
    (
        "nested-kvm.config",
        include_str!("../../kernels/linux/nested-kvm.config"),
    ),
    (
        "nested-kvm-6.1.patch",
        include_str!("../../kernels/linux/nested-kvm-6.1.patch"),
    ),
];

/// build.sh's exit code for "not in the cache" under `--cached-only`.
const NOT_CACHED: i32 = 3;

#[derive(Subcommand)]
pub enum KernelCommand {
    /// List the guest kernels in the cache (path, variant, version, sha256); * marks the default.
    List,
    /// Build the default guest kernel for this host (or --variant) from Debian's linux-source-6.1.
    Build {
        /// production (hardware KVM) or nested-test (test-only, for nested page-table KVM).
        #[arg(long, value_parser = ["production", "nested-test"])]
        variant: Option<String>,
    },
}

pub fn run(cmd: KernelCommand, out: Out) -> Result<(), Failure> {
    match cmd {
        KernelCommand::List => list(out),
        KernelCommand::Build { variant } => build(variant.as_deref(), out),
    }
}

/// The variant this host's KVM can run: nested, page-table based KVM (no vmx/svm flag in the
/// CPU flags) needs the test-only kernel.
pub fn host_variant() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hardware {
        "production"
    } else {
        "nested-test"
    }
}

/// `${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}`, as build.sh computes it.
pub(crate) fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("MICROAGENT_CACHE").unwrap_or_else(|| {
        env("XDG_CACHE_HOME")
            .or_else(|| env("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/tmp"))
            .join("microagent")
    })
}

/// Writes the recipe into a private directory of the cache and returns it.
fn recipe_dir() -> Result<PathBuf, Failure> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, text) in RECIPE {
        h.update(name.as_bytes());
        h.update(text.as_bytes());
    }
    let digest: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = cache_root()
        .join("kernels")
        .join(format!(".recipe-{digest}"));
    if dir.join("build.sh").is_file() {
        return Ok(dir);
    }
    let fail = |p: &Path, e: std::io::Error| {
        Failure::new(Code::Error, format!("cannot write {}: {e}", p.display()))
    };
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| fail(&tmp, e))?;
    for (name, text) in RECIPE {
        let p = tmp.join(name);
        std::fs::write(&p, text).map_err(|e| fail(&p, e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another command wrote the same recipe first.
        Err(_) if dir.join("build.sh").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(fail(&dir, e)),
    }
}

/// The cached kernel of `variant`, if it has been built.
fn cached(variant: &str) -> Result<Option<PathBuf>, Failure> {
    let dir = recipe_dir()?;
    let o = Command::new("bash")
        .arg(dir.join("build.sh"))
        .args(["--variant", variant, "--print-path", "--cached-only"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| Failure::new(Code::Error, format!("cannot run bash: {e}")))?;
    match o.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .map(PathBuf::from)
            .filter(|p| p.is_file())),
        Some(NOT_CACHED) => Ok(None),
        _ => Err(Failure::new(
            Code::Error,
            format!(
                "the kernel recipe failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
    }
}

/// The kernel `create` and `run` use when none is named.
pub fn default_kernel() -> Result<PathBuf, Failure> {
    let variant = host_variant();
    cached(variant)?.ok_or_else(|| {
        Failure::new(
            Code::NotFound,
            format!(
                "no guest kernel yet: `microagent kernel build` makes the default one \
                 ({variant}, from Debian's linux-source-6.1, a few minutes), or pass --kernel"
            ),
        )
    })
}

fn list(out: Out) -> Result<(), Failure> {
    let default = cached(host_variant())?;
    let dir = cache_root().join("kernels");
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let vmlinux = e.path().join("vmlinux");
            if !vmlinux.is_file() {
                continue;
            }
            let info = std::fs::read_to_string(e.path().join("build-info")).unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or("-")
                    .to_string()
            };
            let sha = snapshot::digest::sha256_file(&vmlinux)
                .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", vmlinux.display())))?;
            rows.push(json!({
                "path": vmlinux,
                "variant": field("variant"),
                "version": field("kernelrelease"),
                "sha256": sha,
                "built_at": field("built_at"),
                "default": default.as_deref() == Some(vmlinux.as_path()),
            }));
        }
    }
    rows.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let mut human = format!(
        "  {:<12} {:<10} {:<16} PATH",
        "VARIANT", "VERSION", "SHA256"
    );
    for r in &rows {
        human.push_str(&format!(
            "\n{} {:<12} {:<10} {:<16} {}",
            if r["default"] == true { "*" } else { " " },
            r["variant"].as_str().unwrap_or("-"),
            r["version"].as_str().unwrap_or("-"),
            &r["sha256"].as_str().unwrap_or("-")
                [..16.min(r["sha256"].as_str().unwrap_or("-").len())],
            r["path"].as_str().unwrap_or("-"),
        ));
    }
    if default.is_none() {
        human.push_str(&format!(
            "\n(no default kernel for this host yet: `microagent kernel build` makes the {} one)",
            host_variant()
        ));
    }
    out.emit(
        human,
        json!({"kernels": rows, "host_variant": host_variant()}),
    );
    Ok(())
}

fn build(variant: Option<&str>, out: Out) -> Result<(), Failure> {
    let variant = variant.unwrap_or(host_variant());
    let dir = recipe_dir()?;
    // The recipe reports each step on stderr: that is the progress a person sees. With --json
    // stdout carries only the result.
    let o = Command::new("bash")
        .arg(dir.join("build.sh"))
        .args(["--variant", variant, "--print-path"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Failure::new(Code::Error, format!("cannot run bash: {e}")))?;
    if !o.status.success() {
        return Err(Failure::new(
            Code::Error,
            format!("building the {variant} kernel failed (its log is above)"),
        ));
    }
    let path = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let sha = snapshot::digest::sha256_file(Path::new(&path))
        .map_err(|e| Failure::new(Code::Error, format!("{path}: {e}")))?;
    out.emit(
        format!("kernel {variant} ready: {path} (sha256 {sha})"),
        json!({"variant": variant, "path": path, "sha256": sha}),
    );
    Ok(())
}
