#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, unit and end-to-end tests
# (including the Linux-guest boot test with the kernel variant this host can run).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features microagent/test-hooks -- -D warnings
echo "== duplicate rust-vmm crates"
scripts/check-deps.sh

# The Linux end-to-end tests need a guest kernel and initramfs; build (or find cached) ones unless
# the caller points at their own or opts out.
if [[ -z "${MICROAGENT_SKIP_LINUX:-}" && -z "${MICROAGENT_TEST_KERNEL:-}" ]]; then
    variant=production
    if ! grep -qw -e vmx -e svm /proc/cpuinfo; then
        variant=nested-test  # nested page-table KVM: see kernels/linux/README.md
    fi
    echo "== guest kernel ($variant)"
    MICROAGENT_TEST_KERNEL=$(kernels/linux/build.sh --variant "$variant" --print-path)
    export MICROAGENT_TEST_KERNEL
fi
if [[ -z "${MICROAGENT_SKIP_LINUX:-}" && -z "${MICROAGENT_TEST_ROOTFS:-}" ]]; then
    echo "== guest agent (static) and a busybox rootfs with it"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q -p guest-agent --target x86_64-unknown-linux-gnu
    work=$(mktemp -d /tmp/microagent-test.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    strip -o "$work/agent" target/x86_64-unknown-linux-gnu/release/microagent-agent
    scripts/build-rootfs.sh "$work/rootfs.ext4" --size 64 --add "$work/agent:/usr/sbin/microagent-guest-agent" >/dev/null
    MICROAGENT_TEST_ROOTFS=$work/rootfs.ext4
    export MICROAGENT_TEST_ROOTFS
fi

# `--net user` runs a pinned passt build: Debian 12's resets guest connections after 24 s of
# silence from the host (scripts/build-passt.sh says why). Cached after the first build (~30 s).
if [[ -z "${MICROAGENT_PASST:-}" ]]; then
    echo "== passt (pinned build)"
    MICROAGENT_PASST=$(scripts/build-passt.sh --print-path)
    export MICROAGENT_PASST
fi

echo "== cargo test"
cargo test --workspace --release --no-fail-fast --features microagent/test-hooks -- --test-threads=2
