#!/usr/bin/env bash
# Fails when a rust-vmm crate appears in two versions: their types do not mix across versions.
set -euo pipefail
cd "$(dirname "$0")/.."
dups=$(cargo tree -d --workspace -e normal --depth 0 --prefix none 2>/dev/null \
    | grep -E '^(kvm-ioctls|kvm-bindings|vm-memory|vmm-sys-util|virtio-queue|virtio-bindings|linux-loader|vm-superio|event-manager|vhost|userfaultfd) v' \
    | sort -u || true)
if [[ -n "$dups" ]]; then
    echo "rust-vmm crates present in more than one version:" >&2
    echo "$dups" >&2
    exit 1
fi
echo "ok: one version of each rust-vmm crate"
