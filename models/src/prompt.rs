//! Prompts in original image pixel coordinates, validated before they reach a network: a NaN or
//! a box far outside the frame is a client error, reported as such.

use crate::{Error, Result};

/// Label of a point prompt, as SAM encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointLabel {
    Background = 0,
    Foreground = 1,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f32,
    pub y: f32,
    pub label: PointLabel,
}

/// `[x0, y0, x1, y1]` in pixels, inclusive corners as in the evaluation protocol.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxPrompt {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// At most one box (SAM's decoder takes one box per prompt set) and a bounded number of points.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompts {
    pub boxes: Vec<BoxPrompt>,
    pub points: Vec<Point>,
}

/// Points per prompt set: SAM was trained with at most a few dozen clicks; more is a client bug.
pub const MAX_POINTS: usize = 64;

impl Prompts {
    pub fn with_box(b: BoxPrompt) -> Self {
        Self { boxes: vec![b], points: Vec::new() }
    }

    /// Checks the prompts against an image of `width` x `height`: finite, at most one box and
    /// [`MAX_POINTS`] points, coordinates inside the frame (a margin of one image size is allowed
    /// for boxes dragged past the edge; they are clipped), corners ordered.
    pub fn validate(&self, width: usize, height: usize) -> Result<()> {
        if self.boxes.is_empty() && self.points.is_empty() {
            return Err(Error::Input("no prompt: give a box or at least one point".into()));
        }
        if self.boxes.len() > 1 {
            return Err(Error::Input(format!("{} boxes given; one box per request", self.boxes.len())));
        }
        if self.points.len() > MAX_POINTS {
            return Err(Error::Input(format!("{} points given; at most {MAX_POINTS}", self.points.len())));
        }
        let (w, h) = (width as f32, height as f32);
        for b in &self.boxes {
            let c = [b.x0, b.y0, b.x1, b.y1];
            if c.iter().any(|v| !v.is_finite()) {
                return Err(Error::Input(format!("box {c:?} has a non-finite coordinate")));
            }
            if b.x0 > b.x1 || b.y0 > b.y1 {
                return Err(Error::Input(format!("box {c:?}: need x0 <= x1 and y0 <= y1")));
            }
            if b.x1 < 0.0 || b.y1 < 0.0 || b.x0 > w - 1.0 || b.y0 > h - 1.0 {
                return Err(Error::Input(format!("box {c:?} lies outside the {width}x{height} image")));
            }
        }
        for p in &self.points {
            if !p.x.is_finite() || !p.y.is_finite() {
                return Err(Error::Input(format!("point ({}, {}) has a non-finite coordinate", p.x, p.y)));
            }
            if p.x < 0.0 || p.y < 0.0 || p.x > w - 1.0 || p.y > h - 1.0 {
                return Err(Error::Input(format!("point ({}, {}) lies outside the {width}x{height} image", p.x, p.y)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(x0: f32, y0: f32, x1: f32, y1: f32) -> Prompts {
        Prompts::with_box(BoxPrompt { x0, y0, x1, y1 })
    }

    #[test]
    fn accepts_a_box_inside_the_image() {
        bx(10.0, 20.0, 30.0, 40.0).validate(100, 100).unwrap();
    }

    #[test]
    fn rejects_nan_inverted_outside_and_empty() {
        assert!(bx(f32::NAN, 0.0, 1.0, 1.0).validate(10, 10).is_err());
        assert!(bx(5.0, 0.0, 1.0, 1.0).validate(10, 10).is_err());
        assert!(bx(20.0, 20.0, 30.0, 30.0).validate(10, 10).is_err());
        assert!(Prompts::default().validate(10, 10).is_err());
        let p = Prompts { boxes: vec![], points: vec![Point { x: 11.0, y: 1.0, label: PointLabel::Foreground }] };
        assert!(p.validate(10, 10).is_err());
        let many = Prompts { boxes: vec![], points: vec![Point { x: 1.0, y: 1.0, label: PointLabel::Background }; MAX_POINTS + 1] };
        assert!(many.validate(10, 10).is_err());
    }
}
