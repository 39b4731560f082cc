//! 2-D convolutions on NCHW activations with weights in any stored precision (f32, fp16, NF4),
//! with the semantics of `torch.nn.Conv2d` and of `torch.nn.ConvTranspose2d` for kernel == stride.
//!
//! Three strategies, picked from the shape:
//! - one input channel per group (depthwise, TinyViT's MBConv): a direct sliding window per
//!   output plane, which for stride 1 is a run of vectorisable `axpy`s;
//! - 1x1, stride 1, no padding: the input already is the right-hand matrix of a GEMM;
//! - anything else: im2col of a bounded block of output columns, then the same GEMM.
//!
//! The GEMM is the blocked one of `crate::packed_gemm` (weight as A, dequantised once per call:
//! convolution weights are small next to their activations; input or im2col block as a row-major
//! B that each task packs for its own columns), with bias and activation fused into its epilogue.

use std::cell::RefCell;

use crate::activation::{self, Activation};
use crate::packed_gemm::{self, BOperand};
use crate::simd;
use crate::weights::MatrixRef;
use rayon::prelude::*;

/// Output length of one spatial axis, as in torch (`floor((h + 2p - k) / stride) + 1`).
// h: input length, k: kernel length, stride >= 1, padding: zeros added on each side.
pub fn output_size(h: usize, k: usize, stride: usize, padding: usize) -> usize {
    assert!(stride >= 1, "conv: stride must be at least 1");
    assert!(h + 2 * padding >= k, "conv: kernel {k} larger than padded input {h} + 2*{padding}");
    (h + 2 * padding - k) / stride + 1
}

/// Bound on the im2col buffer of one block of output columns, in floats (16 MiB).
const IM2COL_FLOATS: usize = 4 << 20;

