//! Window partitioning shared by the windowed attentions of SAM's ViT and of TinyViT: both tile
//! an NHWC grid into `window x window` windows after zero-padding bottom and right, attend inside
//! each window, and put the windows back (the references' `window_partition` /
//! `window_unpartition`).

use crate::backend::Backend;
use crate::{Error, Result};

/// `(B, H, W, C)` of a 4-D NHWC tensor (or `(BH, h, w, D)` of a per-head query grid).
pub(crate) fn nhwc_dims<B: Backend>(b: &B, x: &B::Tensor) -> Result<(usize, usize, usize, usize)> {
    match *b.shape(x) {
        [n, h, w, c] => Ok((n, h, w, c)),
        ref other => Err(Error::Shape(format!("expected a 4-D [B, H, W, C] tensor, got {other:?}"))),
    }
}

/// How an `H x W` grid is tiled by `window x window` windows after bottom/right zero padding.
pub(crate) struct WindowGrid {
    batch: usize,
    height: usize,
    width: usize,
    window: usize,
    windows_down: usize,
    windows_across: usize,
}

impl WindowGrid {
    /// The tiling of a `[batch, height, width, C]` grid by `window x window` windows.
    pub(crate) fn new(batch: usize, height: usize, width: usize, window: usize) -> Self {
        Self { batch, height, width, window, windows_down: height.div_ceil(window), windows_across: width.div_ceil(window) }
    }

    fn padded_height(&self) -> usize {
        self.windows_down * self.window
    }

    fn padded_width(&self) -> usize {
        self.windows_across * self.window
    }

    /// `x: [B, H, W, C]` → `[B·nH·nW, ws·ws, C]`, windows in row-major order, as the references'
    /// `view(B, nH, ws, nW, ws, C).permute(0, 1, 3, 2, 4, 5)`. `x` is left as it is: both
    /// callers still need it for the residual.
    pub(crate) fn partition<B: Backend>(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let channels = b.shape(x)[3];
        let (pad_h, pad_w) = (self.padded_height() - self.height, self.padded_width() - self.width);
        let padded = if pad_h > 0 || pad_w > 0 { b.pad_hw(x, pad_h, pad_w)? } else { b.permute(x, &[0, 1, 2, 3])? };
        let ws = self.window;
        let tiles = b.reshape(padded, &[self.batch, self.windows_down, ws, self.windows_across, ws, channels])?;
        let grouped = b.permute(&tiles, &[0, 1, 3, 2, 4, 5])?;
        b.reshape(grouped, &[self.batch * self.windows_down * self.windows_across, ws * ws, channels])
    }

    /// Inverse of [`Self::partition`]: `[B·nH·nW, ws·ws, C]` → `[B, H, W, C]`, padding dropped.
    pub(crate) fn merge<B: Backend>(&self, b: &B, windows: B::Tensor) -> Result<B::Tensor> {
        let channels = b.shape(&windows)[2];
        let ws = self.window;
        let tiles = b.reshape(windows, &[self.batch, self.windows_down, self.windows_across, ws, ws, channels])?;
        let rows = b.permute(&tiles, &[0, 1, 3, 2, 4, 5])?;
        let padded = b.reshape(rows, &[self.batch, self.padded_height(), self.padded_width(), channels])?;
        let cropped = if self.padded_height() > self.height { b.narrow(&padded, 1, 0, self.height)? } else { padded };
        if self.padded_width() > self.width {
            b.narrow(&cropped, 2, 0, self.width)
        } else {
            Ok(cropped)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_pad_up_to_whole_windows() {
        // SAM ViT: 64x64 tokens in 14x14 windows; MobileSAM's TinyViT stage 1: 128x128 in 7x7.
        let grid = WindowGrid::new(1, 64, 64, 14);
        assert_eq!((grid.windows_down, grid.padded_height()), (5, 70));
        let grid = WindowGrid::new(1, 128, 128, 7);
        assert_eq!((grid.windows_across, grid.padded_width()), (19, 133));
        let exact = WindowGrid::new(2, 28, 14, 14);
        assert_eq!((exact.windows_down, exact.windows_across, exact.padded_height(), exact.padded_width()), (2, 1, 28, 14));
    }
}
