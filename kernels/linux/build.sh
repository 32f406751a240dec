#!/usr/bin/env bash
# Build (or fetch from the cache) a microagent guest kernel from Debian's linux-source-6.1.
#
#   build.sh [--variant production|nested-test] [--print-path] [--cached-only] [--check-config] [--jobs N]
#
# Variants:
#   production   tinyconfig + microvm.config                                  (SLUB, for hardware KVM)
#   nested-test  tinyconfig + microvm.config + nested-kvm.config, and the source
#                patched with nested-kvm-6.1.patch: TEST-ONLY, for the nested
#                page-table KVM of our dev/CI machines (see docs/PLATFORM.md).
#
# The result is cached at
#   ${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}/kernels/<variant>-<digest>/vmlinux
# where <digest> is a sha256 over this recipe's version, the variant, the Debian
# package version (and size) of the source tarball, the compiler version, the config
# fragments and (nested-test) the patch. A cache hit costs a few milliseconds.
# The extracted (and patched) source trees are cached next to it under kernels/src/.
#
# Output: progress on stderr. With --print-path, stdout gets exactly one line,
# the vmlinux path (after building it if needed).
# --check-config resolves the config only (no compile, no cache entry), prints
# requested-vs-final for every requested option and fails if one did not stick.
#
# Environment: MICROAGENT_CACHE, XDG_CACHE_HOME, MICROAGENT_LINUX_SOURCE (default
# /usr/src/linux-source-6.1.tar.xz).
# Needs: apt-get install linux-source-6.1 build-essential flex bison bc libelf-dev xz-utils
set -euo pipefail

# Bump when this script changes what it produces from the same inputs.
RECIPE_VERSION="microagent-kernel-recipe-1"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC_TARBALL="${MICROAGENT_LINUX_SOURCE:-/usr/src/linux-source-6.1.tar.xz}"
CACHE_ROOT="${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}"
KCACHE="$CACHE_ROOT/kernels"

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") [--variant production|nested-test] [--print-path] [--check-config] [--jobs N]

Builds vmlinux for a microagent guest kernel from Debian's linux-source-6.1 and caches it at
  $KCACHE/<variant>-<digest>/vmlinux

  --variant V      production (default) or nested-test (test-only, patched for nested KVM)
  --print-path     print only the cached vmlinux path on stdout (building it first if needed)
  --cached-only    never build: exit 3 when the kernel is not in the cache
  --check-config   only resolve and check the kernel config, print requested vs final values
  --jobs N         parallel make jobs (default: nproc)
  -h, --help       this text
EOF
}

log() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

VARIANT=production
PRINT_PATH=0
CHECK_ONLY=0
CACHED_ONLY=0
JOBS="$(nproc)"
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) [ $# -ge 2 ] || { usage; exit 2; }; VARIANT="$2"; shift 2 ;;
        --variant=*) VARIANT="${1#*=}"; shift ;;
        --print-path) PRINT_PATH=1; shift ;;
        --check-config) CHECK_ONLY=1; shift ;;
        --cached-only) CACHED_ONLY=1; shift ;;
        --jobs) [ $# -ge 2 ] || { usage; exit 2; }; JOBS="$2"; shift 2 ;;
        --jobs=*) JOBS="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'error: unknown argument: %s\n' "$1" >&2; usage; exit 2 ;;
    esac
done

case "$VARIANT" in
    production)  FRAGMENTS=("$HERE/microvm.config"); PATCHES=() ;;
    nested-test) FRAGMENTS=("$HERE/microvm.config" "$HERE/nested-kvm.config")
                 PATCHES=("$HERE/nested-kvm-6.1.patch") ;;
    *) printf 'error: unknown variant %s\n' "$VARIANT" >&2; usage; exit 2 ;;
esac
case "$JOBS" in ''|*[!0-9]*) die "--jobs needs a number, got '$JOBS'" ;; esac

[ -f "$SRC_TARBALL" ] || die "Linux source tarball $SRC_TARBALL not found.
Install Debian's kernel source:   apt-get install linux-source-6.1
(or point MICROAGENT_LINUX_SOURCE at a linux-source-6.1.tar.xz)"
for f in "${FRAGMENTS[@]}" "${PATCHES[@]}"; do [ -f "$f" ] || die "missing input $f"; done

