//! Images and masks as the segmentation API sees them: original pixel resolution, host memory.

use crate::{Error, Result};

/// An interleaved 8-bit RGB image, the protocol's "3-channel uint8" (grey is replicated, 16-bit is
/// min-max scaled by the reader before it gets here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes, row-major, RGB.
    pub data: Vec<u8>,
}

/// The largest side accepted: beyond this an image is not a medical frame but a mistake, and the
/// resize buffers would be unbounded.
pub const MAX_IMAGE_SIDE: usize = 8192;

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
            return Err(Error::Input(format!("image size {width}x{height} outside 1..={MAX_IMAGE_SIDE} per side")));
        }
        if data.len() != width * height * 3 {
            return Err(Error::Input(format!("RGB image {width}x{height} needs {} bytes, got {}", width * height * 3, data.len())));
        }
        Ok(Self { width, height, data })
    }

    /// Replicates a grey image to three channels.
    pub fn from_grey(width: usize, height: usize, grey: &[u8]) -> Result<Self> {
        if grey.len() != width * height {
            return Err(Error::Input(format!("grey image {width}x{height} needs {} bytes, got {}", width * height, grey.len())));
        }
        Self::new(width, height, grey.iter().flat_map(|&g| [g, g, g]).collect())
    }
}

/// A binary mask at the original image resolution: 1 inside, 0 outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Mask {
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }
}
