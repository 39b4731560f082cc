#!/usr/bin/env python3
"""Static checks of the files in systemd/ against each other and against the fixed names.

The unit, the D-Bus policy, the activation file, sysusers.d, tmpfiles.d and /etc/default/minisamd
are written by hand in five formats; nothing else notices when one of them drifts (a renamed bus
name, a state directory the tmpfiles entry no longer matches, a flag the daemon dropped). Each
check prints ok/FAIL; the last line is "N passed, N failed"; exit status 1 on any failure.

    python3 systemd/tests/check_files.py [--minisamd PATH]

With --minisamd (a built daemon), every flag in minisamd.default must appear in `minisamd --help`.
"""
import argparse
import configparser
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NAME = "org.minisam.Segmenter1"
USER = "minisam"
# Flags fixed by the cross-helper contract (notes/contracts.md).
CONTRACT_FLAGS = {"--model", "--adapters-dir", "--adapter", "--backend", "--vram-budget", "--threads",
                  "--queue-depth", "--deadline-ms", "--bus", "--max-frame-pixels"}
POLICY_ELEMENTS = {"busconfig", "policy", "allow", "deny"}
POLICY_ATTRS = {"own", "send_destination", "send_interface", "send_member", "send_type",
                "send_requested_reply", "user", "group", "context"}


class Results:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}: {detail}")


def read(rel):
    with open(os.path.join(HERE, rel)) as f:
        return f.read()


