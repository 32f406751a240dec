#!/usr/bin/env bash
# Writes the golden snapshot of state format VERSION: tests/golden/vVERSION.tar.zst (an exported
# snapshot of a 16 MiB test guest counting on one vCPU) and tests/golden/vVERSION.json (its tag, the
# guest-physical address of the counter and the value captured there). tests/golden.rs restores
# every golden with the current code and checks that the guest continues exactly.
#
# Run it once per format version, with a `microagent` built by the commit that introduced that
# version (BIN, default target/release/microagent), and commit both files. Never regenerate an old
# version's golden with newer code: the point is that the old bytes still load.
#
# The test guest's ELF is kept beside each golden (tests/golden/vVERSION.testguest): a restore
# refuses any other kernel than the one captured, and kernels/testguest keeps changing.
set -euo pipefail
cd "$(dirname "$0")/.."

version=${1:?usage: scripts/make-golden.sh VERSION [BIN]}
bin=$(realpath "${2:-target/release/microagent}")
out=tests/golden
mkdir -p "$out"
# The test guest embedded in BIN, as its build left it beside BIN (builds are reproducible: the
# same source gives the same bytes in any target directory).
guest=$(ls -t "$(dirname "$bin")"/build/testguest-elf-*/out/testguest-target/x86_64-unknown-none/release/testguest 2>/dev/null | head -n1)
[[ -n $guest ]] || { echo "error: no test guest ELF built beside $bin" >&2; exit 1; }
cp "$guest" "$out/v$version.testguest"

home=$(mktemp -d /tmp/microagent-golden.XXXXXX)
cleanup() {
    MICROAGENT_HOME=$home "$bin" halt g >/dev/null 2>&1 || true
    rm -rf "$home"
}
trap cleanup EXIT
ma() { MICROAGENT_HOME=$home "$bin" "$@"; }

ma create g --kernel "$(realpath "$out/v$version.testguest")" --mem 16 --vcpus 1 \
    --cmdline "mode=counter mem=2 tick_ms=5 layout=1" >/dev/null
ma start g >/dev/null
console=$home/workspaces/g/console.log
for _ in $(seq 1 600); do
    if grep -q '^cpu0 count=[1-9][0-9]' "$console" 2>/dev/null; then break; fi
    sleep 0.1
done
grep -q '^cpu0 count=' "$console" || { echo "error: the test guest never counted" >&2; exit 1; }
ma snapshot create g --tag golden >/dev/null
ma halt g >/dev/null

addr_hex=$(sed -n 's/^testguest: layout cpu=0 .*state=0x\([0-9a-fA-F]*\).*/\1/p' "$console" | head -n1)
[[ -n $addr_hex ]] || { echo "error: no layout line on the console" >&2; exit 1; }
addr=$((16#$addr_hex))
count=$(od -A n -t u8 -j "$addr" -N 8 "$home/workspaces/g/snapshots/golden/memory.bin" | tr -d ' ')

rm -f "$out/v$version.tar.zst"
ma snapshot export g golden "$out/v$version.tar.zst" >/dev/null
printf '{"format_version": %s, "tag": "golden", "state_addr": %s, "count": %s}\n' \
    "$version" "$addr" "$count" >"$out/v$version.json"
echo "tests/golden/v$version.tar.zst ($(du -h "$out/v$version.tar.zst" | cut -f1)), counter $count at $addr"
