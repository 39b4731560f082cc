//! Pictures of a segmentation for people: the image as the engine saw it (decoded, windowed,
//! RGB), the predicted mask filled semi-transparently with its contour drawn opaque, optionally
//! the ground truth's contour, and the prompts on top (box outline, positive and negative points
//! in different colours). Used by `segment --overlay` and by the worst cases of `eval --report`.
//!
//! Own drawing code rather than `imageproc`: what is needed is four primitives on an RGB buffer
//! (blend, contour, rectangle outline, disc), against a crate that brings nalgebra, rand, a font
//! rasteriser and `image`'s default codecs.

use anyhow::{bail, Result};
use minisam_models::image::{Mask, RgbImage};
use minisam_models::prompt::{BoxPrompt, Point, PointLabel, Prompts};

pub type Rgb = [u8; 3];

/// Colours and line widths of an overlay.
#[derive(Clone, Debug, PartialEq)]
pub struct Style {
    /// Fill of the predicted mask, blended over the image with `fill_alpha` (0 = invisible,
    /// 255 = opaque).
    pub fill: Rgb,
    pub fill_alpha: u8,
    /// Opaque contour of the predicted mask.
    pub contour: Rgb,
    /// Opaque contour of the ground truth, when one is drawn.
    pub truth: Rgb,
    pub box_edge: Rgb,
    pub positive: Rgb,
    pub negative: Rgb,
    /// Ring around each point so it stays visible on a bright or a dark image.
    pub point_ring: Rgb,
    /// Width in pixels of contours and box edges.
    pub stroke: usize,
    /// Radius in pixels of a point's disc (its ring lies just outside).
    pub point_radius: usize,
}

impl Style {
    /// The default colours (fill and box as in SAM's own notebooks: blue mask, green box), with
    /// widths that grow with the image so lines stay visible when a large frame is shown scaled
    /// down: 1 px up to 512 px on the long side, one more per further 512.
    pub fn for_image(width: usize, height: usize) -> Style {
        let stroke = 1 + width.max(height).saturating_sub(1) / 512;
        Style {
            fill: [30, 144, 255],
            fill_alpha: 110,
            contour: [0, 255, 255],
            truth: [255, 215, 0],
            box_edge: [0, 255, 0],
            positive: [0, 200, 0],
            negative: [230, 30, 30],
            point_ring: [255, 255, 255],
            stroke,
            point_radius: 3 * stroke,
        }
    }
}

/// What is drawn over the image.
pub struct Layers<'a> {
    /// The prediction (non-zero = inside): fill and contour.
    pub prediction: &'a Mask,
    /// A ground truth (non-zero = inside), drawn as a contour only.
    pub truth: Option<&'a Mask>,
    pub prompts: &'a Prompts,
}

/// The overlay of `layers` on `image`. Masks must have the image's size.
pub fn render(image: &RgbImage, layers: &Layers, style: &Style) -> Result<RgbImage> {
    let (w, h) = (image.width, image.height);
    let masks = std::iter::once(("predicted mask", layers.prediction))
        .chain(layers.truth.map(|t| ("ground truth", t)));
    for (what, m) in masks {
        if (m.width, m.height) != (w, h) || m.data.len() != w * h {
            bail!(
                "overlay: the {what} is {}x{} ({} values) but the image is {w}x{h}",
                m.width,
                m.height,
                m.data.len()
            );
        }
    }
    let mut out = image.clone();
    let pred = &layers.prediction.data;
    for (i, &v) in pred.iter().enumerate() {
        if v != 0 {
            blend(
                &mut out.data[3 * i..3 * i + 3],
                style.fill,
                style.fill_alpha,
            );
        }
    }
    paint_where(&mut out, &contour(pred, w, h, style.stroke), style.contour);
    if let Some(t) = layers.truth {
        paint_where(&mut out, &contour(&t.data, w, h, style.stroke), style.truth);
    }
    for b in &layers.prompts.boxes {
        draw_box(&mut out, b, style.stroke, style.box_edge);
    }
    for p in &layers.prompts.points {
        draw_point(&mut out, p, style);
    }
    Ok(out)
}

/// `pixel = pixel * (1 - a) + colour * a` with `a = alpha / 255`, rounded.
fn blend(pixel: &mut [u8], colour: Rgb, alpha: u8) {
    let a = u32::from(alpha);
    for (c, f) in pixel.iter_mut().zip(colour) {
        *c = ((u32::from(*c) * (255 - a) + u32::from(f) * a + 127) / 255) as u8;
    }
}

fn paint_where(img: &mut RgbImage, on: &[bool], colour: Rgb) {
    for (i, _) in on.iter().enumerate().filter(|(_, &b)| b) {
        img.data[3 * i..3 * i + 3].copy_from_slice(&colour);
    }
}

