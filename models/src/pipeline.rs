//! Each model family's own pre- and post-processing, reproduced step by step from its reference
//! code, because a SAM variant is only as accurate as the pixels it is fed:
//!
//! | step | LiteMedSAM (CVPR 2024 inference) | SAM / MobileSAM (`SamPredictor`) |
//! |---|---|---|
//! | resize longest side | to 256, OpenCV `INTER_AREA` | to 1024, PIL bilinear (antialiased) |
//! | new size | `int(H*s+0.5), int(W*s+0.5)` | same formula |
//! | normalise | min-max of the whole resized image to [0,1] | `(x - mean) / std`, SAM's pixel statistics |
//! | pad | zeros, bottom and right | zeros after normalising, bottom and right |
//! | box | scaled by `s`, truncated to int | scaled per axis, kept fractional |
//! | logits → mask | crop to the resized size, bilinear to H×W, `sigmoid > 0.5` | bilinear to S×S, crop, bilinear to H×W, `> 0` |
//!
//! `sigmoid(x) > 0.5` and `x > 0` are the same test, so both families threshold logits at 0.

use minisam_kernels::resize;

use crate::config::Preprocess;
use crate::image::{Mask, RgbImage};
use crate::prompt::{PointLabel, Prompts};
use crate::{Error, Result};

/// SAM's pixel mean and standard deviation (RGB, 0..255 scale).
const SAM_PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const SAM_PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Geometry shared by pre- and post-processing of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Original `(height, width)`.
    pub original: (usize, usize),
    /// `(height, width)` after resizing the longest side to the encoder input size.
    pub resized: (usize, usize),
    /// Side of the square encoder input.
    pub input_size: usize,
}

impl Geometry {
    /// `new size = int(H*s + 0.5), int(W*s + 0.5)` with `s = input / max(H, W)`, as both references
    /// compute it (in f64, like Python).
    pub fn new(height: usize, width: usize, input_size: usize) -> Self {
        let scale = input_size as f64 / height.max(width) as f64;
        let resize = |v: usize| ((v as f64 * scale + 0.5) as usize).clamp(1, input_size);
        Self { original: (height, width), resized: (resize(height), resize(width)), input_size }
    }

    /// `(rows, cols)` of a `low_res × low_res` logit plane (which covers the whole square input)
    /// that lie over the resized image rather than its padding: the resized size scaled by
    /// `low_res / S`, a partly covered cell counted in. Equal to `resized` when the plane is the
    /// input's size (LiteMedSAM, 256); a quarter of it for SAM and MobileSAM (1024 → 256).
    pub fn low_res_region(&self, low_res: usize) -> (usize, usize) {
        let scale = |v: usize| (v * low_res).div_ceil(self.input_size.max(1)).clamp(1, low_res);
        (scale(self.resized.0), scale(self.resized.1))
    }
}

/// The encoder input: `[3, S, S]` f32, channel-major, already normalised and padded.
pub fn preprocess(kind: Preprocess, image: &RgbImage, geometry: &Geometry) -> Result<Vec<f32>> {
    let (h, w) = geometry.original;
    if (image.height, image.width) != (h, w) {
        return Err(Error::Input(format!("image is {}x{}, geometry expects {w}x{h}", image.width, image.height)));
    }
    let (rh, rw) = geometry.resized;
    let s = geometry.input_size;
    let mut resized = vec![0u8; rh * rw * 3];
    match kind {
        Preprocess::LiteMedSam => resize::resize_area_u8(&image.data, h, w, 3, rh, rw, &mut resized),
        Preprocess::Sam => resize::resize_bilinear_pil_u8(&image.data, h, w, 3, rh, rw, &mut resized),
    }

    let mut input = vec![0.0f32; 3 * s * s];
    match kind {
        Preprocess::LiteMedSam => {
            // Min and max over all three channels together, as `img.min()` / `img.max()` do.
            let min = *resized.iter().min().unwrap_or(&0) as f64;
            let max = *resized.iter().max().unwrap_or(&0) as f64;
            let range = (max - min).max(1e-8);
            fill_planes(&resized, rh, rw, s, &mut input, |_, v| ((v as f64 - min) / range) as f32);
        }
        Preprocess::Sam => {
            fill_planes(&resized, rh, rw, s, &mut input, |c, v| (v as f32 - SAM_PIXEL_MEAN[c]) / SAM_PIXEL_STD[c]);
        }
    }
    Ok(input)
}

/// Scatters an interleaved `[rh, rw, 3]` image into the top-left of three `S x S` planes,
/// mapping each value with `f(channel, value)`; the rest stays zero (the padding).
fn fill_planes(src: &[u8], rh: usize, rw: usize, s: usize, planes: &mut [f32], f: impl Fn(usize, u8) -> f32) {
    for c in 0..3 {
        let plane = &mut planes[c * s * s..(c + 1) * s * s];
        for y in 0..rh {
            for x in 0..rw {
                plane[y * s + x] = f(c, src[(y * rw + x) * 3 + c]);
            }
        }
    }
}

/// Prompts in the encoder-input frame, as the prompt encoder takes them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputPrompts {
    pub boxes: Vec<[f32; 4]>,
    /// `(x, y, label)`, SAM's label convention (1 foreground, 0 background).
    pub points: Vec<(f32, f32, i32)>,
}

