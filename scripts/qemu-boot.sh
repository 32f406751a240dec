#!/usr/bin/env bash
# Boot a microagent guest kernel under QEMU's microvm machine and time it to a console marker.
# A cross-check for our own VMM (same kernel, same images), not used by it.
#
#   qemu-boot.sh --kernel VMLINUX (--initrd CPIO | --rootfs EXT4) [--smp N] [--mem MiB]
#                [--marker TEXT] [--timeout S] [--runs N] [--append ARGS] [--no-i8042] [--log FILE]
#
# Prints one line per run to stdout:
#   run=1 smp=1 marker_s=18.42 exit_s=18.61 status=ok
# marker_s: seconds from launching QEMU to the marker line on the console; exit_s: to QEMU's exit
# (the guest's `reboot -f` resets through the i8042, which -no-reboot turns into an exit).
# Exits non-zero if a run did not show the marker before the timeout.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: qemu-boot.sh --kernel VMLINUX (--initrd CPIO | --rootfs EXT4) [options]

  --smp N          vCPUs (default 1)
  --mem MiB        guest memory (default 256)
  --marker TEXT    console line to wait for (default MICROAGENT-USERSPACE-OK, or
                   MICROAGENT-ROOTFS-OK with --rootfs)
  --timeout S      per-run limit in seconds (default 180)
  --runs N         boot N times (default 1)
  --append ARGS    extra kernel command line
  --no-i8042       leave out the i8042 (then `reboot -f` falls back to slower reset paths)
  --log FILE       keep the console output of the last run in FILE
EOF
}
die() { printf 'qemu-boot: error: %s\n' "$*" >&2; exit 1; }

KERNEL="" INITRD="" ROOTFS="" SMP=1 MEM=256 MARKER="" TIMEOUT=180 RUNS=1 APPEND="" I8042=1 LOG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KERNEL="$2"; shift 2 ;;
        --initrd) INITRD="$2"; shift 2 ;;
        --rootfs) ROOTFS="$2"; shift 2 ;;
        --smp) SMP="$2"; shift 2 ;;
        --mem) MEM="$2"; shift 2 ;;
        --marker) MARKER="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --append) APPEND="$2"; shift 2 ;;
        --no-i8042) I8042=0; shift ;;
        --log) LOG="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'qemu-boot: unknown argument %s\n' "$1" >&2; usage; exit 2 ;;
    esac
done
[ -n "$KERNEL" ] || { usage; exit 2; }
[ -f "$KERNEL" ] || die "kernel $KERNEL not found"
[ -n "$INITRD$ROOTFS" ] || die "need --initrd or --rootfs"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found: apt-get install qemu-system-x86"
[ -w /dev/kvm ] || die "/dev/kvm is not usable"

args=(-M microvm,acpi=off -enable-kvm -cpu host,-arch-capabilities -m "$MEM" -smp "$SMP"
      -nographic -no-reboot -nodefaults -serial stdio -kernel "$KERNEL")
[ "$I8042" = 1 ] && args+=(-device i8042)
cmdline="console=ttyS0 panic=-1 quiet"
if [ -n "$INITRD" ]; then
    [ -f "$INITRD" ] || die "initrd $INITRD not found"
    args+=(-initrd "$INITRD")
    MARKER="${MARKER:-MICROAGENT-USERSPACE-OK}"
else
    [ -f "$ROOTFS" ] || die "rootfs $ROOTFS not found"
    # virtio-mmio block device; QEMU's microvm adds the virtio_mmio.device= arguments itself.
    args+=(-drive "id=root,file=$ROOTFS,format=raw,if=none,snapshot=on" -device virtio-blk-device,drive=root)
    cmdline="$cmdline root=/dev/vda rw"
    MARKER="${MARKER:-MICROAGENT-ROOTFS-OK}"
fi
[ -z "$APPEND" ] || cmdline="$cmdline $APPEND"
args+=(-append "$cmdline")

failed=0
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
for run in $(seq 1 "$RUNS"); do
    : > "$out"
    t0=$EPOCHREALTIME
    marker_s="" status=timeout
    exec {fd}< <(exec timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 "${args[@]}" </dev/null 2>&1)
    qpid=$!
    while IFS= read -r -u "$fd" line; do
        line="${line%$'\r'}"
        printf '%s\n' "$line" >> "$out"
        if [ -z "$marker_s" ] && [ "$line" = "$MARKER" ]; then
            marker_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
            status=ok
        fi
    done
    exec {fd}<&-
    wait "$qpid" 2>/dev/null || true
    exit_s=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    [ "$status" = ok ] || failed=1
    printf 'run=%s smp=%s marker_s=%s exit_s=%s status=%s\n' "$run" "$SMP" "${marker_s:--}" "$exit_s" "$status"
    [ -z "$LOG" ] || cp "$out" "$LOG"
    if [ "$status" != ok ]; then
        printf 'qemu-boot: no "%s" within %s s; console tail:\n' "$MARKER" "$TIMEOUT" >&2
        tail -n 30 "$out" >&2
    fi
done
exit "$failed"
