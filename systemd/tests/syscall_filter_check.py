#!/usr/bin/env python3
"""Does the unit's SystemCallFilter= allow every system call the daemon actually makes?

The filter is only enforced by systemd, which is not PID 1 in CI, and a missing call would show up
on the cart as EPERM (SystemCallErrorNumber=) deep inside a frame. So: run the built minisamd under
strace on a private session bus through a real workload (start, `minisamctl status`, `adapters
list`, one segmentation of the bundled ultrasound frame, SIGHUP reload, SIGTERM), collect the
names of the calls it made, and check each against the allow list the unit's SystemCallFilter=
lines give, expanded with `systemd-analyze syscall-filter` (allow list first, then the ~ lines
removed, as systemd does). CPU backend only: the CUDA driver's calls need a GPU to observe.

    python3 systemd/tests/syscall_filter_check.py --systemd-analyze CMD... --minisamd BIN \
        --minisamctl BIN --model FILE --image PNG --box x0,y0,x1,y1

Prints ok/FAIL lines and "N passed, N failed"; exit 1 on any failure; SKIP without strace.
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minisamd.service")


def groups(sa):
    """{'@name': [members...]} from `systemd-analyze syscall-filter` (members may be @groups)."""
    out = subprocess.run(sa + ["syscall-filter"], capture_output=True, text=True, check=True).stdout
    table, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            table[current] = []
        elif current and line.startswith("    ") and not line.strip().startswith("#") and line.strip():
            table[current].append(line.strip())
    return table


def expand(name, table, seen=None):
    seen = set() if seen is None else seen
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = set()
    for member in table.get(name, []):
        out |= expand(member, table, seen)
    return out


def allowed_set(table, unit):
    allow, deny = set(), set()
    for line in open(unit):
        m = re.match(r"\s*SystemCallFilter=(.*)", line)
        if not m:
            continue
        value = m.group(1).strip()
        target = allow
        if value.startswith("~"):
            target, value = deny, value[1:]
        for item in value.split():
            target |= expand(item, table)
    return allow - deny


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--systemd-analyze", required=True, help="command line, shell-quoted")
    ap.add_argument("--minisamd", required=True)
    ap.add_argument("--minisamctl", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--box", required=True)
    ap.add_argument("--unit", default=UNIT, help="unit whose SystemCallFilter= is checked (default: ours)")
    a = ap.parse_args()
    if not shutil.which("strace"):
        print("SKIP: syscall filter check: strace not installed")
        return 0
    sa = shlex.split(a.systemd_analyze)
    allowed = allowed_set(groups(sa), a.unit)
    passed = failed = 0

    def check(ok, what, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {what}")
        else:
            failed += 1
            print(f"FAIL {what}: {detail}")

    with tempfile.TemporaryDirectory() as tmp:
        bus = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
                             capture_output=True, text=True, check=True).stdout.split()
        addr, bus_pid = bus[0], int(bus[1])
        trace = os.path.join(tmp, "trace")
        log = open(os.path.join(tmp, "log"), "w")
        adapters = os.path.join(tmp, "adapters")
        os.mkdir(adapters)
        daemon = subprocess.Popen(["strace", "-f", "-qq", "-o", trace, a.minisamd, "--bus-address", addr,
                                   "--backend", "cpu", "--model", a.model, "--adapters-dir", adapters,
                                   # strace and an unoptimised build on a shared CI core are slow
                                   "--deadline-ms", "600000"],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            ctl = [a.minisamctl, "--bus-address", addr]
            up = False
            for _ in range(120):
                if subprocess.run(ctl + ["status"], capture_output=True).returncode == 0:
                    up = True
                    break
                if daemon.poll() is not None:
                    break
                time.sleep(0.5)
            check(up, "minisamd under strace answers status", open(log.name).read()[-1500:])
            if up:
                for args in (["adapters", "list"],
                             ["segment", a.image, "--box", a.box, "-o", os.path.join(tmp, "mask.png")]):
                    p = subprocess.run(ctl + args, capture_output=True, text=True, timeout=300)
                    check(p.returncode == 0, f"minisamctl {args[0]} {args[1] if args[0] == 'adapters' else ''}".strip(),
                          (p.stdout + p.stderr)[-1500:])
                # strace -f: the daemon is strace's child; signal the traced process itself.
                pid = int(subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True,
                                         text=True).stdout.split()[0])
                os.kill(pid, signal.SIGHUP)
                time.sleep(1)
                check(subprocess.run(ctl + ["status"], capture_output=True).returncode == 0,
                      "still serving after SIGHUP (reload)")
                os.kill(pid, signal.SIGTERM)
            daemon.wait(timeout=60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            os.kill(bus_pid, signal.SIGTERM)
            log.close()
        used = set()
        for line in open(trace):
            m = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
            if m:
                used.add(m.group(1))
    missing = sorted(used - allowed)
    print(f"{len(used)} distinct system calls made; {len(allowed)} allowed by the unit's filter")
    check(not missing, "every call the daemon made is allowed by SystemCallFilter=", missing)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