/// Maps prompts from original pixels into the encoder-input frame, each family its own way.
/// Boxes are clipped to the image first (the protocol clips jittered boxes the same way).
pub fn transform_prompts(kind: Preprocess, prompts: &Prompts, geometry: &Geometry) -> InputPrompts {
    let (h, w) = geometry.original;
    let (rh, rw) = geometry.resized;
    let clip_x = |v: f32| v.clamp(0.0, (w - 1) as f32);
    let clip_y = |v: f32| v.clamp(0.0, (h - 1) as f32);
    let boxes = prompts.boxes.iter().map(|b| [clip_x(b.x0), clip_y(b.y0), clip_x(b.x1), clip_y(b.y1)]);
    let label = |l: PointLabel| l as i32;
    match kind {
        Preprocess::LiteMedSam => {
            let scale = (geometry.input_size as f64 / h.max(w) as f64) as f32;
            InputPrompts {
                // `(box * scale).astype(int)` in the reference: truncation toward zero.
                boxes: boxes.map(|b| b.map(|v| (v * scale).trunc())).collect(),
                points: prompts.points.iter().map(|p| (p.x * scale, p.y * scale, label(p.label))).collect(),
            }
        }
        Preprocess::Sam => {
            let (sx, sy) = (rw as f32 / w as f32, rh as f32 / h as f32);
            InputPrompts {
                boxes: boxes.map(|b| [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]).collect(),
                points: prompts.points.iter().map(|p| (p.x * sx, p.y * sy, label(p.label))).collect(),
            }
        }
    }
}

/// Turns one `low_res x low_res` logit plane into a mask at the original resolution.
pub fn postprocess(kind: Preprocess, logits: &[f32], low_res: usize, geometry: &Geometry) -> Result<Mask> {
    if logits.len() != low_res * low_res {
        return Err(Error::Shape(format!("logit plane of {} values, expected {low_res}x{low_res}", logits.len())));
    }
    let (h, w) = geometry.original;
    let s = geometry.input_size;
    let (rh, rw) = geometry.resized;
    // The last resize thresholds on the way out (`logits > 0`), so the frame-sized plane is
    // never held in f32.
    let mut data = vec![0u8; h * w];
    match kind {
        Preprocess::LiteMedSam => {
            // The low-res grid is the encoder-input grid (256): crop, then upsample.
            let (ch, cw) = (rh.min(low_res), rw.min(low_res));
            let cropped = crop(logits, low_res, ch, cw);
            resize::bilinear_mask(&cropped, 1, ch, cw, h, w, &mut data);
        }
        Preprocess::Sam => {
            let mut padded = vec![0.0f32; s * s];
            resize::bilinear(logits, 1, low_res, low_res, s, s, &mut padded);
            let cropped = crop(&padded, s, rh, rw);
            resize::bilinear_mask(&cropped, 1, rh, rw, h, w, &mut data);
        }
    }
    Ok(Mask { width: w, height: h, data })
}

/// Top-left `rows x cols` of a square `side x side` plane.
fn crop(plane: &[f32], side: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows).flat_map(|y| plane[y * side..y * side + cols].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::BoxPrompt;

    #[test]
    fn geometry_follows_the_reference_rounding() {
        // 800x540 → s = 0.32: 540*0.32 = 172.8 → 173, 800 → 256 (the golden hc18 json says 173x256).
        assert_eq!(Geometry::new(540, 800, 256).resized, (173, 256));
        assert_eq!(Geometry::new(512, 512, 1024).resized, (1024, 1024));
        assert_eq!(Geometry::new(240, 196, 256).resized, (256, 209));
    }

    #[test]
    fn low_res_region_scales_the_resized_image_into_the_logit_plane() {
        assert_eq!(Geometry::new(540, 800, 256).low_res_region(256), (173, 256));
        // SAM at 1024: 768x1024 resized, a 256 plane → 192x256; 691 rows cover 172.75 cells → 173.
        assert_eq!(Geometry::new(600, 800, 1024).low_res_region(256), (192, 256));
        assert_eq!(Geometry::new(540, 800, 1024).resized, (691, 1024));
        assert_eq!(Geometry::new(540, 800, 1024).low_res_region(256), (173, 256));
        assert_eq!(Geometry::new(1, 4000, 1024).low_res_region(256), (1, 256));
    }

    #[test]
    fn litemedsam_boxes_are_scaled_and_truncated() {
        // The golden us-hc18 000_HC box [330,288,489,467] becomes [105,92,156,149].
        let g = Geometry::new(540, 800, 256);
        let p = Prompts::with_box(BoxPrompt { x0: 330.0, y0: 288.0, x1: 489.0, y1: 467.0 });
        assert_eq!(transform_prompts(Preprocess::LiteMedSam, &p, &g).boxes, vec![[105.0, 92.0, 156.0, 149.0]]);
    }

    #[test]
    fn litemedsam_input_is_min_max_normalised_and_zero_padded() {
        let img = RgbImage::from_grey(4, 2, &[10, 20, 30, 40, 50, 60, 70, 110]).unwrap();
        let g = Geometry::new(2, 4, 8);
        assert_eq!(g.resized, (4, 8));
        let x = preprocess(Preprocess::LiteMedSam, &img, &g).unwrap();
        let plane = &x[..64];
        let inside: Vec<f32> = (0..4).flat_map(|y| plane[y * 8..y * 8 + 8].to_vec()).collect();
        let (lo, hi) = inside.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((lo, hi), (0.0, 1.0));
        assert!(plane[32..].iter().all(|&v| v == 0.0), "rows below the resized image are padding");
    }

    #[test]
    fn postprocess_thresholds_at_zero_and_restores_size() {
        let g = Geometry::new(6, 3, 4);
        // Resized 4x2: positive logits in the left column of the low-res grid.
        let mut logits = vec![-5.0f32; 16];
        for y in 0..4 {
            logits[y * 4] = 5.0;
        }
        let m = postprocess(Preprocess::LiteMedSam, &logits, 4, &g).unwrap();
        assert_eq!((m.width, m.height), (3, 6));
        assert!(m.data.chunks(3).all(|row| row[0] == 1 && row[2] == 0));
    }
}
