#!/usr/bin/env python3
"""Real DICOM exports through `minisam convert`, against pydicom as the reference decoder.

The files are pydicom's own test data (installed with `pip install pydicom pylibjpeg
pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls`): exports of real scanners and of the toolkits PACS
use (GE CT, MR, ultrasound with 30 YBR_FULL_422 JPEG frames, palette colour, big endian RGB,
dcmtk's and GDCM's JPEG/RLE/JPEG 2000 encoders, RT dose, segmentations). Nothing is committed: the
script reads them from the installed package.

For every file with pixel data: `minisam convert FILE -o OUT.png` (frame 0), then the 8-bit RGB
image the engine should see, computed here from pydicom's pixels with the rules of
trainer/src/dicom.rs (modality LUT; CT/MR file window; 8-bit as stored; else min-max;
MONOCHROME1 inverted; colour wider than 8 bits keeps its top 8 bits). Prints one row per file
(max abs difference for lossless syntaxes, PSNR for lossy ones, or our refusal and pydicom's
verdict) and a summary.

    python3 benches/dicom_real_exports.py [--minisam target/release/minisam]
"""
import argparse, os, subprocess, sys, tempfile, warnings

import numpy as np

# The display rules the engine must follow, shared with the corpus generator.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer", "tests", "data", "dicom"))
from display_rules import minmax_u8, window_u8  # noqa: E402

warnings.simplefilter("ignore")
try:
    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.pixels import apply_color_lut, apply_modality_lut
    from PIL import Image
except ImportError as e:
    print(f"SKIP: {e} (pip install pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls pillow)")
    sys.exit(0)

LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"}


def expected(ds):
    """The engine's RGB image of frame 0, by the rules of trainer/src/dicom.rs."""
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.max() > 255 else 8
        return (arr >> (bits - 8)).astype(np.uint8) if bits > 8 else arr.astype(np.uint8)
    if arr.ndim == 3:
        bits = int(ds.BitsStored)
        return (arr >> (bits - 8)).astype(np.uint8) if bits > 8 else arr.astype(np.uint8)
    x = apply_modality_lut(arr, ds).astype(np.float64)
    has_rescale = "RescaleSlope" in ds and (float(ds.RescaleSlope) != 1 or float(ds.RescaleIntercept) != 0)
    if "WindowCenter" in ds and ds.get("Modality") in ("CT", "MR"):
        c, w = float(np.atleast_1d(ds.WindowCenter)[0]), float(np.atleast_1d(ds.WindowWidth)[0])
        u8 = window_u8(x, c, w)
    elif int(ds.BitsStored) <= 8 and not has_rescale:
        u8 = arr.astype(np.uint8)
    else:
        u8 = minmax_u8(x)
    if photometric == "MONOCHROME1":
        u8 = 255 - u8
    return np.repeat(u8[..., None], 3, axis=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minisam", default="target/release/minisam")
    args = ap.parse_args()
    files = sorted(get_testdata_files("*"), key=os.path.basename)
    rows, out_dir = [], tempfile.mkdtemp()
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "PixelData" not in ds or "TransferSyntaxUID" not in ds.file_meta:
            continue
        ts = ds.file_meta.TransferSyntaxUID
        name = os.path.basename(path)
        try:
            ref, ref_err = expected(ds), None
        except Exception as e:  # pydicom cannot decode it either
            ref, ref_err = None, f"{type(e).__name__}"
        png = os.path.join(out_dir, name + ".png")
        run = subprocess.run([args.minisam, "convert", path, "-o", png], capture_output=True, text=True)
        if run.returncode != 0:
            why = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "?"
            verdict = "refused"
            detail = why.replace(f"reading image {path}: ", "")[:150]
            if ref_err:
                detail += f" [pydicom fails too: {ref_err}]"
        else:
            ours = np.asarray(Image.open(png).convert("RGB"))
            if ref is None:
                verdict, detail = "decoded", f"(pydicom failed: {ref_err})"
            elif ours.shape != ref.shape:
                verdict, detail = "MISMATCH", f"shape {ours.shape} vs {ref.shape}"
            else:
                diff = np.abs(ours.astype(int) - ref.astype(int))
                if str(ts) in LOSSY:
                    mse = (diff.astype(float) ** 2).mean()
                    psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
                    verdict, detail = ("decoded" if psnr >= 40 else "MISMATCH"), f"PSNR {psnr:.1f} dB"
                else:
                    verdict, detail = ("decoded" if diff.max() <= 1 else "MISMATCH"), f"max diff {diff.max()}"
        rows.append((name, ts.name, ds.get("PhotometricInterpretation", "?"), str(ds.get("Modality", "?")), verdict, detail, ref_err))
    print(f"{'file':<42} {'transfer syntax':<44} {'photometric':<14} {'mod':<7} result")
    for r in rows:
        print(f"{r[0]:<42} {r[1][:44]:<44} {r[2]:<14} {r[3]:<7} {r[4]}: {r[5]}")
    n = len(rows)
    ok = sum(r[4] == "decoded" for r in rows)
    bad = sum(r[4] == "MISMATCH" for r in rows)
    ref_ok = sum(r[6] is None for r in rows)
    both = sum(r[4] == "decoded" and r[6] is None for r in rows)
    print(f"\n{n} files with pixel data: {ok} decoded ({both} of the {ref_ok} pydicom decodes), "
          f"{n - ok - bad} refused with a reason, {bad} decoded differently from pydicom")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
