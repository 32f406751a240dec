#!/usr/bin/env bash
# The main job: boot the built-in test guest, snapshot it, roll it back and fork it, with a state
# directory of its own (removed at the end). With MICROAGENT_KERNEL (a vmlinux) and
# MICROAGENT_INITRD set, it boots that Linux guest in the foreground instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p microagent
ma=$PWD/target/release/microagent

if [[ -n "${MICROAGENT_KERNEL:-}" ]]; then
    exec "$ma" run --kernel "$MICROAGENT_KERNEL" ${MICROAGENT_INITRD:+--initrd "$MICROAGENT_INITRD"} \
        --vcpus 2 --mem 256 --cmdline "console=ttyS0 panic=-1 quiet"
fi

export MICROAGENT_HOME=${MICROAGENT_HOME:-$(mktemp -d /tmp/microagent-demo.XXXXXX)}
trap 'for w in demo demo-fork-1 demo-fork-2 demo-fork-3; do "$ma" delete "$w" --yes >/dev/null 2>&1 || true; done; rm -rf "$MICROAGENT_HOME"' EXIT
last_count() { "$ma" console "$1" | grep -o "^cpu0 count=[0-9]*" | tail -1 | cut -d= -f2; }
step() { printf '\n== %s\n' "$*"; }

step "create and boot the test guest (2 vCPUs, 256 MiB, each vCPU verifies 32 MiB every round)"
"$ma" create demo --kernel builtin:testguest --vcpus 2 --mem 256 --cmdline "mode=counter mem=32 tick_ms=200"
"$ma" start demo
sleep 2
echo "cpu0 count is $(last_count demo)"

step "snapshot it while it runs"
"$ma" snapshot create demo --tag base
"$ma" snapshot list demo

step "let it run on, then roll it back in place"
sleep 2
echo "cpu0 count before rollback: $(last_count demo)"
"$ma" halt demo
"$ma" start demo --from-snapshot base
sleep 1
echo "cpu0 count after rollback: $(last_count demo) (continues from the snapshot)"

step "fork three warm copies from the snapshot"
time "$ma" create demo-fork --from-snapshot demo:base --count 3
# Each fork faults in the 64 MiB its vCPUs verify on first touch: seconds on nested KVM.
for f in demo-fork-1 demo-fork-2 demo-fork-3; do
    for _ in $(seq 100); do [[ -n "$(last_count "$f")" ]] && break; sleep 0.1; done
done
"$ma" list
for f in demo-fork-1 demo-fork-2 demo-fork-3; do echo "$f: cpu0 count=$(last_count "$f")"; done
step "done (workspaces are deleted on exit)"
