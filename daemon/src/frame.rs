//! Frame layouts as clients describe them, checked before anything is mapped, and the one
//! conversion from a client's pixels to the engine's 3-channel uint8 image.

use minisam_models::image::{RgbImage, MAX_IMAGE_SIDE};

use crate::error::{quoted, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// One byte per pixel.
    Gray8,
    /// Two bytes per pixel, little-endian (the byte order of every machine we ship on);
    /// min-max scaled to 0..255 per frame, as the evaluation protocol does for 16-bit PNGs.
    Gray16,
    /// Three bytes per pixel, R, G, B.
    Rgb8,
}

impl PixelFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gray8" => Ok(Self::Gray8),
            "gray16" => Ok(Self::Gray16),
            "rgb8" => Ok(Self::Rgb8),
            other => Err(Error::InvalidFrame(format!("pixel format {} is not one of gray8, gray16, rgb8", quoted(other)))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gray8 => "gray8",
            Self::Gray16 => "gray16",
            Self::Rgb8 => "rgb8",
        }
    }

    pub fn bytes_per_pixel(self) -> usize {
        match self {
            Self::Gray8 => 1,
            Self::Gray16 => 2,
            Self::Rgb8 => 3,
        }
    }
}

/// Where the pixels of a frame lie in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub width: usize,
    pub height: usize,
    /// Bytes from the start of one row to the next (≥ width × bytes per pixel).
    pub stride: usize,
    pub format: PixelFormat,
}

impl Layout {
    /// Checks a layout from the wire against the daemon's frame bound (`--max-frame-pixels`)
    /// and the engine's side limit; the arithmetic is checked so no product can overflow.
    pub fn new(width: u32, height: u32, stride: u32, format: &str, max_pixels: u64) -> Result<Self> {
        let format = PixelFormat::parse(format)?;
        let (w, h, stride) = (width as usize, height as usize, stride as usize);
        if w == 0 || h == 0 {
            return Err(Error::InvalidFrame(format!("frame size {w}x{h} is empty")));
        }
        if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
            return Err(Error::InvalidFrame(format!("frame size {w}x{h}: at most {MAX_IMAGE_SIDE} pixels per side")));
        }
        if (w as u64) * (h as u64) > max_pixels {
            return Err(Error::InvalidFrame(format!("frame of {w}x{h} pixels exceeds --max-frame-pixels {max_pixels}")));
        }
        let row = w * format.bytes_per_pixel();
        if stride < row {
            return Err(Error::InvalidFrame(format!(
                "stride {stride} is less than width {w} x {} bytes per {} pixel",
                format.bytes_per_pixel(),
                format.name()
            )));
        }
        Ok(Self { width: w, height: h, stride, format })
    }

    /// Refuses a layout whose buffer (`stride × height`) is larger than `max_bytes`: the pixel
    /// bound alone lets a huge stride describe terabytes (a sparse memfd with stride 2³² would be
    /// mapped whole).
    pub fn check_bytes(self, max_bytes: u64) -> Result<Self> {
        let bytes = self.stride as u64 * self.height as u64;
        if bytes > max_bytes {
            return Err(Error::InvalidFrame(format!(
                "frame buffer of {bytes} bytes (stride {} x height {}) exceeds --max-frame-bytes {max_bytes}",
                self.stride, self.height
            )));
        }
        Ok(self)
    }

    /// Bytes a buffer must hold: `stride × height`.
    pub fn byte_len(&self) -> usize {
        self.stride * self.height
    }

    /// Bytes of the row data proper (no stride padding) per row.
    pub fn row_bytes(&self) -> usize {
        self.width * self.format.bytes_per_pixel()
    }
}

