#!/usr/bin/env bash
# CI for systemd/: the unit through `systemd-analyze verify` and `systemd-analyze security`
# (offline, in a throw-away root so nothing on this machine is installed or changed), sysusers.d
# and tmpfiles.d applied to that root, static cross-file checks, and the D-Bus policy against a
# private dbus-daemon.
#
# Type=notify-reload needs systemd >= 253. Debian 12 ships 252, so when the host's
# systemd-analyze is older, systemd 254 from bookworm-backports is downloaded with a private apt
# configuration (the host's sources and package database are untouched) and run from a cache
# directory. Set MINISAM_CI_CACHE to move that cache.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}   # systemd-analyze security "overall exposure", 0.0-10.0
CACHE=${MINISAM_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minisam-ci}
JEEPNEY_VERSION=0.9.0
PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $*"; }

sd_version() { "$@" --version | awk 'NR==1 {print $2}'; }

# Sets SA=(command...) to a systemd-analyze that knows Type=notify-reload.
find_systemd_analyze() {
    if command -v systemd-analyze >/dev/null && [ "$(sd_version systemd-analyze)" -ge 253 ]; then
        SA=(systemd-analyze)
        return
    fi
    local dir="$CACHE/systemd-bpo" apt_opts
    if [ ! -x "$dir/root/usr/bin/systemd-analyze" ]; then
        echo "host systemd-analyze is $(sd_version systemd-analyze 2>/dev/null || echo absent) (< 253):" \
             "fetching systemd from bookworm-backports into $dir"
        rm -rf "$dir"
        mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs"
        echo "deb http://deb.debian.org/debian bookworm-backports main" > "$dir/sources.list"
        apt_opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Debug::NoLocking=1
                  -o APT::Sandbox::User=root)
        apt-get "${apt_opts[@]}" -qq update
        local ver
        ver=$(apt-cache "${apt_opts[@]}" policy systemd | awk '/Candidate:/ {print $2}')
        (cd "$dir/debs" && apt-get "${apt_opts[@]}" -qq download "systemd=$ver" "libsystemd-shared=$ver")
        for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
    fi
    SA=(env "LD_LIBRARY_PATH=$dir/root/usr/lib/x86_64-linux-gnu/systemd" "$dir/root/usr/bin/systemd-analyze")
}

find_systemd_analyze
echo "== systemd-analyze $(sd_version "${SA[@]}")"

# A root laid out like an installed system: the host's stock units (sysinit.target, dbus.socket...
# that the unit's dependencies resolve against), our files where packages install them, and
# /usr/bin/minisamd: the real binary when one was built, else a stand-in (verify only checks that
# ExecStart= names an executable).
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/usr/lib/systemd" "$ROOT/usr/bin" "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" "$ROOT/etc"
for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -d "$d" ]; then cp -a "$d" "$ROOT/usr/lib/systemd/"; break; fi
done
if [ ! -e "$ROOT/usr/lib/systemd/system/dbus.socket" ]; then
    printf '[Socket]\nListenStream=/run/dbus/system_bus_socket\n' > "$ROOT/usr/lib/systemd/system/dbus.socket"
fi
install -m 0644 systemd/minisamd.service "$ROOT/usr/lib/systemd/system/minisamd.service"
install -m 0644 systemd/sysusers.d/minisam.conf "$ROOT/usr/lib/sysusers.d/minisam.conf"
install -m 0644 systemd/tmpfiles.d/minisam.conf "$ROOT/usr/lib/tmpfiles.d/minisam.conf"
MINISAMD=""
for b in target/release/minisamd target/debug/minisamd; do
    if [ -x "$b" ]; then MINISAMD=$b; break; fi
done
if [ -n "$MINISAMD" ]; then
    echo "using built $MINISAMD as /usr/bin/minisamd"
    install -m 0755 "$MINISAMD" "$ROOT/usr/bin/minisamd"
else
    echo "SKIP: no built minisamd; a stand-in /usr/bin/minisamd is used for verify"
    printf '#!/bin/sh\nexit 0\n' > "$ROOT/usr/bin/minisamd"
    chmod 0755 "$ROOT/usr/bin/minisamd"
fi

echo "== systemd-analyze verify"
if out=$("${SA[@]}" verify --root="$ROOT" --man=no --generators=no minisamd.service 2>&1) && [ -z "$out" ]; then
    ok "verify minisamd.service: no warnings"
