#!/usr/bin/env python3
"""Writes the NIfTI test corpus of trainer/tests/nifti_corpus.rs and the values nibabel reads
from it (expected.json), the reference our reader is compared with exactly.

    pip install nibabel   # 5.x, with numpy
    python3 trainer/tests/data/nifti/generate.py

Deterministic (seeded), so a re-run rewrites the same bytes apart from gzip timestamps, which
nibabel leaves at 0 here. Everything is tiny: the whole folder stays well under 200 KiB.

Expected values, all from nibabel (never from our Rust code):
- `values`: `img.get_fdata()` of the 3D volume read (the first of a 4D file, or `frame`),
  flattened in stored (Fortran) order, so voxel [i, j, k] is at i + nx*(j + ny*k).
- `axcodes`: `nibabel.aff2axcodes(img.affine)`.
- `slices`: the displayed slice, from `nibabel.as_closest_canonical` (RAS) then
  `numpy.flip(plane.T, (0, 1))` (anterior/superior at the top, patient's right on the left),
  with the stored index mapped through `io_orientation`; `grey` = that slice as the protocol
  makes it uint8 (uint8 as stored, anything else min-max scaled, numpy rounding half to even),
  `abdomen` = the DICOM linear window 40/400.
- `trees`: each data tree's labelled slices (at least one label with >= 16 pixels) and their
  targets (label, pixel count, tight box x0, y0, x1, y1 in displayed pixels).
Values are chosen so that scaling is exact in float32 and float64 alike (dyadic slopes).
"""
import json
import os
import shutil

import nibabel as nib
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "xyz"
MIN_TARGET_PIXELS = 16


def save(img, rel):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)
    return path


def make(data, affine, *, dtype, slope=None, inter=None, sform=True, qform=True, big_endian=False):
    hdr = nib.Nifti1Header(endianness=">" if big_endian else "<")
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header=hdr)
    img.set_data_dtype(np.dtype(dtype).newbyteorder(">" if big_endian else "<"))
    img.set_sform(affine if sform else None, code=1 if sform else 0)
    img.set_qform(affine if qform else None, code=1 if qform else 0)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    return img


def display_slice(img, axis, index, frame=0):
    """The slice as our reader must lay it out, computed with nibabel's reorientation."""
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim == 4:
        data = data[..., frame]
    scaled = nib.Nifti1Image(data, img.affine)
    ornt = nib.io_orientation(img.affine)
    stored = axis if isinstance(axis, int) else int(np.where(ornt[:, 0] == WORLD.index(axis))[0][0])
    world = int(ornt[stored, 0])
    canon_index = index if ornt[stored, 1] > 0 else data.shape[stored] - 1 - index
    canon = np.asarray(nib.as_closest_canonical(scaled).dataobj)
    plane = np.take(canon, canon_index, axis=world)
    return np.flip(plane.T, (0, 1)), stored, world


def min_max_u8(v):
    lo, hi = v.min(), v.max()
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.round((v - lo) / (hi - lo) * 255.0).astype(np.uint8)


def window_u8(x, c, w):
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                 np.where(x > c - 0.5 + (w - 1) / 2, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0))
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def targets(labels):
    out = []
    for k in sorted(int(v) for v in np.unique(labels) if v > 0):
        ys, xs = np.nonzero(labels == k)
        if len(xs) >= MIN_TARGET_PIXELS:
            out.append([k, int(len(xs)), [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]])
    return out


def volume_entry(path, img, slices, frame=0):
    data = img.get_fdata()
    if data.ndim == 4:
        data = data[..., frame]
    entry = {
        "file": os.path.relpath(path, HERE),
        "frame": frame,
        "shape": list(data.shape),
        "dtype": str(img.get_data_dtype()),
        "axcodes": "".join(nib.aff2axcodes(img.affine)),
        "values": [float(v) for v in data.ravel(order="F")],
        "slices": [],
    }
    slope, inter = img.header.get_slope_inter()
    as_stored = img.get_data_dtype() == np.uint8 and slope in (None, 1.0) and inter in (None, 0.0)
    for axis, index in slices:
        plane, stored, world = display_slice(img, axis, index, frame)
        # The protocol: uint8 as stored, every other type min-max scaled.
        grey = plane.astype(np.uint8) if as_stored else min_max_u8(plane)
        entry["slices"].append({
            "slice": f"{axis}:{index}",
            "stored_axis": stored,
            "width": plane.shape[1],
            "height": plane.shape[0],
            "values": [float(v) for v in plane.ravel()],
            "grey": [int(v) for v in grey.ravel()],
            "abdomen": [int(v) for v in window_u8(plane, 40.0, 400.0).ravel()],
        })
    return entry


def labelled_slices(img, seg, volume_name, axis="z"):
    """Names and targets of the slices that hold a target, in index order."""
    out = []
    ornt = nib.io_orientation(img.affine)
    stored = int(np.where(ornt[:, 0] == WORLD.index(axis))[0][0])
    labels_img = nib.Nifti1Image(np.asarray(seg.get_fdata()), img.affine)
    for index in range(img.shape[stored]):
        plane, _, world = display_slice(labels_img, axis, index)
        t = targets(plane)
        if t:
            out.append({"image": f"{volume_name}@{WORLD[world]}{index:03d}", "targets": t})
    return out


