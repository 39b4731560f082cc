//! The protocol's metric: Dice = 2|P∩G| / (|P|+|G|), 1.0 when both masks are empty.

use anyhow::{bail, Result};

/// Dice of a predicted binary mask (non-zero = inside) against `labels == label`.
pub fn dice(pred: &[u8], labels: &[u16], label: u16) -> Result<f64> {
    if pred.len() != labels.len() {
        bail!(
            "predicted mask has {} pixels, ground truth {}",
            pred.len(),
            labels.len()
        );
    }
    let (mut p, mut g, mut both) = (0usize, 0usize, 0usize);
    for (&m, &l) in pred.iter().zip(labels) {
        let (pi, gi) = (m != 0, l == label);
        p += usize::from(pi);
        g += usize::from(gi);
        both += usize::from(pi && gi);
    }
    Ok(if p + g == 0 {
        1.0
    } else {
        2.0 * both as f64 / (p + g) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_cases() {
        assert_eq!(dice(&[0, 0], &[0, 0], 1).unwrap(), 1.0, "both empty");
        assert_eq!(dice(&[1, 0], &[0, 0], 1).unwrap(), 0.0, "empty truth");
        assert_eq!(dice(&[0, 0], &[1, 0], 1).unwrap(), 0.0, "empty prediction");
        assert_eq!(
            dice(&[1, 255], &[2, 2], 2).unwrap(),
            1.0,
            "any non-zero is inside"
        );
        // P = {0,1}, G = {1,2}: 2*1/(2+2)
        assert_eq!(dice(&[1, 1, 0], &[0, 3, 3], 3).unwrap(), 0.5);
        // other labels are background for this target
        assert_eq!(dice(&[1, 1], &[1, 2], 1).unwrap(), 2.0 / 3.0);
        assert!(dice(&[1], &[1, 1], 1).is_err());
    }
}
