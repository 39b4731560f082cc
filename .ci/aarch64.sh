#!/usr/bin/env bash
# The kernels' crate for aarch64, the carts' Arm cores: cross-compiled and its tests run under
# qemu-user, so the NEON micro-kernel and every portable fallback meet the same f64 references
# as the x86 kernels do.
#
# Why a Debian root: the machine's rustup toolchain has no aarch64 standard library and rustup
# cannot download one here, and the host's Debian 12 ships rustc 1.63 (the kernels need 1.89).
# Debian 13 (trixie, a stable suite: its packages change only with point releases) has
# rustc-web 1.96 with the aarch64 standard library as a Multi-Arch package
# (libstd-rust-web-dev:arm64), the aarch64 cross linker and qemu-user; debootstrap puts them in
# a root of their own beside the host, reused by later runs on the same machine.
#
# Setting that root up needs root and Debian's mirror: where either is missing this step says
# so and skips, since what it guards is the code and not the machine. A build or test failure
# fails CI.
#
#   bash .ci/aarch64.sh        # MINISAM_AARCH64_ROOT picks the root's folder
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
root=${MINISAM_AARCH64_ROOT:-/var/tmp/minisam-aarch64-trixie}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log=$(mktemp /tmp/minisam-aarch64.XXXXXX.log)
skip() {
    echo "SKIP aarch64: $* (log: $log)"
    tail -n 5 "$log" 2>/dev/null || true
    exit 0
}

[ "$(id -u)" = 0 ] || skip "needs root for debootstrap, chroot and a bind mount"
if ! command -v debootstrap >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >>"$log" 2>&1 \
        || skip "debootstrap is not installed and apt-get could not install it"
fi

ready=$root/.minisam-toolchain-ready
# A run killed mid-build leaves the repository bind-mounted in the root (once per killed run):
# every such mount goes before anything here deletes, or the delete would reach the repository.
cleanup() {
    local m
    for m in "$root/proc" "$root/src"; do
        while mountpoint -q "$m" 2>/dev/null; do umount "$m" || break; done
    done
}
cleanup
if mountpoint -q "$root/src" 2>/dev/null || mountpoint -q "$root/proc" 2>/dev/null; then
    echo "aarch64: $root/src or $root/proc is still mounted and cannot be unmounted" >&2
    exit 1
fi
if [ ! -f "$ready" ]; then
    rm -rf --one-file-system "$root"
    debootstrap --variant=minbase --include=ca-certificates trixie "$root" "$mirror" >>"$log" 2>&1 \
        || skip "debootstrap of Debian trixie from $mirror failed"
fi
# The host's certificate bundle, which holds any CA of this network's proxy, for apt and cargo.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"

# Only the variables the build needs cross into the root (a proxy, if the host has one).
in_root() {
    chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
        ${no_proxy:+no_proxy=$no_proxy} "$@"
}
if [ ! -f "$ready" ]; then
    in_root bash -c 'export DEBIAN_FRONTEND=noninteractive
        dpkg --add-architecture arm64 && apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends rustc-web cargo-web libstd-rust-web-dev:arm64 \
            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user' >>"$log" 2>&1 \
        || skip "installing the cross toolchain in $root failed"
    touch "$ready"
fi

# The repository is bind-mounted at /src (`--locked` keeps cargo from rewriting Cargo.lock); the
# build goes to the root's own target folder.
mkdir -p "$root/src"
trap cleanup EXIT
mount --bind "$repo" "$root/src"
mount -t proc proc "$root/proc"

in_root bash -c 'rustc --version && qemu-aarch64 --version | head -n 1'
in_root env CARGO_TARGET_DIR=/var/tmp/target \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
    bash -c 'cd /src && cargo test --release --locked -p minisam-kernels --target aarch64-unknown-linux-gnu 2>&1'
# The cart's image builds the engine and the daemon for aarch64 too: x86-only code outside the
# kernels would break that build, so both are type-checked for the target here.
in_root env CARGO_TARGET_DIR=/var/tmp/target \
    bash -c 'cd /src && cargo check --release --locked -p minisam-models -p minisamd --target aarch64-unknown-linux-gnu 2>&1'
