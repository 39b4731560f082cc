#!/usr/bin/env python3
"""Checks meta-minisam against the repository it ships from, where bitbake is not available.

- every ${S}/<path> a recipe installs exists in the repository (a renamed unit or model would
  otherwise only fail in an integrator's do_install);
- every file:// in a recipe's SRC_URI exists beside it (in files/) and shell ones parse (sh -n);
- SRCREV names a commit of this repository (when the history is available) and the crates.inc
  generated from that commit's Cargo.lock equals the committed one; a mismatch is a warning:
  the release pin lags the working tree until the next release bump.
Prints ok/FAIL/WARN lines and "N passed, N failed"; exit 1 on any FAIL.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
LAYER = os.path.join(ROOT, "yocto", "meta-minisam")
GEN = os.path.join(ROOT, "yocto", "scripts", "gen-crates-inc.py")
CRATES_INC = os.path.join(LAYER, "recipes-minisam", "minisamd", "minisamd-crates.inc")


def main():
    passed = failed = 0

    def check(ok, what, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {what}")
        else:
            failed += 1
            print(f"FAIL {what}: {detail}")

    recipes = sorted(glob.glob(os.path.join(LAYER, "recipes-*", "*", "*.bb")) +
                     glob.glob(os.path.join(LAYER, "recipes-*", "*", "*.inc")) +
                     glob.glob(os.path.join(LAYER, "classes", "*.bbclass")))
    for path in recipes:
        rel = os.path.relpath(path, LAYER)
        text = open(path).read()
        for src in sorted(set(re.findall(r"\$\{S\}/([^\s}\"']+)", text))):
            check(os.path.exists(os.path.join(ROOT, src)), f"{rel}: ${{S}}/{src} exists in the repository")
        for name in sorted(set(re.findall(r"file://([^\s;\"']+)", text))):
            if name.startswith("${"):
                continue  # COMMON_LICENSE_DIR and other bitbake-provided paths
            local = os.path.join(os.path.dirname(path), "files", name)
            check(os.path.exists(local), f"{rel}: file://{name} is in files/")
            if os.path.exists(local) and open(local).readline().startswith("#!/bin/sh"):
                r = subprocess.run(["sh", "-n", local], capture_output=True, text=True)
                check(r.returncode == 0, f"{rel}: files/{name} parses (sh -n)", r.stderr.strip())

    bb = open(os.path.join(LAYER, "recipes-minisam", "minisamd", "minisamd_git.bb")).read()
    cargo_dir = re.search(r'^CARGO_SRC_DIR\s*=\s*"([^"]*)"', bb, re.M)
    manifest = os.path.join(cargo_dir.group(1) if cargo_dir else "", "Cargo.toml")
    check(os.path.exists(os.path.join(ROOT, manifest)), f"minisamd_git.bb: CARGO_SRC_DIR has {manifest}")

    src_inc = open(os.path.join(LAYER, "recipes-minisam", "minisamd", "minisam-source.inc")).read()
    m = re.search(r'^SRCREV\s*=\s*"([0-9a-f]{40})"', src_inc, re.M)
    check(m is not None and m.group(1) != "0" * 40, "minisam-source.inc pins SRCREV to a commit hash",
          m.group(1) if m else "no SRCREV")
    if m:
        rev = m.group(1)
        known = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{rev}^{{commit}}"],
                               capture_output=True).returncode == 0
        if not known:
            print(f"WARN SRCREV {rev} is not in this clone's history (shallow clone?): not compared")
        else:
            has_daemon = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{rev}:{manifest}"],
                                        capture_output=True).returncode == 0
            check(has_daemon, f"SRCREV {rev[:12]} contains {manifest}")
            lock = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:Cargo.lock"], capture_output=True)
            check(lock.returncode == 0, f"SRCREV {rev[:12]} has a Cargo.lock")
            if lock.returncode == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    with open(os.path.join(tmp, "Cargo.lock"), "wb") as f:
                        f.write(lock.stdout)
                    out = os.path.join(tmp, "crates.inc")
                    subprocess.run([sys.executable, GEN, "--lock", f.name, "--out", out],
                                   check=True, capture_output=True)
                    same = open(out).read() == open(CRATES_INC).read()
                if same:
                    print(f"ok   crates.inc matches the Cargo.lock at SRCREV {rev[:12]}")
                else:
                    print(f"WARN crates.inc follows the working tree's Cargo.lock, not SRCREV "
                          f"{rev[:12]}'s: bump SRCREV (and regenerate) at the next release")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
