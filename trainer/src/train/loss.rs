//! Losses on the decoder's low-resolution mask logits, over the valid (unpadded) region only, each
//! returned with its gradient with respect to every logit:
//! - training: binary cross-entropy plus soft Dice against the ground truth resized into the same
//!   frame;
//! - distillation: the per-cell binary KL divergence from a teacher's mask probabilities.

/// The ground-truth target in the low-res logit frame: `[side, side]`, 1 inside, 0 outside and in
/// the padding. The logits' top-left `rh × rw` covers the resized image
/// (`pipeline::Geometry::low_res_region`), so each of those cells takes the nearest original pixel.
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

/// `ln(1 + e^z)`, finite for any `z`.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
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
        bce += softplus(z) - t * z;
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

/// Mean over the top-left `rh × rw` cells of `KL(Bernoulli(σ(t)) ‖ Bernoulli(σ(s)))`, student
/// logits `s` against teacher logits `t`, and `d loss / d s = (σ(s) − σ(t)) / n` (zero in the
/// padding). Zero exactly when the student's mask probabilities equal the teacher's.
// student, teacher: [side, side].
pub fn binary_kl(student: &[f32], teacher: &[f32], side: usize, (rh, rw): (usize, usize)) -> (f64, Vec<f32>) {
    let (rows, cols) = (rh.min(side), rw.min(side));
    let n = (rows * cols).max(1) as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0f32; student.len()];
    for y in 0..rows {
        for i in y * side..y * side + cols {
            let (s, t) = (student[i] as f64, teacher[i] as f64);
            let p = sigmoid(t);
            // ln σ(z) = −softplus(−z), ln(1 − σ(z)) = −softplus(z): no log of a rounded 0.
            let cross = p * softplus(-s) + (1.0 - p) * softplus(s);
            let entropy = p * softplus(-t) + (1.0 - p) * softplus(t);
            loss += cross - entropy;
            grad[i] = ((sigmoid(s) - p) / n) as f32;
        }
    }
    (loss / n, grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_kl_is_zero_at_the_teacher_and_its_gradient_matches_finite_differences() {
        let side = 3;
        let teacher = [2.0f32, -1.0, 0.5, 30.0, -30.0, 0.0, 9.0, 9.0, 9.0];
        let student = [0.5f32, 1.0, -2.0, -3.0, 4.0, 0.25, 7.0, 7.0, 7.0];
        let region = (2, 3);
        assert_eq!(binary_kl(&teacher, &teacher, side, region).0, 0.0);
        let (loss, grad) = binary_kl(&student, &teacher, side, region);
        assert!(loss > 0.0 && loss.is_finite(), "{loss}");
        assert!(grad[6..].iter().all(|&g| g == 0.0), "the last row is padding: {grad:?}");
        for i in 0..6 {
            let h = 1e-3f32;
            let (mut up, mut down) = (student, student);
            up[i] += h;
            down[i] -= h;
            // The step actually taken: s ± h rounded to f32.
            let fd = (binary_kl(&up, &teacher, side, region).0 - binary_kl(&down, &teacher, side, region).0) / (up[i] as f64 - down[i] as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-5, "cell {i}: fd {fd}, analytic {}", grad[i]);
        }
        // One cell by hand: p = σ(2), q = σ(0.5), KL = p ln(p/q) + (1−p) ln((1−p)/(1−q)), over 6 cells.
        let (p, q) = (sigmoid(2.0), sigmoid(0.5));
        let kl0 = p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln();
        let (one, _) = binary_kl(&[0.5, 2.0, 2.0, 2.0], &[2.0, 2.0, 2.0, 2.0], 2, (2, 2));
        assert!((one - kl0 / 4.0).abs() < 1e-12, "{one} vs {}", kl0 / 4.0);
    }

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
