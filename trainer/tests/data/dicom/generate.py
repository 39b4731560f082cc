#!/usr/bin/env python3
"""Builds the small DICOM test corpus and the reference decoder's pixels beside it.

Run from this directory with pydicom >= 3 (plus pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg,
pyjpegls, Pillow and imagecodecs for the compressed files):  python3 generate.py
(imagecodecs' libjpeg-turbo writes the lossless and 12-bit JPEGs pydicom cannot encode; pydicom
decodes them through pylibjpeg-libjpeg, the reference.)
Each `NAME.dcm` gets `NAME.ref`: the samples pydicom decodes for the frame listed in
manifest.json (int32 little endian, row-major, interleaved RGB, YBR already converted to RGB,
palettes applied), and, for grey images, `NAME.u8`: the 8-bit image the engine should see,
computed here from pydicom's rescaled values with the rules of trainer/src/dicom.rs (an
independent numpy implementation of them). The Rust test (trainer/tests/dicom_corpus.rs)
compares both.
"""
import io, json
import numpy as np
from display_rules import minmax_u8, window_u8
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                         DeflatedExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit,
                         JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless,
                         JPEGExtended12Bit, generate_uid)

rng = np.random.default_rng(15)
W, H = 48, 32  # not square, to catch transposed reads; J2K needs sides >= 32
manifest = []


def base(photometric, bits, spp=1, signed=False, frames=1, modality="OT", stored=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = H, W
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if spp > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def smooth(shape, lo, hi, dtype):
    """A gradient plus noise: compressible, and every value range exercised."""
    y, x = np.mgrid[0:H, 0:W]
    g = (x / (W - 1) + y / (H - 1)) / 2
    if shape == (H, W, 3):
        g = g[..., None] * np.array([0.6, 0.8, 1.0])
    elif len(shape) == 3:  # frames
        g = g[None] * np.linspace(0.8, 1.0, shape[0])[:, None, None]
    v = lo + g * (hi - lo) + rng.normal(0, (hi - lo) * 0.02, shape)
    return np.clip(np.round(v), lo, hi).astype(dtype)


def save(name, ds, ts, frame=0, lossy=False, note="", error=None):
    ds.file_meta.TransferSyntaxUID = ts
    path = f"{name}.dcm"
    if ts == ExplicitVRBigEndian:
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    entry = dict(file=path, transfer_syntax=str(ts), name=ts.name, photometric=ds.PhotometricInterpretation,
                 frame=frame, lossy=lossy, note=note)
    if error:
        entry["error"] = error
        manifest.append(entry)
        return
    rd = pydicom.dcmread(path)
    arr = rd.pixel_array  # pydicom converts YBR to RGB by default
    if int(getattr(rd, "NumberOfFrames", 1)) > 1:
        arr = arr[frame]
    if rd.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, rd)
    arr.astype("<i4").tofile(f"{name}.ref")
    entry.update(width=W, height=H, channels=1 if arr.ndim == 2 else 3)
    if arr.ndim == 2:
        x = apply_modality_lut(arr, rd).astype(np.float64)
        has_rescale = "RescaleSlope" in rd and (float(rd.RescaleSlope) != 1 or float(rd.RescaleIntercept) != 0)
        if "WindowCenter" in rd and rd.Modality in ("CT", "MR"):
            c, w = float(np.atleast_1d(rd.WindowCenter)[0]), float(np.atleast_1d(rd.WindowWidth)[0])
            u8 = window_u8(x, c, w)
            entry["rule"] = f"file window {c},{w}"
        elif rd.BitsStored <= 8 and not has_rescale:
            u8 = arr.astype(np.uint8)
            entry["rule"] = "8-bit as stored"
        else:
            u8 = minmax_u8(x)
            entry["rule"] = "min-max after rescale"
        if rd.PhotometricInterpretation == "MONOCHROME1":
            u8 = 255 - u8
        u8.tofile(f"{name}.u8")
        # A preset overriding the file: abdomen = 40,400.
        if rd.Modality == "CT":
            window_u8(x, 40, 400).tofile(f"{name}.abdomen.u8")
            entry["abdomen"] = f"{name}.abdomen.u8"
    manifest.append(entry)


