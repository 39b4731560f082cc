//! Prompts as they cross the bus (`a(dddd)` boxes, `a(ddu)` points), turned into fixed-capacity
//! lists on arrival: a request can never carry more than the engine accepts, and the worker
//! copies them into one reused `Prompts` without allocating.

use minisam_models::prompt::{BoxPrompt, Point, PointLabel, Prompts, MAX_POINTS};

use crate::error::{Error, Result};

/// SAM's decoder takes one box per prompt set.
pub const MAX_BOXES: usize = 1;

pub type WireBox = (f64, f64, f64, f64);
pub type WirePoint = (f64, f64, u32);

#[derive(Clone, Debug, Default)]
pub struct PromptSet {
    pub boxes: heapless::Vec<BoxPrompt, MAX_BOXES>,
    pub points: heapless::Vec<Point, MAX_POINTS>,
}

/// f64 from the wire to the engine's f32; a finite value beyond f32's range becomes infinite
/// and is refused by validation like a NaN.
fn coord(v: f64) -> f32 {
    v as f32
}

impl PromptSet {
    /// Builds the prompts (at most one box and `MAX_POINTS` points, labels 0 = background or
    /// 1 = foreground) and, when the frame size is known (`Some((width, height))`), validates
    /// them against it: finite, inside the frame, corners ordered. Without a size (re-prompting
    /// a cached frame) the worker's decoder validates them against the cached frame.
    pub fn from_wire(boxes: &[WireBox], points: &[WirePoint], frame: Option<(usize, usize)>) -> Result<Self> {
        let mut set = PromptSet::default();
        for &(x0, y0, x1, y1) in boxes {
            // A box with no area (a click read as a box, a drag of zero length) gives the
            // decoder nothing to segment; refuse it whether or not the frame size is known.
            // `!(a < b)` also refuses NaN, which validation below names again in words.
            if !(x0 < x1 && y0 < y1) && [x0, y0, x1, y1].iter().all(|v| v.is_finite()) {
                return Err(Error::InvalidPrompt(format!(
                    "box ({x0}, {y0}, {x1}, {y1}) has no area or is inverted: x1 must exceed x0 and y1 must exceed y0"
                )));
            }
            set.boxes
                .push(BoxPrompt { x0: coord(x0), y0: coord(y0), x1: coord(x1), y1: coord(y1) })
                .map_err(|_| Error::InvalidPrompt(format!("{} boxes given; at most {MAX_BOXES} per request", boxes.len())))?;
        }
        for &(x, y, label) in points {
            let label = match label {
                0 => PointLabel::Background,
                1 => PointLabel::Foreground,
                other => return Err(Error::InvalidPrompt(format!("point label {other}: use 1 (foreground) or 0 (background)"))),
            };
            set.points
                .push(Point { x: coord(x), y: coord(y), label })
                .map_err(|_| Error::InvalidPrompt(format!("{} points given; at most {MAX_POINTS} per request", points.len())))?;
        }
        if let Some((width, height)) = frame {
            let mut scratch = Prompts::default();
            set.fill(&mut scratch);
            scratch.validate(width, height).map_err(|e| Error::InvalidPrompt(e.to_string()))?;
        }
        Ok(set)
    }

    /// Writes these prompts into `out`, reusing its allocations.
    pub fn fill(&self, out: &mut Prompts) {
        out.boxes.clear();
        out.boxes.extend_from_slice(&self.boxes);
        out.points.clear();
        out.points.extend_from_slice(&self.points);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_prompts_are_named_errors() {
        let ok = PromptSet::from_wire(&[(1.0, 1.0, 5.0, 5.0)], &[(2.0, 2.0, 1)], Some((10, 10))).unwrap();
        assert_eq!((ok.boxes.len(), ok.points.len()), (1, 1));
        let bad = |b: &[WireBox], p: &[WirePoint]| matches!(PromptSet::from_wire(b, p, Some((10, 10))), Err(Error::InvalidPrompt(_)));
        assert!(bad(&[(f64::NAN, 1.0, 5.0, 5.0)], &[]));
        assert!(bad(&[(1.0, 1.0, 1e300, 5.0)], &[]), "beyond f32 range");
        assert!(bad(&[(1.0, 1.0, 5.0, 5.0), (1.0, 1.0, 5.0, 5.0)], &[]), "two boxes");
        assert!(bad(&[], &vec![(1.0, 1.0, 1); MAX_POINTS + 1]), "too many points");
        assert!(bad(&[], &[(1.0, 1.0, 2)]), "bad label");
        assert!(bad(&[], &[(11.0, 1.0, 1)]), "outside");
        assert!(bad(&[], &[]), "no prompt");
        assert!(bad(&[(3.0, 1.0, 3.0, 5.0)], &[]), "zero width");
        assert!(bad(&[(1.0, 4.0, 5.0, 4.0)], &[]), "zero height");
        assert!(matches!(PromptSet::from_wire(&[(3.0, 3.0, 3.0, 3.0)], &[], None), Err(Error::InvalidPrompt(m)) if m.contains("no area")), "refused without a frame size too");
    }
}
