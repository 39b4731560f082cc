"""The 8-bit display rules of trainer/src/dicom.rs, written independently in numpy: the
reference both the corpus generator (generate.py) and the real-exports report
(benches/dicom_real_exports.py) compare the engine against."""
import numpy as np


def window_u8(x, c, w):
    """PS3.14's linear VOI window (centre c, width w) to 0..255."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= lo, 0, np.where(x > hi, 255, y))
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def minmax_u8(x):
    """The image's own range stretched to 0..255 (a flat image is black)."""
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.round((x - lo) / (hi - lo) * 255).astype(np.uint8)  # numpy rounds half to even
