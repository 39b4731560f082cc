//! Matrix transposes for layout changes (NCHW <-> NHWC, packing GEMM operands).
//!
//! The portable path copies 32x32 tiles element by element; with AVX-512 a 16x16 block is loaded
//! as 16 rows, transposed in registers (`avx512::transpose16`, 64 shuffles) and stored as 16
//! rows, so both sides move a whole cache line per instruction instead of one float. Ragged edges
//! use masked loads and stores.

use crate::simd::{self, Isa};

/// `dst[c * ld_dst + r] = src[r * ld_src + c]` for `r < rows`, `c < cols`; nothing else of `dst`
/// is written.
// src: rows rows of ld_src floats (the last may end after `cols`); dst: cols rows of ld_dst.
pub fn transpose_block(src: &[f32], ld_src: usize, dst: &mut [f32], ld_dst: usize, rows: usize, cols: usize) {
    transpose_block_at(simd::active(), src, ld_src, dst, ld_dst, rows, cols);
}

/// [`transpose_block`] at a given SIMD level (one `simd::supported` lists).
// Shapes as in `transpose_block`.
pub(crate) fn transpose_block_at(isa: Isa, src: &[f32], ld_src: usize, dst: &mut [f32], ld_dst: usize, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(cols <= ld_src && src.len() >= (rows - 1) * ld_src + cols, "transpose: src too short");
    assert!(rows <= ld_dst && dst.len() >= (cols - 1) * ld_dst + rows, "transpose: dst too short");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: the level is supported (caller's contract) and the asserts bound every access.
        unsafe { avx512::transpose_block(src.as_ptr(), ld_src, dst.as_mut_ptr(), ld_dst, rows, cols) };
        return;
    }
    let _ = isa;
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                let out = &mut dst[c * ld_dst..];
                for r in r0..(r0 + TILE).min(rows) {
                    out[r] = src[r * ld_src + c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// Lanes `0..n` set (`n <= 16`).
    #[inline]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Transposes the 16x16 matrix held as 16 row registers: afterwards `r[j]` holds column `j`.
    ///
    /// Three rounds: interleaving pairs of rows gives, per 128-bit block k, 2x2 pieces; 64-bit
    /// interleaves of those give `u[g][c]`, whose block k is column `4k + c` of rows `4g..4g+4`;
    /// two rounds of 128-bit block shuffles then gather the four row groups of each column.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose16(r: &mut [__m512; 16]) {
        let mut u = [[_mm512_setzero_ps(); 4]; 4];
        for g in 0..4 {
            let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
            let (t0, t1) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let (t2, t3) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            let pd = |x: __m512| _mm512_castps_pd(x);
            u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
            u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
            u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
            u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
        }
        for c in 0..4 {
            // Blocks 0,1 (lo) or 2,3 (hi) of row groups 0,1 (v) and 2,3 (w).
            let v_lo = _mm512_shuffle_f32x4::<0x44>(u[0][c], u[1][c]);
            let v_hi = _mm512_shuffle_f32x4::<0xEE>(u[0][c], u[1][c]);
            let w_lo = _mm512_shuffle_f32x4::<0x44>(u[2][c], u[3][c]);
            let w_hi = _mm512_shuffle_f32x4::<0xEE>(u[2][c], u[3][c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(v_lo, w_lo);
            r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(v_lo, w_lo);
            r[8 + c] = _mm512_shuffle_f32x4::<0x88>(v_hi, w_hi);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v_hi, w_hi);
        }
    }

    /// See [`super::transpose_block`], in 16x16 register blocks.
    ///
    /// # Safety
    /// AVX-512F; `src` readable and `dst` writable over the extents `transpose_block` asserts.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose_block(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize, rows: usize, cols: usize) {
        let mut r = [_mm512_setzero_ps(); 16];
        for r0 in (0..rows).step_by(16) {
            let h = 16.min(rows - r0);
            for c0 in (0..cols).step_by(16) {
                let w = 16.min(cols - c0);
                for (i, reg) in r.iter_mut().enumerate() {
                    *reg = if i >= h {
                        _mm512_setzero_ps()
                    } else if w == 16 {
                        _mm512_loadu_ps(src.add((r0 + i) * ld_src + c0))
                    } else {
                        _mm512_maskz_loadu_ps(lanes(w), src.add((r0 + i) * ld_src + c0))
                    };
                }
                transpose16(&mut r);
                for (j, reg) in r.iter().enumerate().take(w) {
                    let out = dst.add((c0 + j) * ld_dst + r0);
                    if h == 16 {
                        _mm512_storeu_ps(out, *reg);
                    } else {
                        _mm512_mask_storeu_ps(out, lanes(h), *reg);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every supported level against the definition, on shapes with 16-remainders in both
    /// directions and strides wider than the block; what lies outside the block stays untouched.
    #[test]
    fn transpose_block_matches_definition_at_every_level() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let mut shapes = vec![(1, 1), (16, 16), (17, 15), (3, 40), (40, 3), (33, 48), (64, 64)];
        for _ in 0..8 {
            shapes.push((rng.gen_range(1..70), rng.gen_range(1..70)));
        }
        for (rows, cols) in shapes {
            let (ld_src, ld_dst) = (cols + rng.gen_range(0..3), rows + rng.gen_range(0..3));
            let src: Vec<f32> = (0..rows * ld_src).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for isa in simd::supported() {
                let mut dst = vec![f32::NAN; cols * ld_dst];
                transpose_block_at(isa, &src, ld_src, &mut dst, ld_dst, rows, cols);
                for c in 0..cols {
                    for r in 0..ld_dst {
                        let got = dst[c * ld_dst + r];
                        if r < rows {
                            assert_eq!(got, src[r * ld_src + c], "{isa:?} {rows}x{cols}: ({c}, {r})");
                        } else {
                            assert!(got.is_nan(), "{isa:?} {rows}x{cols}: wrote past the block at ({c}, {r})");
                        }
                    }
                }
            }
        }
    }
}
