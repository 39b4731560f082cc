//! AVX-512 micro-kernel: 12 rows × 32 columns, 24 zmm accumulators + 2 B registers + the
//! broadcasts (of 32 zmm). Twelve rows amortise each pair of B loads over 24 FMAs, enough to
//! keep two 512-bit FMA pipes busy from L1.

use std::arch::x86_64::*;

pub(crate) const MR: usize = 12;
pub(crate) const NR: usize = 32;

/// See [`super::run`].
// a: [kc][MR]; b: [kc][NR]; c: MR rows of NR with stride ldc.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    if accumulate {
        for i in 0..MR {
            lo[i] = _mm512_loadu_ps(c.add(i * ldc));
            hi[i] = _mm512_loadu_ps(c.add(i * ldc + 16));
        }
    }
    for p in 0..kc {
        let b_lo = _mm512_loadu_ps(b.add(p * NR));
        let b_hi = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for i in 0..MR {
            let av = _mm512_set1_ps(*ap.add(i));
            lo[i] = _mm512_fmadd_ps(av, b_lo, lo[i]);
            hi[i] = _mm512_fmadd_ps(av, b_hi, hi[i]);
        }
    }
    for i in 0..MR {
        _mm512_storeu_ps(c.add(i * ldc), lo[i]);
        _mm512_storeu_ps(c.add(i * ldc + 16), hi[i]);
    }
}