thread_local! {
    /// A convolution's dequantised weight (`[c_out, k]`, or the transposed weight of
    /// `conv_transpose2d`), its im2col block, and `conv_transpose2d`'s product before the
    /// scatter: reused call after call, so the encoder allocates nothing per frame.
    static WEIGHT_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PRODUCT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the thread-local buffer `key` grown to `len` floats, or on a fresh one when this
/// thread is already using it (a second caller sharing the pool, waiting inside rayon).
fn with_buffer<R>(key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Geometry of one convolution, shared by the helpers.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

/// Writes the im2col matrix of output columns `p0..p0+ncols` (flattened `oy*ow+ox`).
///
/// Each matrix row (one input channel and kernel offset) is written one output row segment at a
/// time: the input row and the range of output columns whose input column is inside the image
/// are worked out once per segment, so the copy in between is a plain strided loop and only the
/// borders are zero-filled (a bounds test per element made this 7% of MobileSAM's encode, whose
/// stride-2 patch embedding im2cols 512x512 outputs).
// x: [c, h, w] one group's input; cols: [c*kh*kw, ncols], row (ci*kh+ky)*kw+kx.
fn im2col(x: &[f32], c: usize, g: Geometry, p0: usize, ncols: usize, cols: &mut [f32]) {
    let plane = g.h * g.w;
    // Output columns ox whose input column ox*stride + kx - padding lies in 0..w, per kx.
    let valid_ox = |kx: usize| -> (usize, usize) {
        if g.w + g.padding <= kx {
            return (0, 0);
        }
        let first = g.padding.saturating_sub(kx).div_ceil(g.stride);
        let end = ((g.w + g.padding - kx - 1) / g.stride + 1).min(g.ow);
        (first.min(end), end)
    };
    cols.par_chunks_mut(ncols).enumerate().for_each(|(row, dst)| {
        let kx = row % g.kw;
        let ky = (row / g.kw) % g.kh;
        let ci = row / (g.kw * g.kh);
        debug_assert!(ci < c);
        let src = &x[ci * plane..(ci + 1) * plane];
        let (ox_first, ox_end) = valid_ox(kx);
        let mut done = 0;
        while done < ncols {
            let p = p0 + done;
            let (oy, ox0) = (p / g.ow, p % g.ow);
            let len = (g.ow - ox0).min(ncols - done);
            let seg = &mut dst[done..done + len];
            let iy = (oy * g.stride + ky) as isize - g.padding as isize;
            if iy < 0 || iy as usize >= g.h {
                seg.fill(0.0);
            } else {
                let in_row = &src[iy as usize * g.w..][..g.w];
                // This segment covers output columns ox0..ox0+len; the valid ones are lo..hi.
                let (lo, hi) = (ox_first.clamp(ox0, ox0 + len), ox_end.clamp(ox0, ox0 + len));
                seg[..lo - ox0].fill(0.0);
                seg[hi - ox0..].fill(0.0);
                let valid = &mut seg[lo - ox0..hi - ox0];
                if !valid.is_empty() {
                    let ix0 = lo * g.stride + kx - g.padding;
                    if g.stride == 1 {
                        valid.copy_from_slice(&in_row[ix0..ix0 + valid.len()]);
                    } else {
                        for (d, &v) in valid.iter_mut().zip(in_row[ix0..].iter().step_by(g.stride)) {
                            *d = v;
                        }
                    }
                }
            }
            done += len;
        }
    });
}

/// One group of a dense (not depthwise) convolution: `out = act(W · cols + bias)` on the
/// blocked GEMM, the weight dequantised once per call (it is small next to the activations),
/// the input read in place for 1x1 convolutions and through im2col blocks otherwise.
// x: [c_in_g, h, w]; weight rows w_row0.. of [*, c_in_g*kh*kw]; bias: [c_out_g] or None;
// out: [c_out_g, oh*ow].
#[allow(clippy::too_many_arguments)]
fn conv_group_gemm(
    x: &[f32],
    c_in_g: usize,
    g: Geometry,
    weight: MatrixRef,
    w_row0: usize,
    c_out_g: usize,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    let k = c_in_g * g.kh * g.kw;
    let n = g.oh * g.ow;
    let direct = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.padding == 0;
    let isa = simd::active();
    with_buffer(&WEIGHT_F32, c_out_g * k, |a| {
        weight.dequantize_range(w_row0 * k, a);
        let epilogue = |row: usize, _col0: usize, seg: &mut [f32]| {
            if let Some(b) = bias {
                let b = b[row];
                seg.iter_mut().for_each(|v| *v += b);
            }
            activation::apply(act, seg);
        };
        if direct {
            packed_gemm::gemm(isa, c_out_g, n, k, a, k, BOperand::RowMajor { data: x, ldb: n }, out, n, &epilogue);
            return;
        }
        let block_cols = (IM2COL_FLOATS / k.max(1)).clamp(1, n);
        with_buffer(&COLUMNS, k * block_cols, |cols| {
            for p0 in (0..n).step_by(block_cols) {
                let ncols = block_cols.min(n - p0);
                im2col(x, c_in_g, g, p0, ncols, &mut cols[..k * ncols]);
                let b = BOperand::RowMajor { data: &cols[..k * ncols], ldb: ncols };
                packed_gemm::gemm(isa, c_out_g, ncols, k, a, k, b, &mut out[p0..], n, &epilogue);
            }
        });
    });
}

/// Kernel taps held on the stack per plane; larger kernels (none in the SAM family) use a
/// heap buffer.
const STACK_TAPS: usize = 64;

/// Convolution with one input channel per group (depthwise, optionally with a channel
/// multiplier), computed directly, at the SIMD level the process runs.
// x: [batch, c_in, h, w]; weight: [c_out, 1, kh, kw]; out: [batch, c_out, oh, ow].
#[allow(clippy::too_many_arguments)]
fn conv_depthwise(x: &[f32], batch: usize, c_in: usize, g: Geometry, weight: MatrixRef, c_out: usize, bias: Option<&[f32]>, act: Activation, out: &mut [f32]) {
    conv_depthwise_at(simd::active(), x, batch, c_in, g, weight, c_out, bias, act, out);
}

/// [`conv_depthwise`] at a given SIMD level (the tests run every level the CPU has).
// Shapes as in `conv_depthwise`; isa must be one `simd::supported` lists.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_depthwise_at(isa: simd::Isa, x: &[f32], batch: usize, c_in: usize, g: Geometry, weight: MatrixRef, c_out: usize, bias: Option<&[f32]>, act: Activation, out: &mut [f32]) {
    let multiplier = c_out / c_in;
    let (in_plane, out_plane) = (g.h * g.w, g.oh * g.ow);
    let ntaps = g.kh * g.kw;
    debug_assert_eq!(out.len(), batch * c_out * out_plane);
    out.par_chunks_mut(out_plane).enumerate().for_each(|(idx, dst)| {
        let (b, co) = (idx / c_out, idx % c_out);
        let ci = co / multiplier;
        let src = &x[(b * c_in + ci) * in_plane..][..in_plane];
        let bias_c = bias.map_or(0.0, |b| b[co]);
        let mut stack = [0.0f32; STACK_TAPS];
        let mut heap = Vec::new();
        let taps: &mut [f32] = if ntaps <= STACK_TAPS {
            &mut stack[..ntaps]
        } else {
            heap.resize(ntaps, 0.0);
            &mut heap
        };
        weight.dequantize_range(co * ntaps, taps);
        depthwise_plane_rows(isa, src, g, taps, bias_c, act, 0..g.oh, dst);
    });
}

/// Output rows `rows` of one depthwise plane, `act(bias + Σ taps · src)`, on the calling thread
/// at level `isa` (one `simd::supported` lists): the AVX-512 kernel for stride 1, the portable
/// loop otherwise. (`crate::inverted_residual` computes a band of rows at a time.)
// src: [h, w]; taps: [kh, kw]; dst: [rows.len(), ow]; rows within 0..oh.
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_plane_rows(isa: simd::Isa, src: &[f32], g: Geometry, taps: &[f32], bias: f32, act: Activation, rows: std::ops::Range<usize>, dst: &mut [f32]) {
    assert!(rows.end <= g.oh && dst.len() == rows.len() * g.ow && src.len() >= g.h * g.w && taps.len() >= g.kh * g.kw, "depthwise plane: shapes");
    #[cfg(target_arch = "x86_64")]
    if isa == simd::Isa::Avx512 && g.stride == 1 {
        let plane = crate::conv_dw_avx512::Plane { h: g.h, w: g.w, kh: g.kh, kw: g.kw, padding: g.padding, oh: g.oh, ow: g.ow };
        // SAFETY: `isa` is supported (caller's contract); the assert above bounds the plane.
        unsafe { crate::conv_dw_avx512::plane(src, plane, taps, bias, act, rows, dst) };
        return;
    }
    plane_portable(src, g, taps, bias, rows, dst);
    activation::apply_serial_at(isa, act, dst);
}

/// Output rows `rows` of one depthwise plane, any stride: `dst = bias + Σ taps · src` (the
/// activation is left to the caller).
// src: [h, w]; taps: [kh, kw]; dst: [rows.len(), ow].
fn plane_portable(src: &[f32], g: Geometry, taps: &[f32], bias: f32, rows: std::ops::Range<usize>, dst: &mut [f32]) {
    dst.fill(bias);
    // Row by row, so the output row stays in L1 while all taps are added.
    for (r, oy) in rows.enumerate() {
        let out_row = &mut dst[r * g.ow..(r + 1) * g.ow];
        for ky in 0..g.kh {
            let iy = (oy * g.stride + ky) as isize - g.padding as isize;
            if iy < 0 || iy as usize >= g.h {
                continue;
            }
            let in_row = &src[iy as usize * g.w..][..g.w];
            for kx in 0..g.kw {
                // The output columns whose input column ox*stride + kx - padding lies inside the
                // image, and the first such input column.
                if g.w + g.padding <= kx {
                    continue;
                }
                let ox_first = g.padding.saturating_sub(kx).div_ceil(g.stride);
                let ox_end = ((g.w + g.padding - kx - 1) / g.stride + 1).min(g.ow);
                if ox_first >= ox_end {
                    continue;
                }
                let ix_first = ox_first * g.stride + kx - g.padding;
                let tap = taps[ky * g.kw + kx];
                let seg = &mut out_row[ox_first..ox_end];
                if g.stride == 1 {
                    let in_seg = &in_row[ix_first..ix_first + seg.len()];
                    seg.iter_mut().zip(in_seg).for_each(|(o, &v)| *o += tap * v);
                } else {
                    for (i, o) in seg.iter_mut().enumerate() {
                        *o += tap * in_row[ix_first + i * g.stride];
                    }
                }
            }
        }
    }
}

/// `torch.nn.Conv2d` forward with zero padding, then `act`.
// x: [batch, c_in, h, w] NCHW; weight: [c_out, c_in/groups, kh, kw] (row-major, any precision);
// bias: [c_out] or None; out: [batch, c_out, oh, ow] with oh/ow from `output_size`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    weight: MatrixRef,
    c_out: usize,
    kh: usize,
    kw: usize,
    bias: Option<&[f32]>,
    stride: usize,
    padding: usize,
    groups: usize,
    act: Activation,
    out: &mut [f32],
) {
    assert!(
        groups >= 1 && c_in.is_multiple_of(groups) && c_out.is_multiple_of(groups),
        "conv2d: groups {groups} must divide c_in {c_in} and c_out {c_out}"
    );
    let (oh, ow) = (output_size(h, kh, stride, padding), output_size(w, kw, stride, padding));
    assert_eq!(x.len(), batch * c_in * h * w, "conv2d: x is not [batch, c_in, h, w]");
    assert_eq!(out.len(), batch * c_out * oh * ow, "conv2d: out is not [batch, c_out, oh, ow]");
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "conv2d: bias is not [c_out]");
    }
    if out.is_empty() {
        return;
    }
    let g = Geometry {
        h,
        w,
        kh,
        kw,
        stride,
        padding,
        oh,
        ow,
    };
    let (c_in_g, c_out_g) = (c_in / groups, c_out / groups);
    if c_in_g == 1 {
        conv_depthwise(x, batch, c_in, g, weight, c_out, bias, act, out);
        return;
    }
    let (in_plane, out_plane) = (h * w, oh * ow);
    for b in 0..batch {
        for grp in 0..groups {
            let xg = &x[(b * c_in + grp * c_in_g) * in_plane..][..c_in_g * in_plane];
            let og = &mut out[(b * c_out + grp * c_out_g) * out_plane..][..c_out_g * out_plane];
            let bias_g = bias.map(|v| &v[grp * c_out_g..(grp + 1) * c_out_g]);
            conv_group_gemm(xg, c_in_g, g, weight, grp * c_out_g, c_out_g, bias_g, act, og);
        }
    }
}

