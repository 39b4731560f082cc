//! AVX2+FMA micro-kernel: 6 rows × 16 columns, 12 ymm accumulators + 2 B registers + 1
//! broadcast (15 of 16 ymm), the classic shape for 16 registers and two FMA ports.

use std::arch::x86_64::*;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;

/// See [`super::run`].
// a: [kc][MR]; b: [kc][NR]; c: MR rows of NR with stride ldc.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut lo = [_mm256_setzero_ps(); MR];
    let mut hi = [_mm256_setzero_ps(); MR];
    if accumulate {
        for i in 0..MR {
            lo[i] = _mm256_loadu_ps(c.add(i * ldc));
            hi[i] = _mm256_loadu_ps(c.add(i * ldc + 8));
        }
    }
    for p in 0..kc {
        let b_lo = _mm256_loadu_ps(b.add(p * NR));
        let b_hi = _mm256_loadu_ps(b.add(p * NR + 8));
        let ap = a.add(p * MR);
        for i in 0..MR {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            lo[i] = _mm256_fmadd_ps(av, b_lo, lo[i]);
            hi[i] = _mm256_fmadd_ps(av, b_hi, hi[i]);
        }
    }
    for i in 0..MR {
        _mm256_storeu_ps(c.add(i * ldc), lo[i]);
        _mm256_storeu_ps(c.add(i * ldc + 8), hi[i]);
    }
}
