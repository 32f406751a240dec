#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers of hostile input (see README.md, Fuzzing):
#   scripts/fuzz.sh [TARGET] [SECONDS]
# runs TARGET (or every target of vmm/fuzz, snapshot/fuzz and guest-agent/fuzz, one after the
# other) for SECONDS each (default 60). Exits non-zero on the first crash; libFuzzer writes the
# input to <crate>/fuzz/artifacts/<target>/. Not part of scripts/test.sh: it needs cargo-fuzz and
# minutes per target.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-all}
seconds=${2:-60}
if [[ "$target" =~ ^[0-9]+$ && $# -eq 1 ]]; then
    target=all
    seconds=$1
fi
crates=(vmm snapshot guest-agent)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
# cargo fuzz passes -Z flags (sanitizers, coverage); stable rustc accepts them with this set.
export RUSTC_BOOTSTRAP=1

targets_of() {
    (cd "$1" && cargo fuzz list)
}

run() {
    local crate=$1 t=$2
    echo "== $crate: $t for ${seconds}s"
    (cd "$crate" && cargo fuzz run "$t" -- -max_total_time="$seconds")
}

found=0
for crate in "${crates[@]}"; do
    for t in $(targets_of "$crate"); do
        if [[ "$target" == all || "$target" == "$t" ]]; then
            found=1
            run "$crate" "$t"
        fi
    done
done
if [[ $found == 0 ]]; then
    echo "no fuzz target named $target; there are:" >&2
    for crate in "${crates[@]}"; do
        targets_of "$crate" | sed "s|^|  $crate: |" >&2
    done
    exit 2
fi