/// `torch.nn.ConvTranspose2d` with kernel == stride == k and no padding: every input pixel
/// paints its own k x k output patch, so it is a GEMM `[c_out*k*k, c_in] x [c_in, h*w]` followed
/// by a scatter.
// x: [batch, c_in, h, w]; weight: [c_in, c_out, k, k]; bias: [c_out] or None;
// out: [batch, c_out, h*k, w*k].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d(
    x: &[f32],
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    weight: MatrixRef,
    c_out: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    conv_transpose2d_at(simd::active(), x, batch, c_in, h, w, weight, c_out, k, bias, out);
}

/// [`conv_transpose2d`] at a given SIMD level (one `simd::supported` lists; the tests run each).
#[allow(clippy::too_many_arguments)]
fn conv_transpose2d_at(isa: simd::Isa, x: &[f32], batch: usize, c_in: usize, h: usize, w: usize, weight: MatrixRef, c_out: usize, k: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    assert!(k >= 1, "conv_transpose2d: kernel must be at least 1");
    assert_eq!(x.len(), batch * c_in * h * w, "conv_transpose2d: x is not [batch, c_in, h, w]");
    assert_eq!(
        out.len(),
        batch * c_out * h * k * w * k,
        "conv_transpose2d: out is not [batch, c_out, h*k, w*k]"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "conv_transpose2d: bias is not [c_out]");
    }
    if out.is_empty() {
        return;
    }
    let (n, kk) = (h * w, k * k);
    let (out_w, out_plane) = (w * k, h * k * w * k);
    let rows = c_out * kk; // rows (co, ky, kx) of the transposed weight
    with_buffer(&WEIGHT_F32, rows * c_in, |a| {
        // The stored weight is [c_in, rows]; the GEMM's A is its transpose [rows, c_in].
        with_buffer(&PRODUCT, rows * c_in, |stored| {
            weight.dequantize_range(0, stored);
            crate::transpose::transpose_block(stored, rows, a, c_in, c_in, rows);
        });
        for b in 0..batch {
            let xb = &x[b * c_in * n..(b + 1) * c_in * n];
            let ob = SharedOut(out[b * c_out * out_plane..].as_mut_ptr());
            // Each finished row (co, ky, kx) of the product is scattered straight into its
            // output plane with the bias, while it is in cache.
            let scatter = |row: usize, col0: usize, seg: &mut [f32]| {
                let (co, ky, kx) = (row / kk, (row % kk) / k, row % k);
                let bias_c = bias.map_or(0.0, |v| v[co]);
                // The segment's columns are input pixels along rows of the input; each run along
                // one input row lands k floats apart in one output row.
                let (mut iy, mut ix) = (col0 / w, col0 % w);
                let mut done = 0;
                while done < seg.len() {
                    let run = (w - ix).min(seg.len() - done);
                    let first = ob.at(co * out_plane + (iy * k + ky) * out_w + ix * k + kx);
                    // SAFETY: the run's outputs (co, iy*k+ky, (ix+j)*k+kx) lie in this batch's
                    // output, and each (row, column) of the product is a distinct element.
                    unsafe { store_strided(isa, &seg[done..done + run], bias_c, k, first) };
                    done += run;
                    (iy, ix) = (iy + 1, 0);
                }
            };
            with_buffer(&PRODUCT, rows * n, |y| {
                packed_gemm::gemm(isa, rows, n, c_in, a, c_in, BOperand::RowMajor { data: xb, ldb: n }, y, n, &scatter);
            });
        }
    });
}

