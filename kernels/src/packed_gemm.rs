//! The blocked GEMM driver shared by `linear` and the convolutions: `C = A · B`, then a per-row
//! epilogue, on the register micro-kernels of `crate::microkernel`.
//!
//! Layout (the GotoBLAS/BLIS scheme, written for our shapes): the output is cut into tasks of
//! [`MC`] rows × a chunk of columns, spread over the rayon pool. A task walks `k` in steps of
//! [`KC`]; for each step it copies its rows of A into `[kc][MR]` panels (L2-resident) and uses B
//! as `[kc][NR]` panels, either packed once for the whole call (a weight, shared by every task)
//! or packed by the task itself from a row-major `[k, n]` matrix (a convolution's input, which is
//! far larger than the weight, so each task packs only the columns it computes). The epilogue
//! runs on each finished row segment while it is still in cache.
//!
//! All scratch is thread-local and reused, so after the first frame of a given geometry a call
//! allocates nothing (a fresh multi-megabyte buffer per call cost a quarter of the encoder's time
//! in page faults and `munmap`).

use std::cell::RefCell;

use rayon::prelude::*;

use crate::microkernel::{self, TileShape, MAX_TILE};
use crate::simd::Isa;
use crate::weights::MatrixRef;

/// Depth of one pass over `k`: a `[KC][NR]` B panel (32 KiB at NR = 32) stays in L1 while the
/// A panels stream past it.
pub(crate) const KC: usize = 256;
/// Rows of one task: a multiple of every kernel's MR (4, 6, 8, 12).
const MC: usize = 96;
/// Target columns of one task (rounded to a multiple of NR).
const NC: usize = 384;
/// Most rows one task takes when B is packed per task: its A panels for one `KC` pass are then
/// at most 256 KiB, inside the L2 of every machine this runs on.
const WHOLE_A_ROWS: usize = 256;

/// The right-hand operand.
#[derive(Clone, Copy)]
pub(crate) enum BOperand<'a> {
    /// Packed for the whole matrix by [`pack_b_transposed`]: `[n.div_ceil(nr)][k][nr]`.
    Packed(&'a [f32]),
    /// Row-major `[k, n]`: element `(p, j)` at `data[p * ldb + j]`.
    RowMajor { data: &'a [f32], ldb: usize },
}

/// The epilogue: called once per output row segment when its sums are final, with the row, the
/// first column and the segment `c[row, col0..col0 + len]`.
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// The output pointer shared by tasks that write disjoint rectangles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

thread_local! {
    /// A task's packed A and (for row-major B) packed B panels.
    static TASK_PANELS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Grows `v` to at least `len` elements (never shrinks: the buffer is reused call after call).
fn ensure_len(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// `C[m, n] = A[m, k] · B[k, n]`, then `epilogue` on every row segment.
// a: element (i, p) at a[i * lda + p]; c: element (i, j) at c[i * ldc + j], c.len() >= (m-1)*ldc + n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(isa: Isa, m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: BOperand, c: &mut [f32], ldc: usize, epilogue: Epilogue) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: C too short");
    assert!(k == 0 || a.len() >= (m - 1) * lda + k, "gemm: A too short");
    let TileShape { mr, nr } = microkernel::tile_shape(isa);
    match b {
        BOperand::Packed(p) => assert!(p.len() >= n.div_ceil(nr) * k * nr, "gemm: packed B too short"),
        BOperand::RowMajor { data, ldb } => assert!(k == 0 || data.len() >= (k - 1) * ldb + n, "gemm: B too short"),
    }
    let threads = rayon::current_num_threads().max(1);
    // Rows per task: MC, or fewer when there are few rows and few column chunks, so that every
    // thread gets work.
    // A row-major B is packed by each task for its columns, so every row task of a column chunk
    // packs the same panels again. With few rows (a convolution's output channels, at most
    // `WHOLE_A_ROWS`) one task takes all of them, and the columns are cut finer instead so that
    // every thread still gets work (a 3x3 convolution of 256 channels at 64x64 packed its 2304 x
    // 4096 im2col columns three times: about 14 % of its time, benches/RESULTS.md).
    let whole_a = matches!(b, BOperand::RowMajor { .. }) && m <= WHOLE_A_ROWS;
    let col_chunk = if whole_a { n.div_ceil(4 * threads).div_ceil(nr).clamp(1, NC / nr) * nr } else { NC.div_ceil(nr) * nr };
    let col_chunks = n.div_ceil(col_chunk);
    let wanted_row_tasks = (4 * threads).div_ceil(col_chunks);
    let rows_per_task = if whole_a { m.div_ceil(mr) * mr } else { m.div_ceil(wanted_row_tasks).div_ceil(mr).clamp(1, MC / mr) * mr };
    let row_tasks = m.div_ceil(rows_per_task);
    let out = SharedOut(c.as_mut_ptr());
    let run_all = |a_packed: Option<&[f32]>| {
        let task = |t: usize| {
            let (rt, ct) = (t % row_tasks, t / row_tasks);
            let rows = rt * rows_per_task..((rt + 1) * rows_per_task).min(m);
            let cols = ct * col_chunk..((ct + 1) * col_chunk).min(n);
            let a = match a_packed {
                Some(p) => AOperand::Packed { data: p, padded_rows: m.div_ceil(mr) * mr },
                None => AOperand::RowMajor { data: a, lda },
            };
            // SAFETY: tasks write disjoint rectangles of C, which outlives the loop; the asserts
            // above bound every read.
            unsafe { run_task(isa, TileShape { mr, nr }, k, a, b, out, ldc, rows, cols, epilogue) };
        };
        let tasks = row_tasks * col_chunks;
        if tasks == 1 {
            task(0);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    };
    // Several column chunks read the same rows of A (a convolution's weight against thousands
    // of pixels): pack A once for all of them instead of once per task, which for small `k`
    // cost as much as the product itself.
    // (Where the kernel reads A in place there is nothing to pack.)
    let padded_rows = m.div_ceil(mr) * mr;
    if col_chunks > 1 && padded_rows * k <= PREPACK_A_FLOATS && !microkernel::reads_row_major_a(isa) {
        A_PACKED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                ensure_len(&mut buf, padded_rows * k);
                prepack_a(isa, a, lda, m, k, mr, &mut buf[..padded_rows * k]);
                run_all(Some(&buf[..padded_rows * k]));
            }
            Err(_) => run_all(None),
        });
    } else {
        run_all(None);
    }
}

