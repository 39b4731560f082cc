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
            MatrixRef::F16(bytes) => f16_to_f32(&bytes[2 * start..2 * (start + out.len())], out),
            MatrixRef::Nf4(q) => nf4::dequantize(q, start, out),
        }
    }
}

/// fp16 (little-endian pairs of bytes) to f32. Every fp16 value is exactly an f32, so the
/// hardware conversion (F16C's `vcvtph2ps`, eight at a time, on every x86-64 with AVX2) and
/// the software one give the same bits; the hardware is over ten times faster, which matters
/// because the packed TinyViT and decoder weights are fp16 and each call dequantises the ones
/// it uses (about ten million values per LiteMedSAM frame).
// src: 2 * out.len() bytes.
fn f16_to_f32(src: &[u8], out: &mut [f32]) {
    debug_assert_eq!(src.len(), 2 * out.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (and the AVX it implies) was just detected; the lengths match.
        unsafe { f16_to_f32_f16c(src, out) };
        return;
    }
    f16_to_f32_portable(src, out);
}

// src: 2 * out.len() bytes.
fn f16_to_f32_portable(src: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// [`f16_to_f32`] with F16C.
///
/// # Safety
/// The CPU must support F16C and AVX; `src` holds `2 * out.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let whole = out.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= out.len(), so 16 bytes at 2i are inside src; loadu needs no alignment.
        let halves = unsafe { _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i) };
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(halves)) };
    }
    f16_to_f32_portable(&src[2 * whole..], &mut out[whole..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one of the 65 536 fp16 bit patterns (NaNs included, compared by bits), at every
    /// tail length of the eight-wide loop, converts to the same f32 bits as the software path.
    #[test]
    fn f16_conversion_matches_software_on_every_value() {
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let mut software = vec![0.0f32; 1 << 16];
        f16_to_f32_portable(&bytes, &mut software);
        let mut converted = vec![f32::NAN; 1 << 16];
        f16_to_f32(&bytes, &mut converted);
        let first_diff = software.iter().zip(&converted).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(first_diff.is_none(), "pattern {first_diff:?}");
        for tail in 0..9 {
            let mut out = vec![f32::NAN; 24 + tail];
            MatrixRef::F16(&bytes).dequantize_range(1000, &mut out);
            assert!(out.iter().zip(&software[1000..]).all(|(a, b)| a.to_bits() == b.to_bits()), "tail {tail}");
        }
    }
}