/// `dst[j * k] = values[j] + bias`: one input row's products into one output row of a
/// transposed convolution. With AVX-512 and SAM's stride 2, sixteen values at a time are spread
/// to every other lane and written with a masked store, which touches only those lanes (the
/// other lanes belong to the neighbouring kernel column, possibly being written by another
/// task); element by element it was a tenth of the mask decoder's time.
///
/// # Safety
/// `dst + j * k` for `j < values.len()` must be valid for writes that no one else makes.
// values: one run of products; dst: its first output element.
unsafe fn store_strided(isa: simd::Isa, values: &[f32], bias: f32, k: usize, dst: *mut f32) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // the wide path is x86's only
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == simd::Isa::Avx512 && k == 2 {
        // SAFETY: AVX-512 is the active level; the caller vouches for the destinations.
        j = unsafe { store_stride2_avx512(values, bias, dst) };
    }
    let _ = isa;
    for (jj, &v) in values.iter().enumerate().skip(j) {
        // SAFETY: as the caller promises.
        unsafe { *dst.add(jj * k) = v + bias };
    }
}

/// The whole 16-value blocks of [`store_strided`] for `k == 2`; returns how many values it wrote.
///
/// # Safety
/// As [`store_strided`], and the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_stride2_avx512(values: &[f32], bias: f32, dst: *mut f32) -> usize {
    use std::arch::x86_64::*;
    // Lane 2i (and 2i + 1, masked off) of `low` holds value i, of `high` value 8 + i.
    let low_index = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    let high_index = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    let even_lanes: __mmask16 = 0x5555;
    let bias_v = _mm512_set1_ps(bias);
    let whole = values.len() / 16 * 16;
    for j in (0..whole).step_by(16) {
        let v = _mm512_add_ps(_mm512_loadu_ps(values.as_ptr().add(j)), bias_v);
        _mm512_mask_storeu_ps(dst.add(2 * j), even_lanes, _mm512_permutexvar_ps(low_index, v));
        _mm512_mask_storeu_ps(dst.add(2 * j + 16), even_lanes, _mm512_permutexvar_ps(high_index, v));
    }
    whole
}