/// Bound on a whole-matrix packed A, in floats (16 MiB).
const PREPACK_A_FLOATS: usize = 4 << 20;

thread_local! {
    /// The whole packed A of the `gemm` call running on this thread (see `gemm`).
    static A_PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The left-hand operand as a task reads it.
#[derive(Clone, Copy)]
enum AOperand<'a> {
    /// Row-major: element `(i, p)` at `data[i * lda + p]`; tasks pack their own rows.
    RowMajor { data: &'a [f32], lda: usize },
    /// Packed by [`prepack_a`] for the whole matrix.
    Packed { data: &'a [f32], padded_rows: usize },
}

/// Packs all of A: for each `KC` block of `k` (starting at `k0`, depth `kc`), the row panels
/// `[m.div_ceil(mr)][kc][mr]` at offset `k0 * padded_rows`, exactly the panels `pack_a` would
/// make for any task whose rows start at a multiple of `mr`.
// a: element (i, p) at a[i * lda + p]; dst: m.div_ceil(mr) * mr * k floats.
fn prepack_a(isa: Isa, a: &[f32], lda: usize, m: usize, k: usize, mr: usize, dst: &mut [f32]) {
    let padded_rows = m.div_ceil(mr) * mr;
    let blocks: Vec<(usize, &mut [f32])> = {
        let mut rest = dst;
        let mut out = Vec::new();
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (block, tail) = rest.split_at_mut(padded_rows * kc);
            out.push((k0, block));
            rest = tail;
        }
        out
    };
    blocks.into_par_iter().for_each(|(k0, block)| pack_a(isa, a, lda, 0..m, k0, KC.min(k - k0), mr, block));
}

/// One rectangle of C.
// Shapes as in `gemm`; rows/cols: the rectangle, within [0, m) x [0, n).
#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    isa: Isa,
    shape: TileShape,
    k: usize,
    a: AOperand,
    b: BOperand,
    out: SharedOut,
    ldc: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    epilogue: Epilogue,
) {
    let TileShape { mr, nr } = shape;
    let (row_panels, col_panels) = (rows.len().div_ceil(mr), cols.len().div_ceil(nr));
    let c = out.0;
    if k == 0 {
        for r in rows.clone() {
            std::slice::from_raw_parts_mut(c.add(r * ldc + cols.start), cols.len()).fill(0.0);
        }
    }
    TASK_PANELS.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (a_buf, b_buf) = &mut *guard;
        // A row-major A is read in place where the kernel can (its rows are then `lda` apart);
        // otherwise this task packs its rows into `[kc][mr]` panels per pass.
        let in_place = match a {
            AOperand::RowMajor { data, lda } if microkernel::reads_row_major_a(isa) => Some((data.as_ptr(), lda)),
            _ => None,
        };
        if matches!(a, AOperand::RowMajor { .. }) && in_place.is_none() {
            ensure_len(a_buf, row_panels * mr * KC.min(k.max(1)));
        }
        if let BOperand::RowMajor { .. } = b {
            ensure_len(b_buf, col_panels * nr * KC.min(k.max(1)));
        }
        let mut edge = [0.0f32; MAX_TILE];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let a_panels = match a {
                AOperand::RowMajor { .. } if in_place.is_some() => std::ptr::null(),
                AOperand::RowMajor { data, lda } => {
                    pack_a(isa, data, lda, rows.clone(), k0, kc, mr, a_buf);
                    a_buf.as_ptr()
                }
                // Rows start at a multiple of mr, so this task's panels are contiguous there.
                AOperand::Packed { data, padded_rows } => data.as_ptr().add(k0 * padded_rows + (rows.start / mr) * kc * mr),
            };
            if let BOperand::RowMajor { data, ldb } = b {
                pack_b_row_major(data, ldb, cols.clone(), k0, kc, nr, b_buf);
            }
            for jp in 0..col_panels {
                let j0 = cols.start + jp * nr;
                let width = nr.min(cols.end - j0);
                let b_panel = match b {
                    BOperand::Packed(p) => p.as_ptr().add(((j0 / nr) * k + k0) * nr),
                    BOperand::RowMajor { .. } => b_buf.as_ptr().add(jp * kc * nr),
                };
                for ip in 0..row_panels {
                    let i0 = rows.start + ip * mr;
                    let height = mr.min(rows.end - i0);
                    let dst = c.add(i0 * ldc + j0);
                    let accumulate = k0 > 0;
                    if let Some((a_data, lda)) = in_place {
                        let a_rows = a_data.add(i0 * lda + k0);
                        let tile = |c_tile: *mut f32, ld: usize| {
                            let ran = microkernel::run_row_major_a(isa, height, kc, a_rows, lda, b_panel, c_tile, ld, accumulate);
                            debug_assert!(ran, "in_place is only chosen where the kernel exists");
                        };
                        if width == nr {
                            tile(dst, ldc);
                        } else {
                            // Ragged edge: `height` whole rows into scratch (A has no more rows).
                            through_scratch(dst, ldc, height, width, nr, accumulate, &mut edge, |e| tile(e, nr));
                        }
                        continue;
                    }
                    let a_panel = a_panels.add(ip * kc * mr);
                    if height == mr && width == nr {
                        microkernel::run(isa, kc, a_panel, b_panel, dst, ldc, accumulate);
                    } else if width == nr && microkernel::run_rows(isa, height, kc, a_panel, b_panel, dst, ldc, accumulate) {
                        // The last row panel, computed for its real rows only.
                    } else {
                        // Ragged edge: the kernel writes a whole tile into scratch.
                        through_scratch(dst, ldc, height, width, nr, accumulate, &mut edge, |e| microkernel::run(isa, kc, a_panel, b_panel, e, nr, accumulate));
                    }
                }
            }
        }
    });
    for r in rows {
        epilogue(r, cols.start, std::slice::from_raw_parts_mut(c.add(r * ldc + cols.start), cols.len()));
    }
}

