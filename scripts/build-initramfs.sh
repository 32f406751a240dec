#!/usr/bin/env bash
# Build an UNCOMPRESSED newc initramfs for microagent Linux guests from busybox-static.
#
#   build-initramfs.sh OUT.cpio [--init FILE] [--add SRC:DEST ...] [--all-applets]
#
# Contents: /bin/busybox with a few applet symlinks (all of them with --all-applets), /dev/console
# (char 5:1), /proc /sys /dev /run /tmp /root, /etc/fstab, and /init. The default /init mounts
# /proc, /sys and /dev (devtmpfs), prints the line
#     MICROAGENT-USERSPACE-OK
# on the console and then `reboot -f` (through the i8042 reset: the VMM exits with status 0).
# If the kernel command line has microagent.run=/PATH, the default /init runs PATH after the marker
# (output to the console), prints "MICROAGENT-RUN-EXIT=<status>" and then reboots.
#
#   --init FILE      use FILE as /init instead (made executable)
#   --add SRC:DEST   copy the file or directory SRC to DEST inside the image (repeatable;
#                    DEST relative to /, parent directories are created, modes are kept)
#   --all-applets    symlink every busybox applet (default: /bin/sh, mount, reboot and a few more;
#                    busybox's sh runs any applet by name without a link)
#
# Uncompressed on purpose: a gzip'ed initramfs costs ~45 s to unpack on our nested KVM.
# The archive is written by this script itself (the newc format is ASCII headers), so no root,
# fakeroot or mknod is needed, every entry is owned by 0:0, and the output is byte-for-byte
# reproducible (mtime = $SOURCE_DATE_EPOCH, default 0). `cpio` is only used, when installed
# (apt-get install cpio), to verify the result.
# Needs: busybox-static (apt-get install busybox-static).
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: build-initramfs.sh OUT.cpio [--init FILE] [--add SRC:DEST ...] [--all-applets]

Writes an uncompressed newc cpio initramfs with busybox-static whose default /init mounts
/proc, /sys and /dev, prints MICROAGENT-USERSPACE-OK and runs `reboot -f`.

  --init FILE      use FILE as /init
  --add SRC:DEST   copy SRC (file or directory) to DEST in the image; repeatable
  --all-applets    link every busybox applet (default: sh, mount, reboot and a few more)
  -h, --help       this text
Environment: BUSYBOX (default: /bin/busybox), SOURCE_DATE_EPOCH (entry mtime, default 0).
EOF
}
die() { printf 'build-initramfs: error: %s\n' "$*" >&2; exit 1; }

OUT=""
INIT=""
ADDS=()
ALL_APPLETS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --init) [ $# -ge 2 ] || { usage; exit 2; }; INIT="$2"; shift 2 ;;
        --init=*) INIT="${1#*=}"; shift ;;
        --add) [ $# -ge 2 ] || { usage; exit 2; }; ADDS+=("$2"); shift 2 ;;
        --add=*) ADDS+=("${1#*=}"); shift ;;
        --all-applets) ALL_APPLETS=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) printf 'build-initramfs: unknown option %s\n' "$1" >&2; usage; exit 2 ;;
        *) [ -z "$OUT" ] || { printf 'build-initramfs: more than one output given\n' >&2; usage; exit 2; }
           OUT="$1"; shift ;;
    esac
done
[ -n "$OUT" ] || { usage; exit 2; }

BUSYBOX="${BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
if command -v file >/dev/null 2>&1 && ! grep -q 'statically linked' <<<"$(file -L "$BUSYBOX")"; then
    die "$BUSYBOX is not statically linked: apt-get install busybox-static"
fi
[ -z "$INIT" ] || [ -f "$INIT" ] || die "--init $INIT: no such file"
MTIME="${SOURCE_DATE_EPOCH:-0}"

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/microagent-initramfs.XXXXXX")"
TMP_OUT=""
cleanup() { rm -rf -- "$STAGE"; [ -z "$TMP_OUT" ] || rm -f -- "$TMP_OUT"; }
trap cleanup EXIT

# ------------------------------------------------------------ staging tree
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,etc}
chmod 1777 "$STAGE/tmp"
chmod 0700 "$STAGE/root"
cp "$BUSYBOX" "$STAGE/bin/busybox"
chmod 0755 "$STAGE/bin/busybox"
# Applet links, so that programs exec'ing /bin/sh, /sbin/reboot, ... work; busybox's sh runs
# its applets without them. Unpacking each entry costs kernel time, which is emulated (slow) on
# our nested KVM, so by default only a few common ones; --all-applets adds all ~270.
if [ "$ALL_APPLETS" = 1 ]; then
    APPLETS="$("$BUSYBOX" --list-full)"
else
    APPLETS="bin/sh bin/ash bin/cat bin/echo bin/ls bin/mkdir bin/mount bin/umount bin/sleep
             bin/dmesg sbin/reboot sbin/poweroff usr/bin/env"
fi
for applet in $APPLETS; do
    case "$applet" in bin/busybox) continue ;; esac
    dir="$(dirname "$applet")"
    case "$dir" in
        .) rel=. ;;
        *) rel="$(printf '%s' "$dir" | sed -e 's|[^/][^/]*|..|g')" ;;
    esac
    mkdir -p "$STAGE/$dir"
    ln -sfn "$rel/bin/busybox" "$STAGE/$applet"
