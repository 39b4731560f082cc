//! The micro-kernel in plain Rust: the fallback on CPUs without a wider build, and the shape
//! every platform's tests exercise. The fixed-size arrays let the compiler keep the tile in
//! (baseline SSE2 / NEON) registers.

/// Tile rows and columns (8 accumulators of 4 lanes per row pair on SSE2).
pub(crate) const MR: usize = 4;
pub(crate) const NR: usize = 8;

/// See [`super::run`].
// a: [kc][MR]; b: [kc][NR]; c: MR rows of NR with stride ldc.
#[inline(never)]
pub(crate) unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    let mut acc = [[0.0f32; NR]; MR];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(std::slice::from_raw_parts(c.add(i * ldc), NR));
        }
    }
    let a = std::slice::from_raw_parts(a, kc * MR);
    let b = std::slice::from_raw_parts(b, kc * NR);
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += av[i] * bv[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        std::slice::from_raw_parts_mut(c.add(i * ldc), NR).copy_from_slice(row);
    }
}