# --- grey, native ---------------------------------------------------------------------------
ct = smooth((H, W), 0, 2500, np.uint16)
ds = base("MONOCHROME2", 16, modality="CT", stored=12)
ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
ds.WindowCenter, ds.WindowWidth = 40, 400
ds.PixelData = ct.tobytes()
save("ct_explicit_le", ds, ExplicitVRLittleEndian, note="CT, rescale -1024, file window 40/400")

ds = base("MONOCHROME2", 16, modality="CT", stored=12)
ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
ds.PixelData = ct.byteswap().tobytes()
save("ct_explicit_be", ds, ExplicitVRBigEndian, note="big endian; two windows, first used")

mr = smooth((H, W), -300, 900, np.int16)
ds = base("MONOCHROME2", 16, signed=True, modality="MR")
ds.RescaleSlope, ds.RescaleIntercept = 2.5, 10
ds.PixelData = mr.tobytes()
save("mr_signed_implicit", ds, ImplicitVRLittleEndian, note="signed, slope 2.5, no window: min-max")

g8 = smooth((H, W), 0, 255, np.uint8)
ds = base("MONOCHROME1", 8, modality="CR")
ds.PixelData = g8.tobytes()
save("mono1_8bit_deflate", ds, DeflatedExplicitVRLittleEndian, note="MONOCHROME1 inverted; deflated")

frames = smooth((3, H, W), 0, 4000, np.uint16)
ds = base("MONOCHROME2", 16, frames=3, modality="CT")
ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
ds.WindowCenter, ds.WindowWidth = 300, 1500
ds.PixelData = frames.tobytes()
save("ct_multiframe_native", ds, ExplicitVRLittleEndian, frame=2, note="3 frames, frame 2 read")

# --- colour, native ---------------------------------------------------------------------------
rgb = smooth((H, W, 3), 0, 255, np.uint8)
ds = base("RGB", 8, spp=3)
ds.PixelData = rgb.tobytes()
save("rgb_interleaved", ds, ExplicitVRLittleEndian)

ds = base("RGB", 8, spp=3)
ds.PlanarConfiguration = 1
ds.PixelData = rgb.transpose(2, 0, 1).tobytes()
save("rgb_planar", ds, ExplicitVRLittleEndian, note="planar configuration 1")

ybr = smooth((H, W, 3), 16, 240, np.uint8)
ds = base("YBR_FULL", 8, spp=3)
ds.PixelData = ybr.tobytes()
save("ybr_full_native", ds, ExplicitVRLittleEndian)