/// The inner boundary of a mask, `width` pixels thick: the inside pixels with an outside pixel
/// within Chebyshev distance `width`. Off-image is not "outside": a mask that runs to the frame's
/// edge is not outlined along it. Computed as inside minus the mask's erosion by a square, the
/// erosion separably (rows, then columns) with prefix sums, so it is linear in the pixel count.
pub fn contour(mask: &[u8], w: usize, h: usize, width: usize) -> Vec<bool> {
    let r = width.max(1);
    let outside: Vec<bool> = mask.iter().map(|&v| v == 0).collect();
    let near_in_row = spread(&outside, w, h, r, 1, w);
    let near = spread(&near_in_row, w, h, r, w, 1);
    mask.iter()
        .zip(near)
        .map(|(&v, near_outside)| v != 0 && near_outside)
        .collect()
}

/// For each pixel: is any `flag` set within `r` steps along one axis? `step` is that axis's
/// stride in the buffer and `lane` the other axis's; the line has `w` (rows) or `h` (columns)
/// pixels.
fn spread(flag: &[bool], w: usize, h: usize, r: usize, step: usize, lane: usize) -> Vec<bool> {
    let (len, lanes) = if step == 1 { (w, h) } else { (h, w) };
    let mut out = vec![false; flag.len()];
    let mut prefix = vec![0usize; len + 1];
    for l in 0..lanes {
        let at = |k: usize| l * lane + k * step;
        for k in 0..len {
            prefix[k + 1] = prefix[k] + usize::from(flag[at(k)]);
        }
        for k in 0..len {
            let (lo, hi) = (k.saturating_sub(r), (k + r + 1).min(len));
            out[at(k)] = prefix[hi] > prefix[lo];
        }
    }
    out
}

/// A prompt coordinate as the pixel it falls on, clamped to the image (the engine clips boxes
/// dragged past the edge the same way).
fn pixel(v: f32, size: usize) -> usize {
    (v.round().max(0.0) as usize).min(size - 1)
}

/// The outline of an inclusive-corner box, `stroke` pixels wide, drawn inwards from its edges.
fn draw_box(img: &mut RgbImage, b: &BoxPrompt, stroke: usize, colour: Rgb) {
    let (w, h) = (img.width, img.height);
    let (x0, x1) = (pixel(b.x0, w), pixel(b.x1, w));
    let (y0, y1) = (pixel(b.y0, h), pixel(b.y1, h));
    let s = stroke.max(1);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let on_edge = x < x0 + s || x + s > x1 || y < y0 + s || y + s > y1;
            if on_edge {
                put(img, x, y, colour);
            }
        }
    }
}

/// A filled disc in the label's colour with a one-pixel ring around it.
fn draw_point(img: &mut RgbImage, p: &Point, style: &Style) {
    let (cx, cy) = (pixel(p.x, img.width) as i64, pixel(p.y, img.height) as i64);
    let colour = match p.label {
        PointLabel::Foreground => style.positive,
        PointLabel::Background => style.negative,
    };
    let r = style.point_radius as i64;
    let ring = r + 1;
    for dy in -ring..=ring {
        for dx in -ring..=ring {
            let (x, y) = (cx + dx, cy + dy);
            if x < 0 || y < 0 || x >= img.width as i64 || y >= img.height as i64 {
                continue;
            }
            let d2 = dx * dx + dy * dy;
            if d2 <= r * r {
                put(img, x as usize, y as usize, colour);
            } else if d2 <= ring * ring {
                put(img, x as usize, y as usize, style.point_ring);
            }
        }
    }
}