def blob_labels(shape, rng, k_axis):
    """Labels 1 and 2 as boxes in some slices along stored axis k_axis, a 6-pixel speck in one."""
    lab = np.zeros(shape, np.uint8)
    n = shape[k_axis]
    for k in range(1, n - 1):
        sl = [slice(None)] * 3
        sl[k_axis] = k
        plane = lab[tuple(sl)]
        h, w = plane.shape
        y0, x0 = rng.integers(0, h // 3), rng.integers(0, w // 3)
        plane[y0:y0 + h // 2, x0:x0 + w // 3] = 1
        if k % 2 == 0:
            plane[h - 5:h - 1, w - 6:w - 1] = 2
    sl = [slice(None)] * 3
    sl[k_axis] = n - 1
    lab[tuple(sl)][0:2, 0:3] = 1  # 6 px: below the protocol's 16, so this slice is not listed
    return lab


def main():
    rng = np.random.default_rng(20251203)
    for sub in ["volumes", "msd", "kits"]:
        shutil.rmtree(os.path.join(HERE, sub), ignore_errors=True)
    entries = []

    # CT-like int16 with a dyadic slope and an HU offset, stored LPS (as DICOM converters write).
    raw = rng.integers(-200, 3000, size=(6, 5, 4)).astype(np.int16)
    lps = np.diag([-0.75, -0.75, 2.5, 1.0])
    img = make(raw, lps, dtype=np.int16, slope=0.5, inter=-1024.0)
    p = save(img, "volumes/ct_int16_scaled.nii.gz")
    entries.append(volume_entry(p, nib.load(p), [("z", 2), ("x", 0), ("y", 4), (2, 0)]))

    # uint8, uncompressed, orientation from a 30-degree oblique qform only (no sform).
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    oblique = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    img = make(rng.integers(0, 256, size=(5, 4, 3)), oblique, dtype=np.uint8, sform=False)
    p = save(img, "volumes/mr_uint8_qform.nii")
    entries.append(volume_entry(p, nib.load(p), [("z", 1), ("y", 0)]))

    # float32 stored KiTS-like: stored axis 0 runs along -z, axis 2 along -x.
    kits_affine = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])
    f = (rng.integers(-400, 400, size=(3, 4, 6)) / 8.0).astype(np.float32)
    img = make(f, kits_affine, dtype=np.float32)
    p = save(img, "volumes/float32_kits_axes.nii.gz")
    entries.append(volume_entry(p, nib.load(p), [("z", 0), ("z", 2), ("x", 5), (0, 1)]))

    # Big-endian int16, no orientation at all (Analyze default: x flipped).
    img = make(rng.integers(-1000, 1000, size=(4, 3, 2)), np.eye(4), dtype=np.int16, sform=False, qform=False, big_endian=True)
    p = save(img, "volumes/int16_big_endian_no_orientation.nii")
    entries.append(volume_entry(p, nib.load(p), [("z", 1)]))

    # A 4D series of two int16 volumes: `--frame 1` reads the second.
    img = make(rng.integers(0, 500, size=(4, 4, 3, 2)), lps, dtype=np.int16)
    p = save(img, "volumes/series_4d.nii.gz")
    entries.append(volume_entry(p, nib.load(p), [("z", 1)], frame=1))

    trees = {}
    # MSD: imagesTr + labelsTr, a hidden macOS copy that must be ignored, imagesTs without labels.
    msd = []
    for name in ["mini_001.nii.gz", "mini_002.nii.gz"]:
        ct = make(rng.integers(-1024, 1500, size=(24, 20, 6)), lps, dtype=np.int16)
        seg = make(blob_labels((24, 20, 6), rng, 2), lps, dtype=np.uint8)
        save(ct, f"msd/Task99_Mini/imagesTr/{name}")
        save(seg, f"msd/Task99_Mini/labelsTr/{name}")
        msd += labelled_slices(ct, seg, name)
    with open(os.path.join(HERE, "msd/Task99_Mini/imagesTr/._mini_001.nii.gz"), "wb") as fh:
        fh.write(b"\x00\x05\x16\x07 macOS resource fork, not a volume")
    save(make(rng.integers(0, 9, size=(4, 4, 2)), lps, dtype=np.int16), "msd/Task99_Mini/imagesTs/mini_003.nii.gz")
    trees["msd/Task99_Mini"] = msd

    # KiTS: case folders, stored axis 0 = z, float32 labels; case_00002 has no segmentation.
    kits = []
    for case in ["case_00000", "case_00001"]:
        ct = make(rng.integers(-1024, 1500, size=(5, 20, 24)), kits_affine, dtype=np.int16)
        seg = make(blob_labels((5, 20, 24), rng, 0).astype(np.float32), kits_affine, dtype=np.float32)
        save(ct, f"kits/{case}/imaging.nii.gz")
        save(seg, f"kits/{case}/segmentation.nii.gz")
        kits += labelled_slices(ct, seg, case)
    save(make(rng.integers(0, 9, size=(3, 4, 4)), kits_affine, dtype=np.int16), "kits/case_00002/imaging.nii.gz")
    trees["kits"] = kits

    with open(os.path.join(HERE, "expected.json"), "w") as fh:
        json.dump({"generator": f"nibabel {nib.__version__}, numpy {np.__version__}", "volumes": entries, "trees": trees}, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
