//! A borrowed weight matrix in whatever precision it is stored in. Kernels never ask for the
//! whole matrix in f32: they dequantise the tile they are about to use with
//! [`MatrixRef::dequantize_range`].

use crate::nf4::{self, Nf4View};

#[derive(Clone, Copy, Debug)]
pub enum MatrixRef<'a> {
    F32(&'a [f32]),
    /// IEEE fp16, little-endian, two bytes per element.
    F16(&'a [u8]),
    Nf4(Nf4View<'a>),
}

impl MatrixRef<'_> {
    /// Writes elements `start .. start + out.len()` (flattened row-major) into `out` as f32.
    #[inline]
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        match self {
            MatrixRef::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            MatrixRef::F16(bytes) => {
                let src = &bytes[2 * start..2 * (start + out.len())];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            MatrixRef::Nf4(q) => nf4::dequantize(q, start, out),
        }
    }
}