/// The output pointer of `conv_transpose2d`, written at disjoint elements by the GEMM's tasks.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `offset` floats past the start (a method, so closures capture the whole
    /// `Sync` wrapper rather than its raw pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    fn act_f64(act: Activation, v: f64) -> f64 {
        match act {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Gelu => activation::gelu(v as f32) as f64,
        }
    }

    /// Literal transcription of the torch definition, in f64.
    // x: [batch, c_in, h, w]; w: [c_out, c_in/groups, kh, kw] already dequantised.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv(
        x: &[f32],
        batch: usize,
        c_in: usize,
        h: usize,
        w_in: usize,
        wt: &[f32],
        c_out: usize,
        kh: usize,
        kw: usize,
        bias: Option<&[f32]>,
        stride: usize,
        pad: usize,
        groups: usize,
        act: Activation,
    ) -> Vec<f64> {
        let (oh, ow) = (output_size(h, kh, stride, pad), output_size(w_in, kw, stride, pad));
        let (cig, cog) = (c_in / groups, c_out / groups);
        let mut out = vec![0.0; batch * c_out * oh * ow];
        for b in 0..batch {
            for co in 0..c_out {
                let grp = co / cog;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = bias.map_or(0.0, |v| v[co] as f64);
                        for c in 0..cig {
                            let ci = grp * cig + c;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w_in as isize {
                                        continue;
                                    }
                                    let xv = x[((b * c_in + ci) * h + iy as usize) * w_in + ix as usize] as f64;
                                    s += xv * wt[((co * cig + c) * kh + ky) * kw + kx] as f64;
                                }
                            }
                        }
                        out[((b * c_out + co) * oh + oy) * ow + ox] = act_f64(act, s);
                    }
                }
            }
        }
        out
    }

    #[derive(Clone, Copy, Debug)]
    enum Precision {
        F32,
        F16,
        Nf4,
    }

    /// Runs `f` with the weight stored in `precision` and its dequantised f32 values.
    fn with_weight<R>(raw: &[f32], precision: Precision, f: impl FnOnce(MatrixRef, &[f32]) -> R) -> R {
        match precision {
            Precision::F32 => f(MatrixRef::F32(raw), raw),
            Precision::F16 => {
                let bytes: Vec<u8> = raw.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
                let m = MatrixRef::F16(&bytes);
                let mut deq = vec![0.0; raw.len()];
                m.dequantize_range(0, &mut deq);
                f(m, &deq)
            }
            Precision::Nf4 => {
                let q = nf4::quantize(raw);
                let m = MatrixRef::Nf4(q.view());
                let mut deq = vec![0.0; raw.len()];
                m.dequantize_range(0, &mut deq);
                f(m, &deq)
            }
        }
    }

    /// (batch, c_in, h, w, c_out, kh, kw, stride, padding, groups)
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize, usize, usize);

    fn check_conv(case: Case, precision: Precision, with_bias: bool, act: Activation, rng: &mut ChaCha8Rng) {
        let (batch, c_in, h, w, c_out, kh, kw, stride, pad, groups) = case;
        let x = random(rng, batch * c_in * h * w);
        let raw = random(rng, c_out * (c_in / groups) * kh * kw);
        let bias = random(rng, c_out);
        let bias = if with_bias { Some(bias.as_slice()) } else { None };
        let (oh, ow) = (output_size(h, kh, stride, pad), output_size(w, kw, stride, pad));
        with_weight(&raw, precision, |weight, deq| {
            let mut out = vec![f32::NAN; batch * c_out * oh * ow];
            conv2d(&x, batch, c_in, h, w, weight, c_out, kh, kw, bias, stride, pad, groups, act, &mut out);
            let want = naive_conv(&x, batch, c_in, h, w, deq, c_out, kh, kw, bias, stride, pad, groups, act);
            let e = rel_err(&out, &want);
            assert!(e <= 1e-5, "{case:?} {precision:?} bias {with_bias} {act:?}: rel err {e}");
        });
    }

    const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Nf4];

    #[test]
    fn output_size_like_torch() {
        assert_eq!(output_size(64, 3, 1, 1), 64);
        assert_eq!(output_size(1024, 16, 16, 0), 64);
        assert_eq!(output_size(256, 2, 2, 0), 128);
        assert_eq!(output_size(7, 3, 2, 1), 4);
        assert_eq!(output_size(8, 3, 2, 1), 4);
    }

    #[test]
    fn pointwise_1x1_is_a_gemm() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((2, 40, 9, 11, 26, 1, 1, 1, 0, 1), p, true, Activation::None, &mut rng);
            check_conv((1, 64, 16, 16, 33, 1, 1, 1, 0, 1), p, false, Activation::Gelu, &mut rng);
        }
    }

    #[test]
    fn dense_3x3_same_padding() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((1, 16, 12, 10, 20, 3, 3, 1, 1, 1), p, true, Activation::Relu, &mut rng);
            check_conv((2, 5, 7, 13, 6, 3, 3, 2, 1, 1), p, false, Activation::None, &mut rng);
        }
    }

    #[test]
    fn depthwise_3x3_stride_1_and_2() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((2, 12, 10, 9, 12, 3, 3, 1, 1, 12), p, true, Activation::Gelu, &mut rng);
            check_conv((1, 8, 11, 14, 8, 3, 3, 2, 1, 8), p, true, Activation::None, &mut rng);
            // Channel multiplier 2, no padding, 5x3 window.
            check_conv((1, 3, 9, 8, 6, 5, 3, 1, 0, 3), p, false, Activation::None, &mut rng);
            // Padding wider than the kernel reaches.
            check_conv((1, 4, 5, 6, 4, 3, 3, 2, 3, 4), p, true, Activation::None, &mut rng);
        }
    }

    /// Every SIMD level's depthwise path (AVX-512: the fused register kernel for stride 1)
    /// against the f64 reference and against the portable build, on random shapes whose rows
    /// are shorter than, equal to and one past a 16-lane vector, with padding up to and beyond
    /// the kernel's reach, a channel multiplier, stride 2 and every activation.
    #[test]
    fn depthwise_every_simd_level_matches_portable_and_f64() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        // (batch, c_in, h, w, c_out, kh, kw, stride, padding)
        let mut cases = vec![(2, 3, 7, 16, 3, 3, 3, 1, 1), (1, 2, 5, 17, 4, 3, 3, 1, 1), (1, 2, 3, 1, 2, 3, 3, 1, 1), (1, 1, 2, 3, 1, 7, 7, 1, 3), (1, 2, 9, 33, 2, 5, 3, 1, 2), (1, 2, 6, 40, 2, 1, 1, 1, 0), (1, 2, 8, 20, 2, 3, 3, 1, 0), (1, 2, 9, 31, 2, 3, 3, 2, 1), (1, 1, 4, 5, 1, 3, 3, 1, 4)];
        for _ in 0..6 {
            let k: usize = [1, 3, 5][rng.gen_range(0..3)];
            let pad = rng.gen_range(0..=k);
            // At least one output row and column: h + 2·pad >= k.
            let (h, w) = (rng.gen_range(k.saturating_sub(2 * pad).max(1)..12), rng.gen_range(k.saturating_sub(2 * pad).max(1)..50));
            cases.push((1, rng.gen_range(1..4), h, w, 0, k, k, 1, pad));
        }
        for (batch, c_in, h, w, c_out, kh, kw, stride, pad) in cases {
            let c_out = if c_out == 0 { c_in } else { c_out };
            let (oh, ow) = (output_size(h, kh, stride, pad), output_size(w, kw, stride, pad));
            let g = Geometry { h, w, kh, kw, stride, padding: pad, oh, ow };
            let x = random(&mut rng, batch * c_in * h * w);
            let taps = random(&mut rng, c_out * kh * kw);
            let bias = random(&mut rng, c_out);
            for act in [Activation::None, Activation::Gelu, Activation::Relu] {
                for bias in [None, Some(bias.as_slice())] {
                    let run = |isa| {
                        let mut out = vec![f32::NAN; batch * c_out * oh * ow];
                        conv_depthwise_at(isa, &x, batch, c_in, g, MatrixRef::F32(&taps), c_out, bias, act, &mut out);
                        out
                    };
                    let portable = run(simd::Isa::Portable);
                    let want = naive_conv(&x, batch, c_in, h, w, &taps, c_out, kh, kw, bias, stride, pad, c_in, act);
                    for isa in simd::supported() {
                        let got = run(isa);
                        let case = (batch, c_in, h, w, c_out, kh, kw, stride, pad);
                        // Element by element (a relative norm is undefined when ReLU zeroes a
                        // whole small output).
                        for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                            assert!((g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "{isa:?} {case:?} {act:?} bias {}: element {i} {g} vs f64 {r}", bias.is_some());
                        }
                        for (i, (&a, &b)) in got.iter().zip(&portable).enumerate() {
                            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{isa:?} {case:?} {act:?}: element {i} {a} vs portable {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn patch_embedding_16x16_stride_16() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((1, 3, 32, 48, 24, 16, 16, 16, 0, 1), p, true, Activation::None, &mut rng);
        }
    }

    #[test]
    fn mask_downscaling_2x2_stride_2() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((1, 1, 16, 12, 4, 2, 2, 2, 0, 1), p, true, Activation::None, &mut rng);
            check_conv((2, 4, 8, 10, 16, 2, 2, 2, 0, 1), p, true, Activation::Gelu, &mut rng);
        }
    }

    #[test]
    fn grouped_and_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            check_conv((1, 6, 9, 7, 4, 3, 3, 1, 1, 2), p, true, Activation::None, &mut rng);
            check_conv((2, 8, 10, 5, 12, 1, 3, 2, 2, 4), p, false, Activation::Relu, &mut rng);
            check_conv((1, 3, 33, 17, 5, 5, 2, 3, 0, 1), p, true, Activation::None, &mut rng);
            check_conv((1, 2, 1, 1, 3, 1, 1, 1, 0, 1), p, true, Activation::None, &mut rng);
        }
    }

    #[test]
    fn im2col_split_into_blocks() {
        // K * columns above IM2COL_FLOATS forces several column blocks.
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        let k = 64 * 9;
        let side = ((IM2COL_FLOATS / k) as f64).sqrt() as usize + 8;
        check_conv((1, 64, side, side, 8, 3, 3, 1, 1, 1), Precision::Nf4, true, Activation::None, &mut rng);
    }

    #[allow(clippy::too_many_arguments)]
    fn naive_conv_transpose(x: &[f32], batch: usize, c_in: usize, h: usize, w: usize, wt: &[f32], c_out: usize, k: usize, bias: Option<&[f32]>) -> Vec<f64> {
        let (oh, ow) = (h * k, w * k);
        let mut out = vec![0.0; batch * c_out * oh * ow];
        for b in 0..batch {
            for co in 0..c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (iy, ky, ix, kx) = (oy / k, oy % k, ox / k, ox % k);
                        let mut s = bias.map_or(0.0, |v| v[co] as f64);
                        for ci in 0..c_in {
                            s += x[((b * c_in + ci) * h + iy) * w + ix] as f64 * wt[((ci * c_out + co) * k + ky) * k + kx] as f64;
                        }
                        out[((b * c_out + co) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv_transpose_kernel_equals_stride() {
        let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
        for p in PRECISIONS {
            // Widths below, at and past the 16-value blocks of the AVX-512 stride-2 store, with
            // runs that wrap to the next input row inside one GEMM row segment.
            for &(batch, c_in, h, w, c_out, k, with_bias) in &[
                (1, 32, 8, 6, 16, 2, true),
                (2, 5, 3, 7, 3, 2, false),
                (1, 12, 5, 4, 9, 3, true),
                (1, 4, 3, 3, 40, 1, true),
                (1, 8, 3, 16, 4, 2, true),
                (2, 6, 5, 37, 5, 2, true),
            ] {
                let x = random(&mut rng, batch * c_in * h * w);
                let raw = random(&mut rng, c_in * c_out * k * k);
                let bias = random(&mut rng, c_out);
                let bias = if with_bias { Some(bias.as_slice()) } else { None };
                with_weight(&raw, p, |weight, deq| {
                    let want = naive_conv_transpose(&x, batch, c_in, h, w, deq, c_out, k, bias);
                    for isa in simd::supported() {
                        let mut out = vec![f32::NAN; batch * c_out * h * k * w * k];
                        conv_transpose2d_at(isa, &x, batch, c_in, h, w, weight, c_out, k, bias, &mut out);
                        let e = rel_err(&out, &want);
                        assert!(e <= 1e-5, "{p:?} {isa:?} c_in {c_in} c_out {c_out} w {w} k {k}: rel err {e}");
                    }
                });
            }
        }
    }

    /// MBConv's pointwise convolutions at LiteMedSAM's first stage (64 <-> 256 channels on
    /// 256x256, the expansion with GELU): median of 7 calls after a warm-up, in the rayon pool
    /// of the process. `cargo test --release -p minisam-kernels --lib pointwise_timings --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn pointwise_timings() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (c_in, c_out, act) in [(64, 256, Activation::Gelu), (256, 64, Activation::None)] {
            let (h, w) = (256, 256);
            let x = random(&mut rng, c_in * h * w);
            let raw = random(&mut rng, c_out * c_in);
            let bias = random(&mut rng, c_out);
            let mut out = vec![0.0; c_out * h * w];
            let mut times = Vec::new();
            for _ in 0..8 {
                let start = std::time::Instant::now();
                conv2d(&x, 1, c_in, h, w, MatrixRef::F32(&raw), c_out, 1, 1, Some(&bias), 1, 0, 1, act, &mut out);
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            times.remove(0);
            times.sort_by(f64::total_cmp);
            eprintln!("1x1 {c_in}->{c_out} @256x256 {act:?}: median {:.2} ms (min {:.2})", times[3], times[0]);
        }
    }

    /// Timings of the production shapes with NF4 weights: `cargo test -p minisam-kernels --release
    /// conv_timings -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn conv_timings() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cases: [(&str, Case); 6] = [
            ("1x1 320->256 @64x64", (1, 320, 64, 64, 256, 1, 1, 1, 0, 1)),
            ("dw3x3 256 @256x256", (1, 256, 256, 256, 256, 3, 3, 1, 1, 256)),
            ("3x3 256->256 @64x64", (1, 256, 64, 64, 256, 3, 3, 1, 1, 1)),
            ("dw3x3 160 @256x256", (1, 160, 256, 256, 160, 3, 3, 1, 1, 160)),
            ("patch16 3->768 @1024", (1, 3, 1024, 1024, 768, 16, 16, 16, 0, 1)),
            ("2x2s2 4->16 @128", (1, 4, 128, 128, 16, 2, 2, 2, 0, 1)),
        ];
        for (name, (batch, c_in, h, w, c_out, kh, kw, stride, pad, groups)) in cases {
            let x = random(&mut rng, batch * c_in * h * w);
            let raw = random(&mut rng, c_out * (c_in / groups) * kh * kw);
            let q = nf4::quantize(&raw);
            let (oh, ow) = (output_size(h, kh, stride, pad), output_size(w, kw, stride, pad));
            let mut out = vec![f32::NAN; batch * c_out * oh * ow];
            let flops = 2.0 * (batch * c_out * oh * ow * (c_in / groups) * kh * kw) as f64;
            // Median of 5 after a warm-up call (which grows the thread-local buffers).
            let mut times: Vec<f64> = (0..6)
                .map(|_| {
                    let start = std::time::Instant::now();
                    conv2d(&x, batch, c_in, h, w, MatrixRef::Nf4(q.view()), c_out, kh, kw, None, stride, pad, groups, Activation::None, &mut out);
                    start.elapsed().as_secs_f64()
                })
                .skip(1)
                .collect();
            times.sort_by(f64::total_cmp);
            let t = times[2];
            eprintln!("{name}: {:.2} ms, {:.1} GFLOP/s (median of 5)", t * 1e3, flops / t / 1e9);
        }
        let (c_in, h, w, c_out, k) = (256, 64, 64, 64, 2);
        let x = random(&mut rng, c_in * h * w);
        let q = nf4::quantize(&random(&mut rng, c_in * c_out * k * k));
        let mut out = vec![f32::NAN; c_out * h * k * w * k];
        let start = std::time::Instant::now();
        conv_transpose2d(&x, 1, c_in, h, w, MatrixRef::Nf4(q.view()), c_out, k, None, &mut out);
        let t = start.elapsed().as_secs_f64();
        let flops = 2.0 * (c_in * c_out * k * k * h * w) as f64;
        eprintln!("convT 2x2 256->64 @64x64: {:.1} ms, {:.1} GFLOP/s", t * 1e3, flops / t / 1e9);
    }
}
