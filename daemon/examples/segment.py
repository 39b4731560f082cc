#!/usr/bin/env python3
"""Call minisamd's Segment from Python with a sealed memfd (busctl cannot pass fds).

    pip install jeepney
    python3 daemon/examples/segment.py [--session | --address ADDR] [--pgm FRAME.pgm] --box x0,y0,x1,y1

Without --pgm, a synthetic 320x240 gray8 frame is sent. Prints the predicted IoU, the frame id (for
Reprompt), the adapter and the mask's area; writes the mask to mask.pgm. The memfd dance is the
part every client needs: create with MFD_ALLOW_SEALING, write, seal against write, shrink and grow,
then pass the fd. The daemon refuses an unsealed frame (InvalidFrame).
"""
import argparse
import fcntl
import mmap
import os
import sys

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

NAME = "org.minisam.Segmenter1"
PATH = "/org/minisam/Segmenter1"


def read_pgm(path):
    """Binary PGM (P5, 8-bit): returns (width, height, bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P5" or int(fields[3]) != 255:
        sys.exit(f"{path}: only binary 8-bit PGM (P5, maxval 255) is read here")
    w, h = int(fields[1]), int(fields[2])
    return w, h, data[pos + 1:pos + 1 + w * h]


def sealed_memfd(payload):
    fd = os.memfd_create("frame", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, payload)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--session", action="store_true", help="session bus (default: system bus)")
    ap.add_argument("--address", help="bus address, e.g. unix:path=/tmp/bus (tests)")
    ap.add_argument("--pgm", help="8-bit binary PGM frame")
    ap.add_argument("--box", required=True, help="x0,y0,x1,y1 in pixels")
    args = ap.parse_args()

    if args.pgm:
        w, h, pixels = read_pgm(args.pgm)
    else:
        w, h = 320, 240
        pixels = bytes(((x + y) % 90) if (x - 160) ** 2 + (y - 120) ** 2 > 60 ** 2 else 220
                       for y in range(h) for x in range(w))
    box = tuple(float(v) for v in args.box.split(","))

    bus = args.address or ("SESSION" if args.session else "SYSTEM")
    conn = open_dbus_connection(bus=bus, enable_fds=True)
    frame = sealed_memfd(pixels)
    msg = new_method_call(DBusAddress(PATH, bus_name=NAME, interface=NAME), "Segment",
                          "h(uuus)a(dddd)a(ddu)a{sv}",
                          (frame, (w, h, w, "gray8"), [box], [], {"multimask": ("b", False)}))
    reply = conn.send_and_get_reply(msg, timeout=120)
    os.close(frame)
    if reply.header.message_type.name == "error":
        sys.exit(f"{reply.header.fields.get(4)}: {reply.body[0] if reply.body else ''}")
    masks, iou, frame_id, _model, adapter, timings = reply.body
    with masks.to_file("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        plane = bytes(m[:w * h])
    with open("mask.pgm", "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (w, h) + plane)
    area = sum(1 for v in plane if v)
    print(f"IoU {iou[0]:.3f}, frame_id {frame_id}, adapter {adapter or '(base model)'}, "
          f"{area} px inside, {timings['total_us'] / 1000:.1f} ms in the daemon; mask.pgm written")
    conn.close()


if __name__ == "__main__":
    main()