# ---------------------------------------------------------------- cache key
src_version() {
    # The Debian package version names the exact source; the size guards against a
    # hand-replaced tarball. Without dpkg (or for a foreign tarball) use size + mtime.
    local ver=""
    if [ "$SRC_TARBALL" = /usr/src/linux-source-6.1.tar.xz ] && command -v dpkg-query >/dev/null 2>&1; then
        ver="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true)"
    fi
    [ -n "$ver" ] || ver="mtime-$(stat -c %Y "$SRC_TARBALL")"
    printf '%s-size%s' "$ver" "$(stat -c %s "$SRC_TARBALL")"
}
SRC_VERSION="$(src_version)"
CC_VERSION="$( (gcc --version 2>/dev/null || echo 'no gcc') | head -n1)"

sha256_of_inputs() {
    {
        printf 'recipe %s\nvariant %s\nsource %s\ncc %s\n' "$RECIPE_VERSION" "$VARIANT" "$SRC_VERSION" "$CC_VERSION"
        for f in "${FRAGMENTS[@]}" "${PATCHES[@]}"; do
            printf '== %s\n' "$(basename "$f")"
            cat "$f"
        done
    } | sha256sum | cut -c1-16
}
DIGEST="$(sha256_of_inputs)"
KEY="$VARIANT-$DIGEST"
OUT_DIR="$KCACHE/$KEY"
VMLINUX="$OUT_DIR/vmlinux"

finish() {
    log "vmlinux: $VMLINUX"
    if [ "$PRINT_PATH" = 1 ]; then printf '%s\n' "$VMLINUX"; fi
    exit 0
}

# Fast path: the final directory only ever appears complete (it is renamed into place).
if [ "$CHECK_ONLY" = 0 ] && [ -f "$VMLINUX" ]; then
    finish
fi
if [ "$CACHED_ONLY" = 1 ]; then
    log "not cached: $VMLINUX"
    exit 3
fi

# ---------------------------------------------------------------- tools
missing=()
for t in gcc make flex bison bc perl xz tar patch flock setsid sha256sum; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]}
apt-get install build-essential flex bison bc libelf-dev xz-utils patch util-linux"
[ -f /usr/include/libelf.h ] || log "warning: libelf.h not found (apt-get install libelf-dev); objtool may fail"

mkdir -p "$KCACHE/src" "$KCACHE/.tmp" "$KCACHE/.locks"

TMP_PATHS=()
cleanup() {
    local p
    for p in "${TMP_PATHS[@]+"${TMP_PATHS[@]}"}"; do rm -rf -- "$p"; done
}
trap cleanup EXIT

