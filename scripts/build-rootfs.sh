#!/usr/bin/env bash
# Build a minimal ext4 root filesystem image for microagent Linux guests from busybox-static.
#
#   build-rootfs.sh OUT.ext4 [--size MiB] [--add SRC:DEST ...]
#
# Made with `mkfs.ext4 -d` from a staging directory and fixed up with debugfs: no mount, no
# root, no loop devices. Every file is owned by 0:0; /dev/console (char 5:1) is created.
# /sbin/init (a busybox sh script) mounts /proc, /sys, /dev (devtmpfs, if the kernel has not
# already), /run (tmpfs, 0755), /tmp (tmpfs, 1777: a file a guest writes there and deletes is freed
# memory, zeroed by the kernel's init_on_free, never blocks left in the VM's rootfs copy) and
# /run/secrets (tmpfs, 0700), prints the line
#     MICROAGENT-ROOTFS-OK
# and then:
#   - with microagent.run=/PATH on the kernel command line: runs PATH, prints
#     "MICROAGENT-RUN-EXIT=<status>" and `reboot -f` (the VMM exits with 0);
#   - else, if /usr/sbin/microagent-guest-agent is executable: runs it (restarted if it exits);
#   - else: a shell on the console (restarted if it exits).
# Boot it with e.g. "console=ttyS0 root=/dev/vda rw" (or "ro" to share one image between VMs).
#
#   --size MiB       image size (default 64)
#   --add SRC:DEST   copy the file or directory SRC to DEST inside the image (repeatable)
# Needs: busybox-static, e2fsprogs >= 1.43 (mkfs.ext4 -d, debugfs).
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: build-rootfs.sh OUT.ext4 [--size MiB] [--add SRC:DEST ...]

Writes a minimal busybox-static ext4 rootfs whose /sbin/init mounts /proc /sys /dev /run
/run/secrets, prints MICROAGENT-ROOTFS-OK and starts the guest agent or a shell.

  --size MiB       image size in MiB (default 64)
  --add SRC:DEST   copy SRC (file or directory) to DEST in the image; repeatable
  -h, --help       this text
Environment: BUSYBOX (default: /bin/busybox).
EOF
}
die() { printf 'build-rootfs: error: %s\n' "$*" >&2; exit 1; }

OUT=""
SIZE_MIB=64
ADDS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --size) [ $# -ge 2 ] || { usage; exit 2; }; SIZE_MIB="$2"; shift 2 ;;
        --size=*) SIZE_MIB="${1#*=}"; shift ;;
        --add) [ $# -ge 2 ] || { usage; exit 2; }; ADDS+=("$2"); shift 2 ;;
        --add=*) ADDS+=("${1#*=}"); shift ;;
        -h|--help) usage; exit 0 ;;
        -*) printf 'build-rootfs: unknown option %s\n' "$1" >&2; usage; exit 2 ;;
        *) [ -z "$OUT" ] || { printf 'build-rootfs: more than one output given\n' >&2; usage; exit 2; }
           OUT="$1"; shift ;;
    esac
done
[ -n "$OUT" ] || { usage; exit 2; }
case "$SIZE_MIB" in ''|*[!0-9]*) die "--size needs a whole number of MiB, got '$SIZE_MIB'" ;; esac
[ "$SIZE_MIB" -ge 8 ] || die "--size must be at least 8 MiB"

export PATH="$PATH:/sbin:/usr/sbin"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
if command -v file >/dev/null 2>&1 && ! grep -q 'statically linked' <<<"$(file -L "$BUSYBOX")"; then
    die "$BUSYBOX is not statically linked: apt-get install busybox-static"
fi
command -v mkfs.ext4 >/dev/null 2>&1 || die "mkfs.ext4 not found: apt-get install e2fsprogs"
command -v debugfs >/dev/null 2>&1 || die "debugfs not found: apt-get install e2fsprogs"
mkfs_usage="$(mkfs.ext4 2>&1 || true)"
case "$mkfs_usage" in *"-d root-directory"*) ;; *) die "this mkfs.ext4 has no -d (needs e2fsprogs >= 1.43)" ;; esac

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/microagent-rootfs.XXXXXX")"
TMP_OUT=""
cleanup() { rm -rf -- "$STAGE"; [ -z "$TMP_OUT" ] || rm -f -- "$TMP_OUT"; }
trap cleanup EXIT
ROOT="$STAGE/root"

# ------------------------------------------------------------ staging tree
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,etc,var,mnt}
chmod 0755 "$ROOT"
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
ln -s ../run "$ROOT/var/run"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while IFS= read -r applet; do
    case "$applet" in ''|bin/busybox) continue ;; esac
    dir="$(dirname "$applet")"
    case "$dir" in
        .) rel=. ;;
        *) rel="$(printf '%s' "$dir" | sed -e 's|[^/][^/]*|..|g')" ;;
    esac
    mkdir -p "$ROOT/$dir"
    ln -sfn "$rel/bin/busybox" "$ROOT/$applet"