/// A ragged tile of C (`height` rows of `width < nr` columns at `dst`, row stride `ldc`)
/// computed through the scratch tile `edge` (rows of `nr`): its values copied in when the kernel
/// accumulates, `kernel` run on the scratch, the `width` real columns copied back.
///
/// # Safety
/// `dst` holds `height` rows of `width` floats `ldc` apart; `kernel` writes at most
/// `MAX_TILE / nr` rows of `nr` floats at the pointer it is given.
#[allow(clippy::too_many_arguments)]
unsafe fn through_scratch(dst: *mut f32, ldc: usize, height: usize, width: usize, nr: usize, accumulate: bool, edge: &mut [f32; MAX_TILE], kernel: impl FnOnce(*mut f32)) {
    if accumulate {
        for i in 0..height {
            std::ptr::copy_nonoverlapping(dst.add(i * ldc), edge.as_mut_ptr().add(i * nr), width);
        }
    }
    kernel(edge.as_mut_ptr());
    for i in 0..height {
        std::ptr::copy_nonoverlapping(edge.as_ptr().add(i * nr), dst.add(i * ldc), width);
    }
}

/// Copies rows `rows` × columns `k0..k0+kc` of A into `[panel][kc][mr]`, zero past the last row.
// a: element (i, p) at a[i * lda + p]; dst: at least rows.len().div_ceil(mr) * kc * mr floats.
#[allow(clippy::too_many_arguments)]
fn pack_a(isa: Isa, a: &[f32], lda: usize, rows: std::ops::Range<usize>, k0: usize, kc: usize, mr: usize, dst: &mut [f32]) {
    let panels = rows.len().div_ceil(mr);
    assert!(dst.len() >= panels * kc * mr, "pack_a: dst too short");
    assert!(kc == 0 || rows.is_empty() || a.len() >= (rows.end - 1) * lda + k0 + kc, "pack_a: A too short");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && mr <= 16 {
        // SAFETY: AVX-512 is the active level; the asserts above bound every read and write.
        unsafe { pack_a_avx512(a.as_ptr(), lda, rows, k0, kc, mr, dst.as_mut_ptr()) };
        return;
    }
    let _ = isa;
    for (ip, i0) in rows.clone().step_by(mr).enumerate() {
        let panel = &mut dst[ip * kc * mr..(ip + 1) * kc * mr];
        let height = mr.min(rows.end - i0);
        for i in 0..mr {
            // Strided iterators instead of `panel[p * mr + i]`: no bounds check per element.
            let column = panel[i..].iter_mut().step_by(mr);
            if i < height {
                let src = &a[(i0 + i) * lda + k0..][..kc];
                column.zip(src).for_each(|(dst, &v)| *dst = v);
            } else {
                column.for_each(|dst| *dst = 0.0);
            }
        }
    }
}