# Run "$@" in a subshell holding an exclusive lock named $1, so concurrent callers of this
# script never build the same thing twice or see half a tree. The subshell runs in the
# background so that a TERM/INT sent to this script is handled at once and passed on.
CHILD=""
on_signal() {
    trap - INT TERM
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
    log "interrupted; nothing was added to the cache"
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
with_lock() {
    local name="$1" rc=0; shift
    (
        trap - EXIT INT TERM
        flock 9
        "$@"
    ) 9>"$KCACHE/.locks/$name.lock" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# ---------------------------------------------------------------- source trees
SRC_ID="linux-$(printf '%s' "$SRC_VERSION" | tr -c 'A-Za-z0-9.+_-' '_')"
PRISTINE="$KCACHE/src/$SRC_ID"

extract_pristine() {
    [ -f "$PRISTINE/Makefile" ] && return 0
    local tmp="$KCACHE/.tmp/$SRC_ID.extract.$$"
    rm -rf "$KCACHE/.tmp/$SRC_ID".extract.*   # leftovers of killed runs (we hold the lock)
    mkdir -p "$tmp"
    log "extracting $SRC_TARBALL ($SRC_VERSION) into $PRISTINE ..."
    local t0=$SECONDS
    tar -xJf "$SRC_TARBALL" -C "$tmp"
    [ -f "$tmp/linux-source-6.1/Makefile" ] || die "unexpected tarball layout (no linux-source-6.1/Makefile)"
    # Read-only-ish by convention: every build is out of tree (make O=...).
    mv -T "$tmp/linux-source-6.1" "$PRISTINE"
    rm -rf "$tmp"
    log "extracted in $((SECONDS - t0)) s"
}

patch_files() {  # files touched by a -p1 patch
    sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$1"
}

make_patched_tree() {
    [ -f "$SRC_TREE/Makefile" ] && return 0
    local tmp p f
    tmp="$KCACHE/.tmp/$(basename "$SRC_TREE").$$"
    rm -rf "$KCACHE/.tmp/$(basename "$SRC_TREE")".*
    log "creating patched source tree $SRC_TREE (hard links + patch) ..."
    cp -al "$PRISTINE" "$tmp"
    for p in "${PATCHES[@]}"; do
        # Break the hard links of the files the patch touches, so the pristine tree is untouched.
        for f in $(patch_files "$p"); do
            [ -f "$tmp/$f" ] || die "$(basename "$p") touches $f, which is not in the source"
            cp --preserve=mode "$tmp/$f" "$tmp/$f.unlink" && mv -f "$tmp/$f.unlink" "$tmp/$f"
        done
        log "applying $(basename "$p")"
        patch -d "$tmp" -p1 --forward --batch --no-backup-if-mismatch -r - < "$p" >&2 \
            || die "$(basename "$p") does not apply to $SRC_VERSION"
    done
    mv -T "$tmp" "$SRC_TREE"
}

with_lock "src-$SRC_ID" extract_pristine
if [ ${#PATCHES[@]} -gt 0 ]; then
    PATCH_DIGEST="$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)"
    SRC_TREE="$KCACHE/src/$SRC_ID-patched-$PATCH_DIGEST"
    with_lock "src-$SRC_ID-patched-$PATCH_DIGEST" make_patched_tree
else
    SRC_TREE="$PRISTINE"
fi

# ---------------------------------------------------------------- config
# requested_options FRAGMENT... : "CONFIG_X<TAB>value" per option, the last fragment wins;
# "# CONFIG_X is not set" counts as value n.
requested_options() {
    sed -n -e 's/^\(CONFIG_[A-Za-z0-9_]*\)=\(.*\)$/\1\t\2/p' \
           -e 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1\tn/p' "$@" |
        awk -F'\t' '{ if (!($1 in v)) order[n++] = $1; v[$1] = $2 }
                    END { for (i = 0; i < n; i++) print order[i] "\t" v[order[i]] }'
}

# check_config REQUESTED FINAL_CONFIG [verbose]: fail listing every option that did not stick.
check_config() {
    local req="$1" cfg="$2" verbose="${3:-0}" bad=0 sym want have
    while IFS=$'\t' read -r sym want; do
        if grep -q "^$sym=" "$cfg"; then have="$(sed -n "s/^$sym=//p" "$cfg")"; else have=n; fi
        if [ "$want" = "$have" ]; then
            [ "$verbose" = 1 ] && printf '  ok       %-40s %s\n' "$sym" "$have" >&2
        else
            printf '  MISSING  %-40s requested %s, final %s\n' "$sym" "$want" "$have" >&2
            bad=1
        fi
    done < "$req"
    return $bad
}

# configure BUILD_DIR: writes BUILD_DIR/.config from tinyconfig's fragments + ours.
configure() {
    local b="$1" req="$1/microagent-requested.config"
    local base=("$SRC_TREE/kernel/configs/tiny-base.config" "$SRC_TREE/kernel/configs/tiny.config"
                "$SRC_TREE/arch/x86/configs/tiny.config")
    # tinyconfig = allnoconfig + tiny fragments; ours are merged on top of them in one
    # allnoconfig run, so every symbol nobody asked for stays off.
    requested_options "${base[@]}" "${FRAGMENTS[@]}" |
        awk -F'\t' '{ if ($2 == "n") print "# " $1 " is not set"; else print $1 "=" $2 }' > "$b/allconfig"
    requested_options "${FRAGMENTS[@]}" > "$req"
    log "resolving config: tinyconfig + ${FRAGMENTS[*]##*/}"
    make -C "$SRC_TREE" O="$b" ARCH=x86_64 KCONFIG_ALLCONFIG="$b/allconfig" allnoconfig >"$b/config.log" 2>&1 \
        || { cat "$b/config.log" >&2; die "kconfig (allnoconfig) failed"; }
    make -C "$SRC_TREE" O="$b" ARCH=x86_64 olddefconfig >>"$b/config.log" 2>&1 \
        || { cat "$b/config.log" >&2; die "kconfig (olddefconfig) failed"; }
    if ! check_config "$req" "$b/.config" "$CHECK_ONLY"; then
        die "kernel config for $VARIANT is missing requested options (above); fix ${FRAGMENTS[*]##*/}"
    fi
    log "config ok: all $(wc -l < "$req") requested options are in the final .config"
}

if [ "$CHECK_ONLY" = 1 ]; then
    b="$KCACHE/.tmp/check-$KEY.$$"
    TMP_PATHS+=("$b"); mkdir -p "$b"
    configure "$b"
    exit 0
fi

# ---------------------------------------------------------------- build
build_kernel() {
    [ -f "$VMLINUX" ] && return 0     # someone else built it while we waited for the lock
    rm -rf "$KCACHE/.tmp/$KEY".*      # leftovers of interrupted runs (we hold the lock)
    # On failure the build dir is kept for its log; the next run removes it.
    local b="$KCACHE/.tmp/$KEY.build.$$" stage="$KCACHE/.tmp/$KEY.stage.$$"
    mkdir -p "$b" "$stage"
    configure "$b"
    log "building $VARIANT vmlinux with make -j$JOBS (log: $b/build.log; takes a few minutes) ..."
    local t0=$SECONDS
    # make runs in its own session (process group), so that a signal to us can stop all of it.
    local make_pid rc=0
    KBUILD_BUILD_USER=microagent KBUILD_BUILD_HOST=microagent \
        KBUILD_BUILD_TIMESTAMP="microagent $VARIANT $DIGEST" \
        setsid make -C "$SRC_TREE" O="$b" ARCH=x86_64 -j"$JOBS" vmlinux > "$b/build.log" 2>&1 < /dev/null &
    make_pid=$!
    trap 'kill -TERM -- "-$make_pid" "$make_pid" 2>/dev/null || true
          wait "$make_pid" 2>/dev/null || true
          rm -rf "$b" "$stage"; exit 143' TERM INT
    wait "$make_pid" || rc=$?
    trap - TERM INT
    if [ "$rc" != 0 ]; then
        tail -n 40 "$b/build.log" >&2
        die "kernel build failed; full log: $b/build.log"
    fi
    local secs=$((SECONDS - t0))
    log "built in ${secs} s"
    cp "$b/vmlinux" "$stage/vmlinux"
    cp "$b/.config" "$stage/config"
    cp "$b/System.map" "$stage/System.map"
    cp "$b/allconfig" "$stage/requested-allconfig"
    {
        printf 'variant=%s\ndigest=%s\nrecipe=%s\nsource=%s\ntarball=%s\ncc=%s\n' \
            "$VARIANT" "$DIGEST" "$RECIPE_VERSION" "$SRC_VERSION" "$SRC_TARBALL" "$CC_VERSION"
        printf 'kernelrelease=%s\n' "$(make -s -C "$SRC_TREE" O="$b" kernelrelease 2>/dev/null || echo unknown)"
        printf 'fragments=%s\npatches=%s\n' "${FRAGMENTS[*]##*/}" "${PATCHES[*]+${PATCHES[*]##*/}}"
        printf 'build_seconds=%s\njobs=%s\nbuilt_at=%s\n' "$secs" "$JOBS" "$(date -u +%FT%TZ)"
    } > "$stage/build-info"
    sync -f "$stage/vmlinux" 2>/dev/null || sync
    mv -T "$stage" "$OUT_DIR"          # atomic: the entry appears complete or not at all
    rm -rf "$b"
}

with_lock "$KEY" build_kernel
[ -f "$VMLINUX" ] || die "build finished but $VMLINUX is missing"
finish
