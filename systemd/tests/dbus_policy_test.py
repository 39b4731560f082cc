#!/usr/bin/env python3
"""Checks systemd/org.minisam.Segmenter1.conf against a real dbus-daemon.

A private dbus-daemon is started with a configuration whose default policy mirrors the upstream
system bus (deny owning names and method calls unless a policy allows them) and which includes
our policy file unchanged. Test users (minisam, a client, an admin, a stranger) exist only in a
private mount namespace, where /etc/passwd and /etc/group are bind-mounted copies with them
appended, so the host's user database is never touched. Each probe runs as one of those users
(setpriv) and either tries to own org.minisam.Segmenter1 or calls a method on it with dbus-send;
the owner is a stand-in that answers every call with an empty reply, so "allowed" means a reply
came back and "denied" means the bus itself answered AccessDenied.

Needs root, unshare, setpriv, dbus-daemon, dbus-send, /usr/bin/python3 (a system interpreter
the test users may execute) and a directory holding the pure-Python `jeepney` package:
    python3 -m pip install --target DIR jeepney==0.9.0
    python3 systemd/tests/dbus_policy_test.py --jeepney DIR
Prints one line per probe and "N passed, N failed"; exits non-zero on any failure. Without root
or the tools it prints "SKIP: <reason>" and exits 0.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

NAME = "org.minisam.Segmenter1"
PATH = "/org/minisam/Segmenter1"
IFACE = "org.minisam.Segmenter1"
POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "org.minisam.Segmenter1.conf")
ACTIVATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "org.minisam.Segmenter1.service")
SYSTEM_PYTHON = "/usr/bin/python3"

# The stand-in service, run as a test user under the system interpreter with jeepney on its path.
OWNER = r'''
import sys
from jeepney import new_method_return, MessageType, HeaderFields
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
addr, name, serve = sys.argv[1], sys.argv[2], sys.argv[3] == "serve"
conn = open_dbus_connection(bus=addr)
reply = conn.send_and_get_reply(message_bus.RequestName(name, 4), timeout=5)  # 4: DO_NOT_QUEUE
if reply.header.message_type == MessageType.error:
    print("DENIED " + reply.header.fields[HeaderFields.error_name], flush=True)
    sys.exit(0)
print("OWNED" if reply.body[0] == 1 else "NOT-OWNED %d" % reply.body[0], flush=True)
while serve:
    msg = conn.receive()
    if msg.header.message_type == MessageType.method_call:
        conn.send(new_method_return(msg))
'''

# Mirrors the upstream system bus default policy; our file is included after it, as system.d is.
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <servicedir>{services}</servicedir>
  <include>{policy}</include>
</busconfig>
"""

# Test identities. uid/gid values are picked free on the host at run time.
USERS = ["minisam", "msclient", "msadmin", "msstranger"]
GROUPS = {"minisam-clients": ["msclient"], "minisam-admin": ["msadmin"]}


def skip(reason):
    print(f"SKIP: D-Bus policy test: {reason}")
    sys.exit(0)


def free_ids(taken, count, start=64100):
    out, n = [], start
    while len(out) < count:
        if n not in taken:
            out.append(n)
        n += 1
    return out


def write_identity_files(tmp):
    """Host passwd/group plus the test users and groups, for bind-mounting in the namespace."""
    with open("/etc/passwd") as f:
        passwd = f.read().rstrip("\n").split("\n")
    with open("/etc/group") as f:
        group = f.read().rstrip("\n").split("\n")
    names_p = {l.split(":")[0] for l in passwd if l}
    names_g = {l.split(":")[0] for l in group if l}
    for n in USERS + list(GROUPS):
        if n in names_p or n in names_g:
            # A real minisam user on this machine (daemon installed): ours would shadow it
            # only inside the namespace, but a duplicate name makes lookups ambiguous.
            passwd = [l for l in passwd if l.split(":")[0] != n]
            group = [l for l in group if l.split(":")[0] != n]
    taken = {int(l.split(":")[2]) for l in passwd + group if l.count(":") >= 3}
    ids = free_ids(taken, len(USERS) + len(GROUPS))
    uid = {}
    for n, i in zip(USERS, ids):
        uid[n] = i
        passwd.append(f"{n}:x:{i}:{i}::/nonexistent:/usr/sbin/nologin")
        group.append(f"{n}:x:{i}:")
    for (g, members), i in zip(GROUPS.items(), ids[len(USERS):]):
        group.append(f"{g}:x:{i}:{','.join(members)}")
    for name, lines in (("passwd", passwd), ("group", group)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(os.path.join(tmp, name), 0o644)
    return uid


def as_user(user, argv):
    if user == "root":
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] + argv


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


def try_own(addr, user, env, serve=False):
    argv = as_user(user, [SYSTEM_PYTHON, "-c", OWNER, addr, NAME, "serve" if serve else "once"])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    if not serve:
        p.wait(timeout=10)
        if not line:
            line = "ERROR " + p.stderr.read().strip()
    return line, p