fn put(img: &mut RgbImage, x: usize, y: usize, colour: Rgb) {
    let i = 3 * (y * img.width + x);
    img.data[i..i + 3].copy_from_slice(&colour);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gradient, so "untouched" is checked against a different value at every pixel.
    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 7 + y * 3) as u8, (x * 2 + 40) as u8, (y * 5 + 9) as u8]
            })
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    fn rect_mask(w: usize, h: usize, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> Mask {
        let data = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                u8::from((x0..=x1).contains(&x) && (y0..=y1).contains(&y))
            })
            .collect();
        Mask {
            width: w,
            height: h,
            data,
        }
    }

    fn at(img: &RgbImage, x: usize, y: usize) -> Rgb {
        let i = 3 * (y * img.width + x);
        [img.data[i], img.data[i + 1], img.data[i + 2]]
    }

    fn blended(under: Rgb, s: &Style) -> Rgb {
        let mut p = under;
        blend(&mut p, s.fill, s.fill_alpha);
        p
    }

    #[test]
    fn every_pixel_is_fill_contour_box_or_untouched() {
        let (w, h) = (24, 20);
        let image = gradient(w, h);
        let mask = rect_mask(w, h, (6, 5, 15, 12));
        let prompts = Prompts::with_box(BoxPrompt {
            x0: 3.0,
            y0: 2.0,
            x1: 19.0,
            y1: 16.0,
        });
        let style = Style::for_image(w, h);
        assert_eq!(style.stroke, 1);
        let layers = Layers {
            prediction: &mask,
            truth: None,
            prompts: &prompts,
        };
        let out = render(&image, &layers, &style).unwrap();
        for y in 0..h {
            for x in 0..w {
                let box_edge = ((x == 3 || x == 19) && (2..=16).contains(&y))
                    || ((y == 2 || y == 16) && (3..=19).contains(&x));
                let inside = (6..=15).contains(&x) && (5..=12).contains(&y);
                let boundary = inside && (x == 6 || x == 15 || y == 5 || y == 12);
                let expected = if box_edge {
                    style.box_edge
                } else if boundary {
                    style.contour
                } else if inside {
                    blended(at(&image, x, y), &style)
                } else {
                    at(&image, x, y)
                };
                assert_eq!(at(&out, x, y), expected, "pixel ({x}, {y})");
            }
        }
        // The fill really is semi-transparent: neither the image nor the fill colour.
        assert_ne!(at(&out, 10, 8), at(&image, 10, 8));
        assert_ne!(at(&out, 10, 8), style.fill);
    }

    #[test]
    fn contour_follows_a_non_convex_boundary_and_not_the_frame_edge() {
        // An L touching the left edge: its boundary is where it meets the background only.
        let (w, h) = (6, 5);
        #[rustfmt::skip]
        let mask = [
            1, 1, 0, 0, 0, 0,
            1, 1, 0, 0, 0, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
        ];
        let c = contour(&mask, w, h, 1);
        #[rustfmt::skip]
        let expected = [
            0, 1, 0, 0, 0, 0,
            0, 1, 0, 0, 0, 0,
            0, 1, 1, 1, 1, 0,
            0, 0, 0, 0, 1, 0,
            0, 0, 0, 0, 1, 0,
        ];
        let got: Vec<u8> = c.iter().map(|&b| u8::from(b)).collect();
        assert_eq!(got, expected);
        // Two pixels wide: everything but the pixels at least 2 away from the background.
        let c2 = contour(&mask, w, h, 2);
        assert!(!c2[4 * w] && !c2[4 * w + 1] && !c2[4 * w + 2] && c2[4 * w + 3] && c2[w]);
    }

    #[test]
    fn truth_contour_points_and_wide_strokes() {
        let (w, h) = (1100, 40);
        let image = gradient(w, h);
        let empty = Mask {
            width: w,
            height: h,
            data: vec![0; w * h],
        };
        let truth = rect_mask(w, h, (100, 10, 200, 30));
        let prompts = Prompts {
            boxes: vec![BoxPrompt {
                x0: 500.0,
                y0: 5.0,
                x1: 600.0,
                y1: 35.0,
            }],
            points: vec![
                Point {
                    x: 20.0,
                    y: 20.0,
                    label: PointLabel::Foreground,
                },
                Point {
                    x: 60.0,
                    y: 20.0,
                    label: PointLabel::Background,
                },
            ],
        };
        let style = Style::for_image(w, h);
        assert_eq!(
            (style.stroke, style.point_radius),
            (3, 9),
            "1100 px wide: 3 px lines"
        );
        let layers = Layers {
            prediction: &empty,
            truth: Some(&truth),
            prompts: &prompts,
        };
        let out = render(&image, &layers, &style).unwrap();
        assert_eq!(at(&out, 100, 20), style.truth);
        assert_eq!(at(&out, 102, 20), style.truth, "3 px wide");
        assert_eq!(
            at(&out, 103, 20),
            at(&image, 103, 20),
            "truth is not filled"
        );
        assert_eq!(at(&out, 502, 20), style.box_edge);
        assert_eq!(at(&out, 503, 20), at(&image, 503, 20));
        assert_eq!(at(&out, 20, 20), style.positive);
        assert_eq!(at(&out, 60, 20), style.negative);
        assert_ne!(style.positive, style.negative);
        assert_eq!(at(&out, 20 + 9, 20), style.positive, "radius 9");
        assert_eq!(at(&out, 20 + 10, 20), style.point_ring);
        assert_eq!(at(&out, 20 + 11, 20), at(&image, 20 + 11, 20));
    }

    #[test]
    fn boxes_past_the_edge_are_clamped_and_sizes_must_match() {
        let image = gradient(10, 8);
        let empty = Mask {
            width: 10,
            height: 8,
            data: vec![0; 80],
        };
        let prompts = Prompts::with_box(BoxPrompt {
            x0: -5.0,
            y0: 2.0,
            x1: 30.0,
            y1: 5.0,
        });
        let style = Style::for_image(10, 8);
        let out = render(
            &image,
            &Layers {
                prediction: &empty,
                truth: None,
                prompts: &prompts,
            },
            &style,
        )
        .unwrap();
        assert_eq!(at(&out, 0, 3), style.box_edge);
        assert_eq!(at(&out, 9, 3), style.box_edge);
        assert_eq!(at(&out, 4, 3), at(&image, 4, 3));
        let small = Mask {
            width: 5,
            height: 8,
            data: vec![0; 40],
        };
        let err = render(
            &image,
            &Layers {
                prediction: &small,
                truth: None,
                prompts: &prompts,
            },
            &style,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("5x8") && err.to_string().contains("10x8"),
            "{err}"
        );
    }
}