/// Converts `src` (laid out as `layout`) into `dst`, reusing `dst`'s allocation when it is big
/// enough, so a stream of same-sized frames allocates nothing here.
pub fn to_rgb(src: &[u8], layout: &Layout, dst: &mut RgbImage) -> Result<()> {
    if src.len() < layout.byte_len() {
        return Err(Error::InvalidFrame(format!("frame buffer holds {} bytes; layout needs {}", src.len(), layout.byte_len())));
    }
    let (w, h) = (layout.width, layout.height);
    dst.width = w;
    dst.height = h;
    dst.data.resize(w * h * 3, 0);
    let rows = src.chunks(layout.stride).take(h);
    match layout.format {
        PixelFormat::Gray8 => {
            for (row, out) in rows.zip(dst.data.chunks_exact_mut(w * 3)) {
                for (&g, px) in row[..w].iter().zip(out.chunks_exact_mut(3)) {
                    px.copy_from_slice(&[g, g, g]);
                }
            }
        }
        PixelFormat::Rgb8 => {
            for (row, out) in rows.zip(dst.data.chunks_exact_mut(w * 3)) {
                out.copy_from_slice(&row[..w * 3]);
            }
        }
        PixelFormat::Gray16 => {
            let sample = |row: &[u8], x: usize| u16::from_le_bytes([row[2 * x], row[2 * x + 1]]);
            let (mut lo, mut hi) = (u16::MAX, 0u16);
            for row in src.chunks(layout.stride).take(h) {
                for x in 0..w {
                    let v = sample(row, x);
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            // Same rule as the protocol's 16-bit reader (`minisam::image_io::min_max_to_u8`):
            // (v - min) / (max - min) * 255, rounded half to even; a flat frame maps to 0.
            let range = f64::from(hi.saturating_sub(lo));
            for (row, out) in rows.zip(dst.data.chunks_exact_mut(w * 3)) {
                for (x, px) in out.chunks_exact_mut(3).enumerate() {
                    let g = if range > 0.0 { ((f64::from(sample(row, x) - lo) / range) * 255.0).round_ties_even() as u8 } else { 0 };
                    px.copy_from_slice(&[g, g, g]);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> RgbImage {
        RgbImage { width: 0, height: 0, data: Vec::new() }
    }

    #[test]
    fn layouts_are_bounded() {
        assert!(Layout::new(4, 4, 4, "gray8", 100).is_ok());
        assert!(Layout::new(4, 4, 3, "gray8", 100).is_err(), "stride < width");
        assert!(Layout::new(4, 4, 8, "rgb8", 100).is_err(), "stride < width * 3");
        assert!(Layout::new(20, 20, 20, "gray8", 100).is_err(), "over max pixels");
        assert!(Layout::new(0, 4, 4, "gray8", 100).is_err());
        assert!(Layout::new(4, 4, 4, "bgr8", 100).is_err());
        assert!(Layout::new(u32::MAX, u32::MAX, u32::MAX, "rgb8", u64::MAX).is_err());
        let huge_stride = Layout::new(64, 64, u32::MAX, "gray8", 100_000).unwrap();
        assert!(matches!(huge_stride.check_bytes(64 << 20), Err(Error::InvalidFrame(m)) if m.contains("--max-frame-bytes")));
        assert!(Layout::new(64, 64, 80, "gray8", 100_000).unwrap().check_bytes(64 << 20).is_ok());
    }

    #[test]
    fn strided_gray8_and_rgb8_convert() {
        let l = Layout::new(2, 2, 3, "gray8", 100).unwrap();
        let mut out = empty();
        to_rgb(&[1, 2, 99, 3, 4, 99], &l, &mut out).unwrap();
        assert_eq!(out.data, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
        let l = Layout::new(1, 2, 4, "rgb8", 100).unwrap();
        to_rgb(&[1, 2, 3, 0, 4, 5, 6, 0], &l, &mut out).unwrap();
        assert_eq!((out.width, out.height, out.data.clone()), (1, 2, vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn gray16_matches_the_protocol_reader() {
        let values: [u16; 4] = [100, 600, 1100, 300];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let l = Layout::new(2, 2, 4, "gray16", 100).unwrap();
        let mut out = empty();
        to_rgb(&bytes, &l, &mut out).unwrap();
        let expect = minisam::image_io::min_max_to_u8(&values);
        let got: Vec<u8> = out.data.chunks_exact(3).map(|p| p[0]).collect();
        assert_eq!(got, expect);
    }
}