/// [`pack_a`] with AVX-512: 16 columns of a panel's rows at a time are transposed in registers
/// (`transpose16`; rows past the panel's height are zero registers) and stored as 16 `mr`-wide
/// rows, instead of one strided store per element.
///
/// # Safety
/// AVX-512F; `mr <= 16`; `a` and `dst` as `pack_a` asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_avx512(a: *const f32, lda: usize, rows: std::ops::Range<usize>, k0: usize, kc: usize, mr: usize, dst: *mut f32) {
    use crate::transpose::avx512::{lanes, transpose16};
    use std::arch::x86_64::*;
    let row_mask = lanes(mr);
    let mut r = [_mm512_setzero_ps(); 16];
    for (ip, i0) in rows.clone().step_by(mr).enumerate() {
        let panel = dst.add(ip * kc * mr);
        let height = mr.min(rows.end - i0);
        for p0 in (0..kc).step_by(16) {
            let w = 16.min(kc - p0);
            for (i, reg) in r.iter_mut().enumerate() {
                *reg = if i >= height {
                    _mm512_setzero_ps()
                } else if w == 16 {
                    _mm512_loadu_ps(a.add((i0 + i) * lda + k0 + p0))
                } else {
                    _mm512_maskz_loadu_ps(lanes(w), a.add((i0 + i) * lda + k0 + p0))
                };
            }
            transpose16(&mut r);
            for (j, reg) in r.iter().enumerate().take(w) {
                _mm512_mask_storeu_ps(panel.add((p0 + j) * mr), row_mask, *reg);
            }
        }
    }
}

/// Copies columns `cols` × rows `k0..k0+kc` of a row-major B into `[panel][kc][nr]`, zero past
/// the last column.
///
/// Row by row of B, all of the task's panels at once: each row segment is read contiguously
/// (`cols.len()` floats), not `nr` floats at a time per panel. A 1x1 convolution's B is an NCHW
/// input whose rows lie a whole plane apart (256 KiB in LiteMedSAM's first stage), so reading
/// one short piece per row and panel touched a new page and the same few L1 sets every time.
// b: element (p, j) at b[p * ldb + j]; dst: at least cols.len().div_ceil(nr) * kc * nr floats.
fn pack_b_row_major(b: &[f32], ldb: usize, cols: std::ops::Range<usize>, k0: usize, kc: usize, nr: usize, dst: &mut [f32]) {
    let whole = cols.len() / nr;
    let rest = cols.len() - whole * nr;
    for p in 0..kc {
        let src = &b[(k0 + p) * ldb + cols.start..][..cols.len()];
        match nr {
            32 => scatter_row::<32>(src, whole, kc, p, dst),
            16 => scatter_row::<16>(src, whole, kc, p, dst),
            8 => scatter_row::<8>(src, whole, kc, p, dst),
            _ => {
                for jp in 0..whole {
                    dst[(jp * kc + p) * nr..][..nr].copy_from_slice(&src[jp * nr..][..nr]);
                }
            }
        }
        if rest > 0 {
            let row = &mut dst[(whole * kc + p) * nr..][..nr];
            row[..rest].copy_from_slice(&src[whole * nr..]);
            row[rest..].fill(0.0);
        }
    }
}

