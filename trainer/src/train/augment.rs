//! Training-time augmentation at the original resolution: flips (image, mask and box together),
//! an intensity change (contrast, brightness, gamma) and the protocol's box jitter (each side
//! moved by up to 10% of the box size, clipped, re-ordered).

use minisam_models::image::RgbImage;
use minisam_models::prompt::BoxPrompt;

use super::rng::Rng;

#[derive(Clone, Copy, Debug)]
pub struct AugmentOptions {
    /// Mirror left-right with probability 1/2.
    pub hflip: bool,
    /// Mirror top-bottom with probability 1/2.
    pub vflip: bool,
    pub intensity: bool,
    /// Largest move of each box side as a fraction of the box size (0 = tight box).
    pub jitter: f64,
}

/// One augmented training example.
pub struct Augmented {
    pub image: RgbImage,
    /// `[h, w]`, 1 inside the target.
    pub mask: Vec<u8>,
    pub prompt: BoxPrompt,
}

/// Mirrors `[h, w, c]` rows (horizontal) or the row order (vertical), in place.
fn flip<T: Copy>(data: &mut [T], h: usize, w: usize, c: usize, horizontal: bool) {
    if horizontal {
        for row in data.chunks_exact_mut(w * c) {
            for x in 0..w / 2 {
                for k in 0..c {
                    row.swap(x * c + k, (w - 1 - x) * c + k);
                }
            }
        }
    } else {
        for y in 0..h / 2 {
            for i in 0..w * c {
                data.swap(y * w * c + i, (h - 1 - y) * w * c + i);
            }
        }
    }
}

/// `image`, its target `mask` (`[h, w]` 0/1) and the target's tight box `[x0, y0, x1, y1]`
/// (inclusive pixels) → one augmented example drawn from `rng`.
pub fn augment(image: &RgbImage, mask: &[u8], tight: [usize; 4], opts: AugmentOptions, rng: &mut Rng) -> Augmented {
    let (h, w) = (image.height, image.width);
    let mut data = image.data.clone();
    let mut mask = mask.to_vec();
    let [mut x0, mut y0, mut x1, mut y1] = tight.map(|v| v as i64);
    // Both coins are always drawn, so turning one flip off leaves the other draws unchanged.
    let (hflip, vflip) = (rng.coin(), rng.coin());
    if opts.hflip && hflip {
        flip(&mut data, h, w, 3, true);
        flip(&mut mask, h, w, 1, true);
        (x0, x1) = (w as i64 - 1 - x1, w as i64 - 1 - x0);
    }
    if opts.vflip && vflip {
        flip(&mut data, h, w, 3, false);
        flip(&mut mask, h, w, 1, false);
        (y0, y1) = (h as i64 - 1 - y1, h as i64 - 1 - y0);
    }
    if opts.intensity {
        let contrast = rng.uniform(0.8, 1.2);
        let brightness = rng.uniform(-20.0, 20.0);
        let gamma = rng.uniform(0.8, 1.25);
        let table: Vec<u8> = (0..256).map(|v| ((v as f64 / 255.0).powf(gamma) * 255.0 * contrast + brightness).round().clamp(0.0, 255.0) as u8).collect();
        data.iter_mut().for_each(|v| *v = table[*v as usize]);
    }
    if opts.jitter > 0.0 {
        let (bw, bh) = (x1 - x0, y1 - y0);
        let (jx, jy) = ((opts.jitter * bw as f64) as i64, (opts.jitter * bh as f64) as i64);
        x0 += rng.int(-jx, jx);
        x1 += rng.int(-jx, jx);
        y0 += rng.int(-jy, jy);
        y1 += rng.int(-jy, jy);
        let clip = |v: i64, n: usize| v.clamp(0, n as i64 - 1);
        (x0, x1) = (clip(x0, w).min(clip(x1, w)), clip(x0, w).max(clip(x1, w)));
        (y0, y1) = (clip(y0, h).min(clip(y1, h)), clip(y0, h).max(clip(y1, h)));
    }
    let image = RgbImage { width: w, height: h, data };
    Augmented { image, mask, prompt: BoxPrompt { x0: x0 as f32, y0: y0 as f32, x1: x1 as f32, y1: y1 as f32 } }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flipped example's box is still the tight box of its flipped mask, and the image moved
    /// with the mask.
    #[test]
    fn flips_keep_image_mask_and_box_together() {
        let (w, h) = (7, 5);
        let mut mask = vec![0u8; w * h];
        for y in 1..3 {
            for x in 4..6 {
                mask[y * w + x] = 1;
            }
        }
        let grey: Vec<u8> = mask.iter().map(|&m| 100 + 100 * m).collect();
        let image = RgbImage::from_grey(w, h, &grey).unwrap();
        let opts = AugmentOptions { hflip: true, vflip: true, intensity: false, jitter: 0.0 };
        let mut seen = std::collections::HashSet::new();
        for seed in 0..32 {
            let a = augment(&image, &mask, [4, 1, 5, 2], opts, &mut Rng::new(seed, 0));
            let inside: Vec<(usize, usize)> = (0..w * h).filter(|&i| a.mask[i] == 1).map(|i| (i % w, i / w)).collect();
            let bx = (inside.iter().map(|p| p.0).min().unwrap(), inside.iter().map(|p| p.1).min().unwrap(), inside.iter().map(|p| p.0).max().unwrap(), inside.iter().map(|p| p.1).max().unwrap());
            assert_eq!((a.prompt.x0 as usize, a.prompt.y0 as usize, a.prompt.x1 as usize, a.prompt.y1 as usize), bx);
            for i in 0..w * h {
                assert_eq!(a.image.data[3 * i], 100 + 100 * a.mask[i]);
            }
            seen.insert(bx);
        }
        assert_eq!(seen.len(), 4, "all four flip combinations occur");
    }

    #[test]
    fn jitter_stays_inside_the_image_and_bounded() {
        let image = RgbImage::from_grey(50, 40, &[0u8; 2000]).unwrap();
        let opts = AugmentOptions { hflip: false, vflip: false, intensity: true, jitter: 0.1 };
        for seed in 0..100 {
            let a = augment(&image, &[0u8; 2000], [0, 10, 40, 39], opts, &mut Rng::new(seed, 1));
            let p = a.prompt;
            assert!(p.x0 <= p.x1 && p.y0 <= p.y1 && p.x1 <= 49.0 && p.y1 <= 39.0 && p.x0 >= 0.0);
            assert!(p.x1 >= 36.0 && p.y0 <= 12.0, "moved by at most 10%: {p:?}");
        }
    }
}