done

cat > "$STAGE/etc/fstab" <<'EOF'
proc      /proc  proc      nosuid,nodev,noexec  0 0
sysfs     /sys   sysfs     nosuid,nodev,noexec  0 0
devtmpfs  /dev   devtmpfs  nosuid,mode=0755     0 0
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$STAGE/etc/passwd"
printf 'root:x:0:\n' > "$STAGE/etc/group"

rm -f "$STAGE/init"
if [ -n "$INIT" ]; then
    cp "$INIT" "$STAGE/init"
else
    cat > "$STAGE/init" <<'EOF'
#!/bin/sh
# microagent default initramfs /init (scripts/build-initramfs.sh).
# On our nested dev/CI KVM every process costs ~1 s: one `mount -a` does all three mounts.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -a
echo MICROAGENT-USERSPACE-OK
read -r cmdline < /proc/cmdline || cmdline=""
for arg in $cmdline; do
    case "$arg" in
        microagent.run=*)
            prog="${arg#microagent.run=}"
            rc=0
            "$prog" || rc=$?
            echo "MICROAGENT-RUN-EXIT=$rc"
            ;;
    esac
done
# The kernel resets through the i8042 (out 0x64,0xfe); the microagent VMM then exits with 0.
exec reboot -f
EOF
fi
chmod 0755 "$STAGE/init"
cmp -s "$BUSYBOX" "$STAGE/bin/busybox" || die "internal: bin/busybox was overwritten while staging"

for spec in "${ADDS[@]+"${ADDS[@]}"}"; do
    case "$spec" in *:*) ;; *) die "--add needs SRC:DEST, got '$spec'" ;; esac
    src="${spec%%:*}"
    dest="${spec#*:}"
    dest="/${dest#/}"
    [ -e "$src" ] || die "--add $spec: $src does not exist"
    case "$dest" in /|*/../*|*/..) die "--add $spec: bad destination '$dest'" ;; esac
    mkdir -p "$STAGE$(dirname "$dest")"
    if [ -d "$src" ]; then
        mkdir -p "$STAGE$dest"
        cp -a --remove-destination "$src/." "$STAGE$dest/"
    else
        rm -rf -- "${STAGE:?}$dest"
        cp -a "$src" "$STAGE$dest"
    fi
done

# ------------------------------------------------------------ newc writer
INO=1
# entry NAME MODE NLINK FILESIZE RDEVMAJOR RDEVMINOR  (header + name, padded to 4)
entry() {
    local name="$1" mode="$2" nlink="$3" size="$4" rmaj="$5" rmin="$6"
    local namesize=$(( ${#name} + 1 ))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$INO" "$mode" 0 0 "$nlink" "$MTIME" "$size" 0 0 "$rmaj" "$rmin" "$namesize" 0
    printf '%s\0' "$name"
    pad $(( (110 + namesize) % 4 ))
    INO=$((INO + 1))
}
pad() { case "$1" in 1) printf '\0\0\0' ;; 2) printf '\0\0' ;; 3) printf '\0' ;; esac; }

write_archive() {
    local type perm size target rel
    # One find for all metadata; sorted by name, so every directory precedes its contents.
    ( cd "$STAGE" && find . -mindepth 1 -printf '%P\t%y\t%m\t%s\t%l\n' | LC_ALL=C sort ) |
    while IFS=$'\t' read -r rel type perm size target; do
        perm=$(( 8#$perm ))
        case "$type" in
            d)  entry "$rel" $((0040000 | perm)) 2 0 0 0 ;;
            f)  entry "$rel" $((0100000 | perm)) 1 "$size" 0 0
                cat -- "$STAGE/$rel"
                pad $(( size % 4 )) ;;
            l)  entry "$rel" $((0120777)) 1 "${#target}" 0 0   # a symlink's data is its target
                printf '%s' "$target"
                pad $(( ${#target} % 4 )) ;;
            *)  die "unsupported file type '$type' in the image: /$rel" ;;
        esac
        if [ "$rel" = dev ]; then
            entry dev/console $((0020600)) 1 0 5 1   # char 5:1, for init before devtmpfs is up
        fi
    done
    INO=0
    entry 'TRAILER!!!' 0 1 0 0 0
}

case "$OUT" in */*) mkdir -p "$(dirname "$OUT")" ;; esac
TMP_OUT="$(dirname "$OUT")/.$(basename "$OUT").tmp.$$"
write_archive > "$TMP_OUT"

if command -v cpio >/dev/null 2>&1; then
    listing="$(cpio -it --quiet < "$TMP_OUT" 2>&1)" || die "cpio cannot read the archive just written: $listing"
    for want in init bin/busybox dev/console; do
        grep -qx -- "$want" <<<"$listing" || die "archive check: $want missing"
    done
else
    printf 'build-initramfs: note: cpio not installed (apt-get install cpio), archive not re-read\n' >&2
fi
mv -f "$TMP_OUT" "$OUT"
TMP_OUT=""
printf 'build-initramfs: wrote %s (%s bytes, uncompressed newc)\n' "$OUT" "$(stat -c %s "$OUT")" >&2