sub = np.empty((H, W // 2, 4), np.uint8)
sub[..., 0], sub[..., 1] = ybr[:, 0::2, 0], ybr[:, 1::2, 0]
sub[..., 2], sub[..., 3] = ybr[:, 0::2, 1], ybr[:, 0::2, 2]
ds = base("YBR_FULL_422", 8, spp=3)
ds.PixelData = sub.tobytes()
save("ybr_full_422_native", ds, ExplicitVRLittleEndian, note="Y1 Y2 Cb Cr per pixel pair")

idx = smooth((H, W), 0, 255, np.uint8)
ds = base("PALETTE COLOR", 8)
for c, curve in zip("Red Green Blue".split(), [lambda i: i * 257, lambda i: (255 - i) * 257, lambda i: (i * 3 % 256) * 257]):
    setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
    lut = np.array([curve(i) for i in range(256)], np.uint16)
    setattr(ds, f"{c}PaletteColorLookupTableData", lut.tobytes())
ds.PixelData = idx.tobytes()
save("palette_8bit", ds, ExplicitVRLittleEndian, note="16-bit palette entries")

# --- encapsulated -----------------------------------------------------------------------------
ds = base("MONOCHROME2", 16, frames=3, modality="CT")
ds.RescaleSlope, ds.RescaleIntercept = 1, -1000
ds.WindowCenter, ds.WindowWidth = 300, 1500
ds.compress(RLELossless, frames, generate_instance_uid=False)
save("ct_multiframe_rle", ds, RLELossless, frame=1, note="3 frames, frame 1 read")

ds = base("RGB", 8, spp=3)
ds.compress(RLELossless, rgb, generate_instance_uid=False)
save("rgb_rle", ds, RLELossless)

ds = base("YBR_FULL", 8, spp=3)
ds.compress(RLELossless, ybr, generate_instance_uid=False)
save("ybr_full_rle", ds, RLELossless)

try:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=95, subsampling=1)
    ds = base("YBR_FULL_422", 8, spp=3)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    save("rgb_jpeg_baseline", ds, JPEGBaseline8Bit, lossy=True, note="Pillow, quality 95, 4:2:2")
    buf = io.BytesIO()
    Image.fromarray(g8, "L").save(buf, "JPEG", quality=95)
    ds = base("MONOCHROME2", 8)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    save("grey_jpeg_baseline", ds, JPEGBaseline8Bit, lossy=True, note="Pillow, quality 95")
except ImportError as e:
    print("SKIP JPEG baseline:", e)

try:
    ds = base("MONOCHROME2", 16, modality="CT", stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.compress(JPEG2000Lossless, ct, generate_instance_uid=False)
    save("ct_j2k_lossless", ds, JPEG2000Lossless)
    ds = base("RGB", 8, spp=3)
    ds.compress(JPEG2000Lossless, rgb, generate_instance_uid=False)
    save("rgb_j2k_lossless", ds, JPEG2000Lossless, note="stored as YBR_RCT by the encoder if it says so")
    ds = base("MONOCHROME2", 8)
    ds.compress(JPEG2000, g8, j2k_cr=[10], generate_instance_uid=False)
    save("grey_j2k_lossy", ds, JPEG2000, lossy=True, note="compression ratio 10")
except Exception as e:  # encoder plugin missing
    print("SKIP JPEG 2000:", e)

try:
    ds = base("MONOCHROME2", 16, modality="CT", stored=12)
    ds.compress(JPEGLSLossless, ct, generate_instance_uid=False)
    save("ct_jpegls", ds, JPEGLSLossless, error="JPEG-LS")
except Exception as e:
    print("SKIP JPEG-LS:", e)

try:
    import imagecodecs

    def jpeg_file(name, ts, data, **kw):
        ds = base("MONOCHROME2", 16, modality="CT", stored=12)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(data, bitspersample=12, **kw)])
        ds["PixelData"].VR = "OB"
        return ds

    # Process 14: predictor 1 (SV1, what most scanners write) and predictor 6 (the general UID).
    save("ct_jpeg_lossless_sv1", jpeg_file("sv1", JPEGLosslessSV1, ct, lossless=True, predictor=1),
         JPEGLosslessSV1, note="12-bit CT, libjpeg-turbo, predictor 1")
    save("ct_jpeg_lossless_p6", jpeg_file("p6", JPEGLossless, ct, lossless=True, predictor=6),
         JPEGLossless, note="12-bit CT, libjpeg-turbo, predictor 6")
    # Process 4: 12-bit lossy DCT. jpeg-decoder (dicom-pixeldata's codec) has no 12-bit DCT path:
    # refused by name, never approximated.
    ds = jpeg_file("ext", JPEGExtended12Bit, ct, level=95)
    ds.LossyImageCompression = "01"
    save("ct_jpeg_extended_12bit", ds, JPEGExtended12Bit, lossy=True, note="12-bit DCT, libjpeg-turbo quality 95",
         error="SamplePrecision(12)")
except ImportError as e:
    print("SKIP JPEG lossless/extended:", e)

# RT dose as treatment-planning systems export it: 32-bit samples in explicit big endian. dicom-rs
# hands such pixel data over as native 16-bit words, so each 32-bit sample's halves must be put
# back in order.
dose = smooth((H, W), 0, 3_000_000, np.uint32)
ds = base("MONOCHROME2", 32, modality="RTDOSE")
ds.PixelData = dose.byteswap().tobytes()
save("dose_32bit_explicit_be", ds, ExplicitVRBigEndian, note="RT-dose-like 32-bit, big endian")

# An RGB JPEG without a JFIF/Adobe marker (pydicom's SC_jpeg_no_color_transform) is decoded
# without a colour transform (dicom.rs); it is checked on the real file by
# benches/dicom_real_exports.py, not here: a synthetic one rewritten from libjpeg-turbo's output
# did not decode the same in jpeg-decoder and the reference, for reasons not yet understood.

with open("manifest.json", "w") as f:
    json.dump(manifest, f, indent=1)
print(len(manifest), "files")
