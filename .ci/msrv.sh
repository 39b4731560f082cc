#!/usr/bin/env bash
# Every package in the workspace's resolved dependency graph (cargo metadata --all-features:
# workspace members and every locked dependency, optional ones such as tract behind feature onnx
# included, for all targets and platforms) must declare a rust-version no newer
# than the Rust of Yocto wrynose, 1.94, which builds the daemon for the cart. A crate that
# declares none is reported but not failed (nothing to compare). Fails naming each offender.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=${MSRV_LIMIT:-1.94}
cargo metadata --format-version 1 --all-features > "${TMPDIR:-/tmp}/minisam-metadata.$$.json"
trap 'rm -f "${TMPDIR:-/tmp}/minisam-metadata.$$.json"' EXIT
python3 - "$LIMIT" "${TMPDIR:-/tmp}/minisam-metadata.$$.json" <<'PY'
import json, sys

def version(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

limit = sys.argv[1]
meta = json.load(open(sys.argv[2]))
members = set(meta["workspace_members"])
too_new, undeclared, checked = [], [], 0
newest = ("", (0, 0, 0))
for pkg in meta["packages"]:
    rv = pkg.get("rust_version")
    where = "workspace" if pkg["id"] in members else "dependency"
    if not rv:
        undeclared.append(f"{pkg['name']} {pkg['version']}")
        continue
    checked += 1
    if version(rv) > newest[1]:
        newest = (f"{pkg['name']} {pkg['version']} ({rv})", version(rv))
    if version(rv) > version(limit):
        too_new.append(f"{pkg['name']} {pkg['version']} ({where}) requires Rust {rv}")
print(f"{len(meta['packages'])} packages, {checked} declare rust-version; newest: {newest[0]}; limit {limit}")
print(f"no rust-version declared ({len(undeclared)}): {', '.join(sorted(undeclared)) or '-'}")
for line in too_new:
    print(f"FAIL {line} > {limit} (Yocto wrynose)")
print(f"msrv: {checked - len(too_new)} passed, {len(too_new)} failed")
sys.exit(1 if too_new else 0)
PY