def unit_settings(text):
    """[Section] -> {key: [values in order]}; systemd unit syntax, no continuation lines used."""
    out, section = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def table_lines(rel):
    return [l.split() for l in read(rel).splitlines() if l.strip() and not l.lstrip().startswith("#")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minisamd", help="built minisamd binary to check the default flags against")
    a = ap.parse_args()
    r = Results()

    unit = unit_settings(read("minisamd.service"))
    svc = unit["Service"]
    r.check(svc.get("Type") == ["notify-reload"], "unit Type=notify-reload", svc.get("Type"))
    r.check(svc.get("BusName") == [NAME], f"unit BusName={NAME}", svc.get("BusName"))
    r.check(svc.get("User") == [USER] and svc.get("Group") == [USER], "unit runs as static minisam",
            (svc.get("User"), svc.get("Group")))
    r.check("DynamicUser" not in svc, "unit has no DynamicUser (cannot own a bus name)")
    r.check(svc.get("ExecStart") == ["/usr/bin/minisamd $MINISAMD_ARGS"], "unit ExecStart",
            svc.get("ExecStart"))
    r.check(svc.get("EnvironmentFile") == ["-/etc/default/minisamd"], "unit EnvironmentFile",
            svc.get("EnvironmentFile"))
    r.check(svc.get("CapabilityBoundingSet") == [""], "unit drops every capability",
            svc.get("CapabilityBoundingSet"))
    r.check(svc.get("DevicePolicy") == ["closed"], "unit DevicePolicy=closed", svc.get("DevicePolicy"))
    # The daemon's memory holds patients' frames and masks: no core dumps unless a drop-in opts in.
    r.check(svc.get("LimitCORE") == ["0"], "unit LimitCORE=0 (no core dumps of patient data)", svc.get("LimitCORE"))
    r.check(svc.get("RestrictAddressFamilies") == ["AF_UNIX"], "unit AF_UNIX only",
            svc.get("RestrictAddressFamilies"))
    state = " ".join(svc.get("StateDirectory", [])).split()
    cache = " ".join(svc.get("CacheDirectory", [])).split()
    r.check("minisam/adapters" in state, "unit StateDirectory holds the adapters dir", state)
    envs = dict(e.split("=", 1) for e in svc.get("Environment", []))
    caches = [envs.get("MINISAM_PTX_CACHE", ""), envs.get("CUDA_CACHE_PATH", "")]
    r.check(all(c.startswith("/var/cache/" + cache[0] + "/") for c in caches) if cache else False,
            "PTX and CUDA JIT caches live in the unit's CacheDirectory (writable under the sandbox)", caches)

    # Activation file: ini syntax, names must match the unit.
    act = configparser.ConfigParser(interpolation=None)
    act.optionxform = str
    act.read_string(read("org.minisam.Segmenter1.service"))
    sect = act["D-BUS Service"] if act.has_section("D-BUS Service") else {}
    r.check(sect.get("Name") == NAME, "activation Name matches BusName", sect.get("Name"))
    r.check(sect.get("SystemdService") == "minisamd.service", "activation SystemdService",
            sect.get("SystemdService"))
    r.check(sect.get("User") == USER and bool(sect.get("Exec")), "activation User/Exec (system bus needs both)",
            dict(sect))

    # Policy: well-formed, only known elements/attributes, right owner, no rule for another name.
    try:
        root = ET.fromstring(read("org.minisam.Segmenter1.conf"))
        parsed = True
    except ET.ParseError as e:
        root, parsed = None, False
        r.check(False, "policy XML parses", str(e))
    if parsed:
        r.check(root.tag == "busconfig", "policy root element is busconfig", root.tag)
        bad = [(e.tag, sorted(e.attrib)) for e in root.iter()
               if e.tag not in POLICY_ELEMENTS or set(e.attrib) - POLICY_ATTRS]
        r.check(not bad, "policy uses only known elements and attributes", bad)
        owners = [(p.attrib, a.attrib["own"]) for p in root.iter("policy") for a in p
                  if a.tag == "allow" and "own" in a.attrib]
        r.check(owners == [({"user": USER}, NAME)], "only user minisam may own the name", owners)
        dests = {a.attrib.get("send_destination") for a in root.iter() if a.tag in ("allow", "deny")
                 and "own" not in a.attrib}
        r.check(dests == {NAME}, "every send rule names our destination", dests)
        untyped = [a.attrib for p in root.iter("policy") if p.attrib.get("context") != "default"
                   for a in p if a.tag == "allow" and "own" not in a.attrib
                   and "send_interface" not in a.attrib]
        r.check(not untyped, "every allow names an interface (no-interface messages stay denied)", untyped)
        groups = {p.attrib.get("group") for p in root.iter("policy")} - {None}
        r.check(groups == {"minisam-clients", "minisam-admin"}, "policy groups", groups)

    # sysusers.d: the user, its groups, and the two policy groups.
    su = table_lines("sysusers.d/minisam.conf")
    r.check(["u", USER] == su[0][:2] if su else False, "sysusers creates user minisam first", su[:1])
    sg = {l[1] for l in su if l[0] == "g"}
    r.check({"minisam-clients", "minisam-admin"} <= sg, "sysusers creates the policy groups", sg)

    # tmpfiles.d: the same directories as the unit, same owner and mode.
    tf = {l[1]: l for l in table_lines("tmpfiles.d/minisam.conf")}
    mode = (svc.get("StateDirectoryMode") or ["0755"])[0]
    for d in ["/var/lib/" + s for s in state] + ["/var/cache/" + c for c in cache]:
        l = tf.get(d)
        r.check(l is not None and l[0] == "d" and l[2] == mode and l[3:5] == [USER, USER],
                f"tmpfiles {d} matches the unit ({mode} {USER}:{USER})", l)

    # /etc/default/minisamd: one MINISAMD_ARGS line, contract flags only, paths per contract.
    env = {}
    for line in read("minisamd.default").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = shlex.split(v)[0] if v.strip() else ""
    args = shlex.split(env.get("MINISAMD_ARGS", ""))
    flags = [x for x in args if x.startswith("--")]
    r.check(set(env) == {"MINISAMD_ARGS"} and flags, "default file sets MINISAMD_ARGS", env)
    r.check(set(flags) <= CONTRACT_FLAGS, "default flags are contract flags", set(flags) - CONTRACT_FLAGS)
    dirs = [args[i + 1] for i, x in enumerate(args) if x == "--adapters-dir"]
    r.check(dirs[:1] == ["/var/lib/minisam/adapters"] and "/usr/share/minisam/adapters" in dirs,
            "writable adapters dir first, packaged dir after", dirs)
    model = [args[i + 1] for i, x in enumerate(args) if x == "--model"]
    r.check(model == ["/usr/share/minisam/models/default.msam"], "default model path", model)

    if a.minisamd:
        try:
            out = subprocess.run([a.minisamd, "--help"], capture_output=True, text=True, timeout=30)
            text = out.stdout + out.stderr
            missing = [f for f in sorted(set(flags)) if f not in text]
            r.check(out.returncode == 0 and not missing, "minisamd --help knows every default flag",
                    f"rc={out.returncode} missing={missing}")
        except OSError as e:
            r.check(False, "minisamd --help runs", str(e))
    else:
        print("SKIP: no built minisamd given; default flags checked against the contract only")

    print(f"{r.passed} passed, {r.failed} failed")
    sys.exit(1 if r.failed else 0)


if __name__ == "__main__":
    main()