done

cat > "$ROOT/etc/fstab" <<'EOF'
proc   /proc  proc   nosuid,nodev,noexec          0 0
sysfs  /sys   sysfs  nosuid,nodev,noexec          0 0
tmpfs  /run   tmpfs  nosuid,nodev,mode=0755       0 0
tmpfs  /tmp   tmpfs  nosuid,nodev,mode=1777       0 0
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
printf 'microagent\n' > "$ROOT/etc/hostname"

# sbin/init is also a busybox applet link: replace the link, never write through it.
rm -f "$ROOT/sbin/init"
cat > "$ROOT/sbin/init" <<'EOF'
#!/bin/sh
# microagent rootfs /sbin/init (scripts/build-rootfs.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -a
# The kernel mounts devtmpfs on /dev itself (CONFIG_DEVTMPFS_MOUNT) when it mounts a block root.
[ -e /dev/null ] || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /run/secrets
mount -t tmpfs -o mode=0700,nosuid,nodev,noexec secrets /run/secrets
echo MICROAGENT-ROOTFS-OK

read -r cmdline < /proc/cmdline || cmdline=""
for arg in $cmdline; do
    case "$arg" in
        microagent.run=*)
            prog="${arg#microagent.run=}"
            rc=0
            "$prog" || rc=$?
            echo "MICROAGENT-RUN-EXIT=$rc"
            exec reboot -f
            ;;
    esac
done

agent=/usr/sbin/microagent-guest-agent
if [ -x "$agent" ]; then
    while :; do
        "$agent" || echo "microagent: $agent exited with status $?, restarting" >&2
        sleep 1
    done
fi
while :; do
    sh
done
EOF
chmod 0755 "$ROOT/sbin/init"
cmp -s "$BUSYBOX" "$ROOT/bin/busybox" || die "internal: bin/busybox was overwritten while staging"

for spec in "${ADDS[@]+"${ADDS[@]}"}"; do
    case "$spec" in *:*) ;; *) die "--add needs SRC:DEST, got '$spec'" ;; esac
    src="${spec%%:*}"
    dest="${spec#*:}"
    dest="/${dest#/}"
    [ -e "$src" ] || die "--add $spec: $src does not exist"
    case "$dest" in /|*/../*|*/..) die "--add $spec: bad destination '$dest'" ;; esac
    mkdir -p "$ROOT$(dirname "$dest")"
    if [ -d "$src" ]; then
        mkdir -p "$ROOT$dest"
        cp -R --remove-destination --preserve=mode,timestamps,links "$src/." "$ROOT$dest/"
    else
        rm -rf -- "${ROOT:?}$dest"
        cp -P --preserve=mode,timestamps "$src" "$ROOT$dest"
    fi
done

# ------------------------------------------------------------ image
case "$OUT" in */*) mkdir -p "$(dirname "$OUT")" ;; esac
TMP_OUT="$(dirname "$OUT")/.$(basename "$OUT").tmp.$$"
rm -f -- "$TMP_OUT"
# 4 KiB blocks even for small images (mke2fs would pick 1 KiB), root directory owned by 0:0.
if ! mkfs.ext4 -q -F -b 4096 -L microagent-root -E root_owner=0:0 -d "$ROOT" "$TMP_OUT" "${SIZE_MIB}M" \
        > "$STAGE/mkfs.log" 2>&1; then
    cat "$STAGE/mkfs.log" >&2
    die "mkfs.ext4 failed (too small? try --size)"
fi

# debugfs: every inode owned by 0:0 (mke2fs -d copies the staging owner), and /dev/console.
{
    if [ "$(id -u)" != 0 ] || [ "$(id -g)" != 0 ]; then
        ( cd "$ROOT" && find . -mindepth 1 -printf '%P\n' ) | while IFS= read -r rel; do
            printf 'sif "/%s" uid 0\nsif "/%s" gid 0\n' "$rel" "$rel"
        done
    fi
    printf 'cd /dev\nmknod console c 5 1\nsif console mode 020600\ncd /\n'
} > "$STAGE/debugfs.cmds"
debugfs -w -f "$STAGE/debugfs.cmds" "$TMP_OUT" > "$STAGE/debugfs.log" 2>&1 \
    || { cat "$STAGE/debugfs.log" >&2; die "debugfs fix-up failed"; }
if grep -qi 'error\|not found\|invalid' "$STAGE/debugfs.log"; then
    cat "$STAGE/debugfs.log" >&2
    die "debugfs fix-up reported errors"
fi
e2fsck -fn "$TMP_OUT" > "$STAGE/fsck.log" 2>&1 || { cat "$STAGE/fsck.log" >&2; die "e2fsck found problems in the new image"; }

mv -f "$TMP_OUT" "$OUT"
TMP_OUT=""
printf 'build-rootfs: wrote %s (%s MiB ext4)\n' "$OUT" "$SIZE_MIB" >&2
