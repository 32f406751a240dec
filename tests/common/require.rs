//! Skips that CI cannot ignore. A test that needs something this host lacks (KVM, a guest kernel,
//! passt, a tool) prints why and returns; but when `MICROAGENT_REQUIRE` names that need
//! (comma-separated: `kvm`, `linux`, `net`, `tools`, `s3`, `browser`, or `all`), the skip becomes a
//! failure, so a CI machine that lost /dev/kvm or the kernel cannot go green without running those
//! tests.
//! Shared by the end-to-end tests and the vmm crate's tests (included by path).
#![allow(dead_code)]

pub const ENV: &str = "MICROAGENT_REQUIRE";

/// Whether `MICROAGENT_REQUIRE` (in `value`) demands `need`.
pub fn demanded(value: &str, need: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|v| v == need || v == "all")
}

/// Prints that `test` is skipped because of `reason`, or panics when `need` is required.
pub fn skip(test: &str, need: &str, reason: &str) {
    let required = std::env::var(ENV)
        .map(|v| demanded(&v, need))
        .unwrap_or(false);
    if required {
        panic!("{test}: {reason}, but {ENV} requires `{need}`: this test must run here");
    }
    eprintln!("{test}: skipped: {reason}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn requirement_lists() {
        assert!(super::demanded("kvm,linux,net", "linux"));
        assert!(super::demanded(" kvm , net", "net"));
        assert!(super::demanded("all", "tools"));
        assert!(!super::demanded("kvm", "linux"));
        assert!(!super::demanded("", "kvm"));
    }
}