def call(addr, user, iface, member, args=()):
    argv = as_user(user, ["dbus-send", f"--bus={addr}", "--print-reply", "--reply-timeout=5000",
                          f"--dest={NAME}", PATH, f"{iface}.{member}", *args])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode == 0:
        return "allowed"
    if "org.freedesktop.DBus.Error.AccessDenied" in p.stderr:
        return "denied"
    return "error: " + p.stderr.strip()


def ctl(addr, user, minisamctl, *args):
    """Runs minisamctl as `user`; 'allowed', 'denied' (the bus refused) or 'error: ...'."""
    p = subprocess.run(as_user(user, [minisamctl, "--bus-address", addr, *args]),
                       capture_output=True, text=True, timeout=60)
    if p.returncode == 0:
        return "allowed"
    if "AccessDenied" in p.stdout + p.stderr:
        return "denied"
    return f"error: rc={p.returncode} {(p.stdout + p.stderr).strip()[:300]}"


def real_daemon_probes(addr, r, tmp, minisamd, minisamctl, model):
    """The same policy with the real daemon as owner and the real client as caller."""
    adapters = os.path.join(tmp, "adapters")
    os.mkdir(adapters)
    uid = subprocess.run(["id", "-u", "minisam"], capture_output=True, text=True).stdout.strip()
    os.chown(adapters, int(uid), int(uid))
    log = open(os.path.join(tmp, "minisamd.log"), "w")
    # A notify socket the daemon (user minisam) can write to, and a short watchdog interval: the
    # daemon's watchdog pings only while its Peer.Ping to itself goes through this policy.
    notify_path = os.path.join(tmp, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    os.chmod(notify_path, 0o777)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="400000")
    daemon = subprocess.Popen(as_user("minisam", [minisamd, "--bus-address", addr, "--backend", "cpu",
                                                  "--model", model, "--adapters-dir", adapters]),
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        owned = False
        for _ in range(120):
            q = subprocess.run(["dbus-send", f"--bus={addr}", "--print-reply", "--dest=org.freedesktop.DBus",
                                "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                                "string:" + NAME], capture_output=True, text=True)
            if "boolean true" in q.stdout:
                owned = True
                break
            if daemon.poll() is not None:
                break
            time.sleep(0.5)
        r.check(owned, "real minisamd, run as minisam, owns the name under the policy",
                open(log.name).read()[-2000:])
        if not owned:
            return
        probes = [("msclient", ["status"], "allowed"), ("msclient", ["adapters", "list"], "allowed"),
                  ("msclient", ["adapters", "activate", "none"], "denied"),
                  ("msclient", ["adapters", "rollback"], "denied"),
                  ("msadmin", ["adapters", "activate", "none"], "allowed"),
                  ("msadmin", ["status"], "allowed"),
                  ("root", ["status"], "allowed"),
                  ("msstranger", ["status"], "denied"), ("msstranger", ["adapters", "list"], "denied")]
        for user, args, want in probes:
            got = ctl(addr, user, minisamctl, *args)
            r.check(got == want, f"{user}: minisamctl {' '.join(args)} {want}", got)
        notify.settimeout(0.2)
        pings, t_end = 0, time.time() + 3
        while time.time() < t_end:
            try:
                pings += notify.recv(4096) == b"WATCHDOG=1"
            except socket.timeout:
                pass
        r.check(pings >= 3, "real minisamd's watchdog pings under the policy (its bus probe gets through)",
                f"{pings} WATCHDOG=1 in 3 s with WATCHDOG_USEC=400000\n" + open(log.name).read()[-1500:])
    finally:
        notify.close()
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def inner(tmp, jeepney, policy, real=None):
    subprocess.run(["mount", "--bind", os.path.join(tmp, "passwd"), "/etc/passwd"], check=True)
    subprocess.run(["mount", "--bind", os.path.join(tmp, "group"), "/etc/group"], check=True)
    sock = os.path.join(tmp, "bus")
    conf = os.path.join(tmp, "bus.conf")
    services = os.path.join(tmp, "system-services")
    os.mkdir(services)
    # A system bus only accepts an activation file named after the bus name it declares.
    shutil.copy(ACTIVATION, os.path.join(services, NAME + ".service"))
    with open(conf, "w") as f:
        f.write(BUS_CONF.format(sock=sock, policy=os.path.abspath(policy), services=services))
    os.umask(0)  # the socket must be connectable by the test users
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile",
                            "--print-address=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    addr = bus.stdout.readline().strip()
    if not addr:
        print("FAIL dbus-daemon did not start with the policy included: " + bus.stderr.read())
        print("0 passed, 1 failed")
        return 1
    env = dict(os.environ, PYTHONPATH=jeepney)
    r = Results()
    owner = None
    try:
        names = subprocess.run(["dbus-send", f"--bus={addr}", "--print-reply", "--dest=org.freedesktop.DBus",
                                "/org/freedesktop/DBus", "org.freedesktop.DBus.ListActivatableNames"],
                               capture_output=True, text=True)
        r.check(f'"{NAME}"' in names.stdout, "the bus reads the activation file (name is activatable)",
                names.stdout + names.stderr)
        for user in ("msstranger", "msclient", "msadmin", "root"):
            line, _ = try_own(addr, user, env)
            r.check(line == "DENIED org.freedesktop.DBus.Error.AccessDenied",
                    f"{user} cannot own {NAME}", line)
        line, owner = try_own(addr, "minisam", env, serve=True)
        r.check(line == "OWNED", f"minisam owns {NAME}", line)
        if line != "OWNED":
            raise RuntimeError("no owner, method probes would be meaningless")

        props = "org.freedesktop.DBus.Properties"
        get = ("string:" + IFACE, "string:Backend")
        allowed = {
            "msclient": [(IFACE, "Segment"), (IFACE, "Reprompt"), (IFACE, "OpenStream"),
                         (IFACE, "SegmentSlot"), (IFACE, "CloseStream"), (IFACE, "ListAdapters"),
                         ("org.freedesktop.DBus.Introspectable", "Introspect"),
                         (props, "Get", get), (props, "GetAll", ("string:" + IFACE,)),
                         ("org.freedesktop.DBus.Peer", "Ping")],
            "msadmin": [(IFACE, "InstallAdapter"), (IFACE, "ActivateAdapter"), (IFACE, "RollbackAdapter"),
                        (IFACE, "Segment"), (IFACE, "ListAdapters"),
                        (props, "Set", get + ("variant:string:x",))],
            "root": [(IFACE, "Segment"), (IFACE, "InstallAdapter"), (IFACE, "ActivateAdapter")],
            # The daemon's watchdog probe pings its own name through the bus.
            "minisam": [("org.freedesktop.DBus.Peer", "Ping")],
        }
        denied = {
            "msclient": [(IFACE, "InstallAdapter"), (IFACE, "ActivateAdapter"), (IFACE, "RollbackAdapter"),
                         (IFACE, "SomeFutureMethod"), (props, "Set", get + ("variant:string:x",))],
            "msstranger": [(IFACE, "Segment"), (IFACE, "ListAdapters"), (IFACE, "InstallAdapter"),
                           ("org.freedesktop.DBus.Introspectable", "Introspect"),
                           ("org.freedesktop.DBus.Peer", "Ping")],
            "msadmin": [("org.example.NotOurs", "Anything")],
            "minisam": [(IFACE, "Segment"), (IFACE, "InstallAdapter")],
        }
        for want, table in (("allowed", allowed), ("denied", denied)):
            for user, probes in table.items():
                for iface, member, *rest in probes:
                    got = call(addr, user, iface, member, rest[0] if rest else ())
                    r.check(got == want, f"{user} {iface}.{member} {want}", got)
        owner.kill()
        owner.wait()
        owner = None
        if real:
            real_daemon_probes(addr, r, tmp, *real)
        else:
            print("SKIP: real-daemon probes: no --minisamd/--minisamctl given")
    finally:
        if owner:
            owner.kill()
            owner.wait()
        bus.terminate()
        bus.wait(timeout=10)
    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jeepney", help="directory containing the jeepney package")
    ap.add_argument("--policy", default=POLICY, help="policy file to test (default: ours)")
    ap.add_argument("--minisamd", help="built daemon: also probe the policy with the real daemon and client")
    ap.add_argument("--minisamctl", help="built client (with --minisamd)")
    ap.add_argument("--model", help="packed model for the real daemon (with --minisamd)")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        real = (a.minisamd, a.minisamctl, a.model) if a.minisamd else None
        sys.exit(inner(a.inner, a.jeepney, a.policy, real))
    if os.geteuid() != 0:
        skip("needs root (private mount namespace and setpriv)")
    for tool in ("unshare", "setpriv", "dbus-daemon", "dbus-send", "mount"):
        if not shutil.which(tool):
            skip(f"{tool} not found")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        skip(f"{SYSTEM_PYTHON} not found (the test users need an interpreter they can run)")
    if not a.jeepney or not os.path.isdir(os.path.join(a.jeepney, "jeepney")):
        skip("--jeepney DIR with the jeepney package is required")
    tmp = tempfile.mkdtemp(prefix="minisam-dbus-policy-")
    try:
        os.chmod(tmp, 0o755)
        jeepney = os.path.join(tmp, "pylib")
        shutil.copytree(a.jeepney, jeepney)  # somewhere the test users can read
        for root, dirs, files in os.walk(jeepney):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        write_identity_files(tmp)
        extra = []
        if a.minisamd:
            if not (a.minisamctl and a.model):
                skip("--minisamd needs --minisamctl and --model")
            # Copies the test users can reach whatever the checkout's directory permissions.
            for flag, src in (("--minisamd", a.minisamd), ("--minisamctl", a.minisamctl), ("--model", a.model)):
                dst = os.path.join(tmp, os.path.basename(src))
                shutil.copy2(src, dst)
                os.chmod(dst, 0o755)
                extra += [flag, dst]
        rc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                             sys.executable, os.path.abspath(__file__), "--inner", tmp,
                             "--jeepney", jeepney, "--policy", os.path.abspath(a.policy)] + extra).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
