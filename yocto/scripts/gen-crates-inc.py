#!/usr/bin/env python3
"""Writes meta-minisam's minisamd-crates.inc from the workspace Cargo.lock.

BitBake fetches every crate the build needs before compiling (do_compile runs offline, cargo
--frozen), so the recipe must list each one as crate://crates.io/NAME/VERSION with its sha256.
oe-core's `bitbake -c update_crates minisamd` does the same, but needs a configured build
directory; this script needs only Python 3.11 and the Cargo.lock, so CI can regenerate the file
on every run and fail when the committed one is stale:

    python3 yocto/scripts/gen-crates-inc.py            # rewrite the .inc
    python3 yocto/scripts/gen-crates-inc.py --check    # exit 1 (and say so) if it is stale

Every crates.io package in the lock is listed, not only the daemon's: cargo resolves the whole
workspace even when building one member, and a missing package fails the offline build. A
package from any other source (git, another registry) is an error: the crate fetcher cannot get
it and the recipe would need a hand-written SRC_URI entry.
"""
import argparse
import difflib
import os
import sys
import tomllib

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_LOCK = os.path.join(ROOT, "Cargo.lock")
DEFAULT_OUT = os.path.join(ROOT, "yocto", "meta-minisam", "recipes-minisam", "minisamd",
                           "minisamd-crates.inc")
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


class LockError(Exception):
    pass


def crates(lock):
    """Sorted (name, version, sha256) of the crates.io packages; LockError on anything else."""
    if lock.get("version", 1) < 3:
        raise LockError(f"Cargo.lock version {lock.get('version', 1)}: checksums are only inline "
                        "from version 3; regenerate the lock with a current cargo")
    out, foreign = [], []
    for pkg in lock.get("package", []):
        source = pkg.get("source")
        if source is None:
            continue  # a workspace member (path dependency): built from the source tree
        if source != CRATES_IO:
            foreign.append(f"{pkg['name']} {pkg['version']} ({source})")
            continue
        checksum = pkg.get("checksum")
        if not checksum or len(checksum) != 64:
            raise LockError(f"{pkg['name']} {pkg['version']}: no sha256 checksum in Cargo.lock")
        out.append((pkg["name"], pkg["version"], checksum))
    if foreign:
        raise LockError("packages not from crates.io cannot be fetched as crate:// URLs: "
                        + ", ".join(foreign))
    return sorted(out)


def render(entries):
    lines = [
        "# Generated from the workspace Cargo.lock by yocto/scripts/gen-crates-inc.py: do not edit.",
        "# CI (.ci/yocto.sh) fails when this file no longer matches Cargo.lock.",
        "",
        'SRC_URI += "\\',
    ]
    lines += [f"    crate://crates.io/{name}/{version} \\" for name, version, _ in entries]
    lines += ['"', ""]
    lines += [f'SRC_URI[{name}-{version}.sha256sum] = "{sha}"' for name, version, sha in entries]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lock", default=DEFAULT_LOCK)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    a = ap.parse_args()
    try:
        with open(a.lock, "rb") as f:
            entries = crates(tomllib.load(f))
    except (OSError, tomllib.TOMLDecodeError, LockError, KeyError) as e:
        print(f"gen-crates-inc: {a.lock}: {e}", file=sys.stderr)
        return 2
    text = render(entries)
    if a.check:
        try:
            with open(a.out) as f:
                old = f.read()
        except OSError as e:
            print(f"gen-crates-inc: {e}", file=sys.stderr)
            return 1
        if old == text:
            print(f"{os.path.relpath(a.out, ROOT)}: up to date ({len(entries)} crates)")
            return 0
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), "committed", "from Cargo.lock",
                                    lineterm="", n=0)
        print(f"{os.path.relpath(a.out, ROOT)} is stale: run python3 yocto/scripts/gen-crates-inc.py")
        print("\n".join(list(diff)[:40]))
        return 1
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(a.out, ROOT)} ({len(entries)} crates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
