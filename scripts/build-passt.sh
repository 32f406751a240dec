#!/usr/bin/env bash
# Build (or find cached) the passt that `--net user` runs, from a pinned upstream snapshot.
#
#   build-passt.sh [--print-path]
#
# Why not the distribution's: Debian 12's passt (0.0~git20230309) resets every connection a guest
# opens 24 s after its SYN unless the host side has sent data by then (it never takes the
# handshake's ACK as acknowledging its SYN-ACK, so its retransmission count runs out: 10 s SYN
# timeout + 7 x 2 s). A long upload or an API call that answers after 24 s breaks. Newer passt
# (Debian 13's 2025-05-03 snapshot, pinned here) does not.
#
# The source is Debian's copy of the upstream snapshot (the .orig tarball, checked against its
# sha256); plain C, `make passt`, ~30 s. The result is cached at
#   ${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}/passt/<version>/passt
# where `microagent` looks for it first (before passt in PATH; MICROAGENT_PASST overrides both).
# Environment: MICROAGENT_PASST_SOURCE (a local copy of the tarball, for offline hosts).
set -euo pipefail

VERSION=2025_05_03.587980c
TARBALL=passt_0.0~git20250503.587980c.orig.tar.xz
SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
URL="http://deb.debian.org/debian/pool/main/p/passt/${TARBALL//\~/%7e}"

print_path=0
for a in "$@"; do
    case "$a" in
        --print-path) print_path=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "build-passt.sh: unknown argument $a" >&2; exit 2 ;;
    esac
done

CACHE_ROOT="${MICROAGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microagent}"
dest="$CACHE_ROOT/passt/$VERSION"
log() { echo "[passt] $*" >&2; }

if [[ ! -x "$dest/passt" ]]; then
    command -v make >/dev/null && command -v cc >/dev/null || {
        echo "build-passt.sh: needs make and a C compiler (apt-get install build-essential)" >&2
        exit 1
    }
    mkdir -p "$CACHE_ROOT/passt"
    work=$(mktemp -d "$CACHE_ROOT/passt/.build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    if [[ -n "${MICROAGENT_PASST_SOURCE:-}" ]]; then
        cp "$MICROAGENT_PASST_SOURCE" "$work/src.tar.xz"
    else
        log "downloading $URL"
        curl -fsSL --retry 3 -o "$work/src.tar.xz" "$URL"
    fi
    echo "$SHA256  $work/src.tar.xz" | sha256sum -c --quiet - || {
        echo "build-passt.sh: the source tarball does not match its pinned sha256" >&2
        exit 1
    }
    tar -xJf "$work/src.tar.xz" -C "$work"
    log "building passt $VERSION (make passt; ~30 s)"
    make -C "$work"/passt-* -j"$(nproc)" passt VERSION="$VERSION" >"$work/build.log" 2>&1 || {
        tail -20 "$work/build.log" >&2
        exit 1
    }
    mkdir -p "$work/out"
    install -m 0755 "$work"/passt-*/passt "$work/out/passt"
    rm -rf "$dest"
    mv "$work/out" "$dest"
fi
if ((print_path)); then
    echo "$dest/passt"
else
    log "passt $VERSION at $dest/passt"
fi
