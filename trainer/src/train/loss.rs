//! The training loss on the decoder's low-resolution mask logits: binary cross-entropy plus soft
//! Dice against the ground truth resized into the same frame, over the valid (unpadded) region
//! only. Returns the loss and its gradient with respect to every logit.

/// The ground-truth target in the low-res logit frame: `[side, side]`, 1 inside, 0 outside and in
/// the padding. The logits' top-left `rh × rw` covers the resized image (`pipeline::Geometry`),
/// so each of those cells takes the nearest original pixel.
// gt: [h, w] 0/1; returns [side, side].
pub fn target_low_res(gt: &[u8], h: usize, w: usize, (rh, rw): (usize, usize), side: usize) -> Vec<f32> {
    let mut out = vec![0.0; side * side];
    for y in 0..rh.min(side) {
        let sy = (((y as f64 + 0.5) * h as f64 / rh as f64) as usize).min(h - 1);
        for x in 0..rw.min(side) {
            let sx = (((x as f64 + 0.5) * w as f64 / rw as f64) as usize).min(w - 1);
            out[y * side + x] = f32::from(gt[sy * w + sx] != 0);
        }
    }
    out
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// `BCE + (1 - soft Dice)` over the top-left `rh × rw` cells, and `d loss / d logits`
/// (zero in the padding).
// logits, target: [side, side].
pub fn bce_dice(logits: &[f32], target: &[f32], side: usize, (rh, rw): (usize, usize)) -> (f64, Vec<f32>) {
    const SMOOTH: f64 = 1.0;
    let cells = (0..rh.min(side)).flat_map(|y| (0..rw.min(side)).map(move |x| y * side + x));
    let n = (rh.min(side) * rw.min(side)).max(1) as f64;
    let (mut bce, mut inter, mut sum_p, mut sum_t) = (0.0, 0.0, 0.0, 0.0);
    for i in cells.clone() {
        let (z, t) = (logits[i] as f64, target[i] as f64);
        // softplus(z) - t·z, written to stay finite for large |z|.
        bce += z.max(0.0) - t * z + (-z.abs()).exp().ln_1p();
        let p = sigmoid(z);
        inter += p * t;
        sum_p += p;
        sum_t += t;
    }
    let num = 2.0 * inter + SMOOTH;
    let den = sum_p + sum_t + SMOOTH;
    let loss = bce / n + 1.0 - num / den;
    let mut grad = vec![0.0f32; logits.len()];
    for i in cells {
        let (z, t) = (logits[i] as f64, target[i] as f64);
        let p = sigmoid(z);
        let d_dice_dp = -(2.0 * t * den - num) / (den * den);
        grad[i] = ((p - t) / n + d_dice_dp * p * (1.0 - p)) as f32;
    }
    (loss, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences_and_padding_gets_none() {
        let side = 6;
        let mut r = crate::train::rng::Rng::new(3, 0);
        let logits: Vec<f32> = (0..side * side).map(|_| r.uniform(-4.0, 4.0) as f32).collect();
        let target: Vec<f32> = (0..side * side).map(|_| f32::from(r.coin())).collect();
        let valid = (4, 5);
        let (_, grad) = bce_dice(&logits, &target, side, valid);
        for i in 0..side * side {
            let h = 1e-3f32;
            let mut p = logits.clone();
            p[i] += h;
            let plus = bce_dice(&p, &target, side, valid).0;
            p[i] -= 2.0 * h;
            let minus = bce_dice(&p, &target, side, valid).0;
            let fd = (plus - minus) / (2.0 * h as f64);
            assert!((grad[i] as f64 - fd).abs() < 1e-5, "cell {i}: {} vs {fd}", grad[i]);
            if i / side >= 4 || i % side >= 5 {
                assert_eq!(grad[i], 0.0);
            }
        }
    }

    #[test]
    fn perfect_logits_have_low_loss_and_the_target_follows_the_geometry() {
        // 2 x 4 resized to 1 x 2 inside a 3 x 3 frame: cell (0, x) samples pixel (1, 2x + 1).
        let gt = [0u8, 0, 0, 0, 0, 1, 1, 0];
        let t = target_low_res(&gt, 2, 4, (1, 2), 3);
        assert_eq!(t, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let good: Vec<f32> = t.iter().map(|&v| if v > 0.5 { 20.0 } else { -20.0 }).collect();
        let bad: Vec<f32> = good.iter().map(|v| -v).collect();
        assert!(bce_dice(&good, &t, 3, (1, 2)).0 < 0.35);
        assert!(bce_dice(&bad, &t, 3, (1, 2)).0 > 10.0);
    }
}