/// Row `p` of the first `whole` panels: `dst[jp][p][..N] = src[jp * N..][..N]`, as fixed-length
/// copies the compiler turns into vector moves (a run-time length was a `memcpy` call per row).
// src: at least whole * N floats; dst: [panel][kc][N].
fn scatter_row<const N: usize>(src: &[f32], whole: usize, kc: usize, p: usize, dst: &mut [f32]) {
    for (jp, chunk) in src[..whole * N].chunks_exact(N).enumerate() {
        let from: &[f32; N] = chunk.try_into().expect("N floats");
        let to: &mut [f32; N] = (&mut dst[(jp * kc + p) * N..][..N]).try_into().expect("N floats");
        *to = *from;
    }
}

/// Floats [`pack_b_transposed`] writes for an `[n, k]` weight.
pub(crate) fn packed_b_len(isa: Isa, n: usize, k: usize) -> usize {
    let nr = microkernel::tile_shape(isa).nr;
    n.div_ceil(nr) * k * nr
}

/// Packs `B = wᵀ` for a weight `w` stored `[n, k]` (torch `Linear` layout) in any precision:
/// panel `j` holds rows `j·nr..` of `w` as its columns, `[k][nr]`, zero past row `n`. Weight
/// rows are dequantised one at a time into a row buffer, so NF4 is never expanded whole.
// dst: packed_b_len(isa, n, k) floats.
pub(crate) fn pack_b_transposed(isa: Isa, w: MatrixRef, n: usize, k: usize, dst: &mut [f32]) {
    let nr = microkernel::tile_shape(isa).nr;
    let panel_len = k * nr;
    if panel_len == 0 {
        return;
    }
    dst[..n.div_ceil(nr) * panel_len].par_chunks_mut(panel_len).enumerate().for_each(|(jp, panel)| {
        ROW.with(|cell| {
            let mut row = cell.borrow_mut();
            ensure_len(&mut row, k);
            for jj in 0..nr {
                let j = jp * nr + jj;
                if j < n {
                    w.dequantize_range(j * k, &mut row[..k]);
                    for (p, &v) in row[..k].iter().enumerate() {
                        panel[p * nr + jj] = v;
                    }
                } else {
                    for p in 0..k {
                        panel[p * nr + jj] = 0.0;
                    }
                }
            }
        });
    });
}

thread_local! {
    /// One dequantised weight row, for `pack_b_transposed`.
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// Both B forms, every supported kernel, ragged shapes (edges in m, n and k, k > KC), an
    /// epilogue that marks what it saw, and C wider than n (ldc > n) left untouched past n.
    #[test]
    fn gemm_matches_f64_on_ragged_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for isa in simd::supported() {
            for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (97, 385, 300), (5, 70, 513), (200, 31, 64), (12, 32, 256), (3, 5, 0)] {
                let a = random(&mut rng, m * k);
                let b = random(&mut rng, k * n);
                let ldc = n + 2;
                let mut want = vec![0.0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                        want[i * n + j] = s + 1.0 + i as f64;
                    }
                }
                let w_nk: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
                let mut packed = vec![f32::NAN; packed_b_len(isa, n, k)];
                pack_b_transposed(isa, MatrixRef::F32(&w_nk), n, k, &mut packed);
                // A also with rows wider than k (lda = k + 3, the extra columns NaN): a kernel
                // reading A in place must step by lda and never touch them.
                let lda_wide = k + 3;
                let a_wide: Vec<f32> = (0..m * lda_wide).map(|idx| if idx % lda_wide < k { a[idx / lda_wide * k + idx % lda_wide] } else { f32::NAN }).collect();
                let operands = [BOperand::Packed(&packed), BOperand::RowMajor { data: &b, ldb: n }];
                for (operand, (a_in, lda)) in operands.into_iter().flat_map(|o| [(o, (&a, k)), (o, (&a_wide, lda_wide))]) {
                    let mut c = vec![f32::NAN; m * ldc];
                    let epilogue = |row: usize, _col0: usize, seg: &mut [f32]| seg.iter_mut().for_each(|v| *v += 1.0 + row as f32);
                    gemm(isa, m, n, k, a_in, lda, operand, &mut c, ldc, &epilogue);
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert!(got.is_nan(), "{isa:?} m={m} n={n} k={k}: wrote past n at ({i}, {j})");
                                continue;
                            }
                            let w = want[i * n + j];
                            assert!((got as f64 - w).abs() <= 1e-4 * (1.0 + (k as f64).sqrt()), "{isa:?} m={m} n={n} k={k} ({i}, {j}): {got} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
