#!/usr/bin/env bash
# The main job: boot the embedded test guest on 2 vCPUs and let it count until it resets.
# With MICROAGENT_KERNEL set (a vmlinux) and an initrd in MICROAGENT_INITRD, boots Linux instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p microagent
bin=target/release/microagent

if [[ -n "${MICROAGENT_KERNEL:-}" ]]; then
    exec "$bin" run --kernel "$MICROAGENT_KERNEL" ${MICROAGENT_INITRD:+--initrd "$MICROAGENT_INITRD"} \
        --vcpus 1 --mem 256 --cmdline "console=ttyS0 panic=-1 quiet"
fi

echo "== booting builtin:testguest (2 vCPUs, 256 MiB, 16 MiB verified pattern per vCPU)"
"$bin" run --kernel builtin:testguest --vcpus 2 --mem 256 \
    --cmdline "mode=counter mem=16 count=2000 tick_ms=200"
echo "== guest reset, VM exited 0"