else
    bad "verify minisamd.service:"; echo "$out"
fi

echo "== systemd-analyze security (offline)"
threshold=$(python3 -c "print(round(float('$MAX_EXPOSURE') * 10))")   # its scale is 0-100
sec=$("${SA[@]}" security --offline=yes --root="$ROOT" --threshold="$threshold" minisamd.service 2>&1) && src=0 || src=$?
echo "$sec" | grep -E '^✗' | sed 's/   */  /g' || true
exposure=$(echo "$sec" | sed -n 's/.*Overall exposure level for minisamd.service: \([0-9.]*\).*/\1/p')
echo "overall exposure: ${exposure:-?} (limit $MAX_EXPOSURE)"
if [ "$src" -eq 0 ] && [ -n "$exposure" ]; then
    ok "security exposure $exposure <= $MAX_EXPOSURE"
else
    bad "security exposure ${exposure:-unknown} > $MAX_EXPOSURE (rc $src)"; echo "$sec" | tail -5
fi

echo "== sysusers.d + tmpfiles.d applied to the test root"
if out=$(systemd-sysusers --root="$ROOT" 2>&1) && out2=$(systemd-tmpfiles --root="$ROOT" --create minisam.conf 2>&1); then
    uid=$(awk -F: '$1=="minisam" {print $3}' "$ROOT/etc/passwd")
    members=$(awk -F: '$1=="video" {print $4}' "$ROOT/etc/group")
    groups_ok=$(awk -F: '$1=="minisam-clients" || $1=="minisam-admin"' "$ROOT/etc/group" | wc -l)
    if [ -n "$uid" ] && [ "$members" = minisam ] && [ "$groups_ok" -eq 2 ]; then
        ok "sysusers: user minisam (uid $uid) in video; groups minisam-clients, minisam-admin"
    else
        bad "sysusers result:"; cat "$ROOT/etc/passwd" "$ROOT/etc/group"
    fi
    for d in var/lib/minisam var/lib/minisam/adapters var/cache/minisam; do
        got=$(stat -c '%u %a' "$ROOT/$d" 2>/dev/null || echo missing)
        if [ "$got" = "$uid 750" ]; then ok "tmpfiles: /$d owned by minisam, 0750"; else bad "tmpfiles: /$d is '$got'"; fi
    done
else
    bad "sysusers/tmpfiles failed:"; echo "$out ${out2:-}"
fi

echo "== static cross-file checks"
if python3 systemd/tests/check_files.py ${MINISAMD:+--minisamd "$MINISAMD"}; then
    ok "check_files.py"
else
    bad "check_files.py"
fi

echo "== D-Bus policy on a private dbus-daemon"
JEEPNEY="$CACHE/jeepney-$JEEPNEY_VERSION"
if [ ! -d "$JEEPNEY/jeepney" ]; then
    python3 -m pip install -q --disable-pip-version-check --target "$JEEPNEY" "jeepney==$JEEPNEY_VERSION"
fi
REAL=()
if [ -n "$MINISAMD" ] && [ -x "$(dirname "$MINISAMD")/minisamctl" ]; then
    # Also the real daemon (as user minisam) and the real client (as each test user).
    REAL=(--minisamd "$MINISAMD" --minisamctl "$(dirname "$MINISAMD")/minisamctl" --model models/litemedsam-nf4.msam)
fi
if python3 systemd/tests/dbus_policy_test.py --jeepney "$JEEPNEY" "${REAL[@]}"; then
    ok "dbus_policy_test.py"
else
    bad "dbus_policy_test.py"
fi

echo "== SystemCallFilter= against the calls the built daemon makes (strace, CPU backend)"
if [ -n "$MINISAMD" ] && [ -x "$(dirname "$MINISAMD")/minisamctl" ] && command -v strace >/dev/null; then
    if python3 systemd/tests/syscall_filter_check.py --systemd-analyze "${SA[*]}" --minisamd "$MINISAMD" \
        --minisamctl "$(dirname "$MINISAMD")/minisamctl" --model models/litemedsam-nf4.msam \
        --image models/samples/us-hc18-000_HC.png --box 330,288,489,467; then
        ok "syscall_filter_check.py"
    else
        bad "syscall_filter_check.py"
    fi
else
    echo "SKIP: syscall filter check: needs a built minisamd + minisamctl and strace"
fi

echo "systemd: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
