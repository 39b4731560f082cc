#!/usr/bin/env python3
"""Writes the tiny evaluation tree used by trainer/tests/eval_report.rs (Python standard library
only; the PNG files are committed, run this only to change them).

Layout as the protocol's: <set>/images/*.png (8-bit grey), <set>/masks/*.png (8-bit label
indices), <set>/labels.json. Two sets: ct-tiny (3 images, labels 1 and 2 in each) and us-tiny
(7 images, one label: more targets than the report's 5 worst, so its bound is exercised).
Images are a gradient with a brighter blob per label and a fixed pseudo-random speckle.
"""
import json
import struct
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def png_grey8(path, width, height, pixels):
    raw = b"".join(b"\x00" + bytes(pixels[y * width:(y + 1) * width]) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def ellipse(cx, cy, rx, ry):
    return lambda x, y: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def write_pair(set_name, name, width, height, shapes, seed):
    labels = [0] * (width * height)
    for label, inside in shapes:
        for y in range(height):
            for x in range(width):
                if inside(x, y):
                    labels[y * width + x] = label
    state = seed
    image = []
    for y in range(height):
        for x in range(width):
            state = (state * 1103515245 + 12345) % (1 << 31)
            speckle = state % 23
            value = 30 + (x + y) + speckle + 70 * labels[y * width + x]
            image.append(min(value, 255))
    png_grey8(HERE / set_name / "images" / name, width, height, image)
    png_grey8(HERE / set_name / "masks" / name, width, height, labels)


for i in range(3):
    write_pair("ct-tiny", f"slice_{i:02}.png", 48, 40,
               [(1, ellipse(14 + i, 20, 8, 10)), (2, ellipse(33, 18 + i, 6 + i, 5))], seed=100 + i)
for i in range(7):
    write_pair("us-tiny", f"frame_{i:02}.png", 40, 32,
               [(1, ellipse(20 + (i % 3) - 1, 16, 9 + i % 4, 7 + i % 3))], seed=200 + i)
(HERE / "ct-tiny" / "labels.json").write_text(json.dumps({"1": "kidney", "2": "tumour"}) + "\n")
(HERE / "us-tiny" / "labels.json").write_text(json.dumps({"1": "head"}) + "\n")
