//! NF4: 4-bit NormalFloat quantisation with double-quantised block scales, after QLoRA.
//!
//! A tensor of `n` elements is taken in flattened row-major order and cut into blocks of
//! [`BLOCK`] = 64 elements. Each block stores 4-bit codes into [`NF4_TABLE`] (the 16 quantiles of
//! a standard normal, normalised to [-1, 1]) and one absolute maximum. The absmaxes themselves are
//! quantised ("double quantisation") to 8 bits in groups of [`SCALE_GROUP`] = 256 blocks, each
//! group with an f32 offset and an f32 scale: 8 + 64/256 bits of scale per 64 elements, about
//! 4.13 bits per weight in all.
//!
//! Unlike QLoRA, the 8-bit code is linear in log2(absmax), not in absmax. QLoRA's weights are LLM
//! matrices whose block maxima are alike; ours include BatchNorm-folded convolutions whose output
//! channels differ in scale by orders of magnitude. A linear code around the mean gives the
//! smallest blocks an error larger than their own absmax, and LiteMedSAM lost most of its accuracy
//! that way; a log code bounds every block's *relative* scale error instead (half a step: under
//! 1.4% for a group spanning 16 octaves, and typically far less).
//!
//! Elements are encoded against the *dequantised* absmax, so the error of the scale quantisation
//! is absorbed into the choice of code instead of compounding it.

/// Elements per quantisation block.
pub const BLOCK: usize = 64;
/// Blocks per double-quantisation group of absmaxes.
pub const SCALE_GROUP: usize = 256;
/// Bytes of the per-group scale record: f32 log2 offset, then f32 log2 step.
pub const GROUP_RECORD: usize = 8;

/// The NF4 code book (QLoRA, Dettmers et al. 2023, Appendix E), ascending.
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A borrowed NF4 tensor (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Nf4View<'a> {
    /// `ceil(n/2)` bytes; element `2i` in the low nibble of byte `i`, `2i+1` in the high nibble.
    pub codes: &'a [u8],
    /// One `u8` per block: 0 for an all-zero block, else `1 + round((log2(absmax) - offset) / step)`.
    pub absmax_q: &'a [u8],
    /// One [`GROUP_RECORD`] per group of [`SCALE_GROUP`] blocks: f32 `offset`, f32 `step` (LE).
    pub absmax_scales: &'a [u8],
}

/// An owned NF4 tensor, as the packer produces it.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Owned {
    pub codes: Vec<u8>,
    pub absmax_q: Vec<u8>,
    pub absmax_scales: Vec<u8>,
}

impl Nf4Owned {
    pub fn view(&self) -> Nf4View<'_> {
        Nf4View { codes: &self.codes, absmax_q: &self.absmax_q, absmax_scales: &self.absmax_scales }
    }
}

/// Byte sizes of the three arrays for `n` elements: (codes, absmax_q, absmax_scales).
pub fn packed_sizes(n: usize) -> (usize, usize, usize) {
    let blocks = n.div_ceil(BLOCK);
    (n.div_ceil(2), blocks, blocks.div_ceil(SCALE_GROUP) * GROUP_RECORD)
}

fn read_f32(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl Nf4View<'_> {
    /// Checks that the arrays have exactly the sizes `n` elements need and that every group's
    /// offset and step are finite, so later indexing cannot go out of bounds and no block decodes
    /// to NaN or infinity. The packed-file loader calls this before handing a view out.
    pub fn check_len(&self, n: usize) -> Result<(), String> {
        let (c, q, s) = packed_sizes(n);
        if self.codes.len() != c || self.absmax_q.len() != q || self.absmax_scales.len() != s {
            return Err(format!(
                "NF4 arrays of {} / {} / {} bytes do not fit {n} elements (expected {c} / {q} / {s})",
                self.codes.len(),
                self.absmax_q.len(),
                self.absmax_scales.len()
            ));
        }
        for (g, record) in self.absmax_scales.chunks_exact(GROUP_RECORD).enumerate() {
            let (offset, step) = (read_f32(record, 0), read_f32(record, 4));
            // 2^(offset + 254·step) must stay finite: f32 absmaxes lie in 2^-149 .. 2^128.
            let top = offset as f64 + 254.0 * step as f64;
            if !offset.is_finite() || !step.is_finite() || step < 0.0 || !(-160.0..=128.0).contains(&offset) || top > 128.0 {
                return Err(format!("NF4 scale group {g} has offset {offset}, step {step}: not a valid log2 range"));
            }
        }
        Ok(())
    }

    /// The dequantised absmax of block `b`.
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        let q = self.absmax_q[b];
        if q == 0 {
            return 0.0;
        }
        let record = (b / SCALE_GROUP) * GROUP_RECORD;
        let (offset, step) = (read_f32(self.absmax_scales, record), read_f32(self.absmax_scales, record + 4));
        (offset + (q - 1) as f32 * step).exp2()
    }

    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.codes[i / 2];
        if i.is_multiple_of(2) {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }
}

/// Writes elements `start .. start + out.len()` of the tensor into `out`, as f32.
/// This is the tile-level primitive the GEMM uses: it never needs the whole tensor in f32.
pub fn dequantize(q: &Nf4View<'_>, start: usize, out: &mut [f32]) {
    let mut i = start;
    let end = start + out.len();
    let mut o = 0;
    while i < end {
        let block = i / BLOCK;
        let block_end = ((block + 1) * BLOCK).min(end);
        let absmax = q.block_absmax(block);
        while i < block_end {
            out[o] = NF4_TABLE[q.code(i) as usize] * absmax;
            i += 1;
            o += 1;
        }
    }
}

/// Index of the code-book entry nearest to `x` (x already normalised to [-1, 1]).
#[inline]
pub fn nearest_code(x: f32) -> u8 {
    // Midpoints between consecutive table entries partition the line; ties go to the upper code.
    let mut code = 0u8;
    for k in 0..15 {
        let mid = 0.5 * (NF4_TABLE[k] + NF4_TABLE[k + 1]);
        if x >= mid {
            code = k as u8 + 1;
        }
    }
    code
}

/// The 8-bit log code of one group of absmaxes: its `(offset, step)` record and codes.
fn quantize_group(absmax: &[f32]) -> ([f32; 2], Vec<u8>) {
    let logs = absmax.iter().filter(|&&a| a > 0.0).map(|&a| a.log2());
    let (lo, hi) = logs.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), l| (lo.min(l), hi.max(l)));
    if lo > hi {
        return ([0.0, 0.0], vec![0; absmax.len()]); // every block is zero
    }
    let step = (hi - lo) / 254.0;
    let codes = absmax
        .iter()
        .map(|&a| match a > 0.0 {
            false => 0,
            true if step == 0.0 => 1,
            true => 1 + ((a.log2() - lo) / step).round().clamp(0.0, 254.0) as u8,
        })
        .collect();
    ([lo, step], codes)
}

/// Quantises `x` (flattened row-major) to NF4 with double-quantised scales.
///
/// Non-finite inputs are a caller bug (the packer rejects them with the tensor's name first); here
/// they would poison one block's absmax, so they are treated as zero rather than panicking.
pub fn quantize(x: &[f32]) -> Nf4Owned {
    let n = x.len();
    let absmax: Vec<f32> = x
        .chunks(BLOCK)
        .map(|c| c.iter().filter(|v| v.is_finite()).fold(0.0f32, |m, v| m.max(v.abs())))
        .collect();

    let mut out = Nf4Owned { codes: vec![0u8; n.div_ceil(2)], absmax_q: Vec::with_capacity(absmax.len()), absmax_scales: Vec::new() };
    for group in absmax.chunks(SCALE_GROUP) {
        let ([offset, step], codes) = quantize_group(group);
        out.absmax_scales.extend_from_slice(&offset.to_le_bytes());
        out.absmax_scales.extend_from_slice(&step.to_le_bytes());
        out.absmax_q.extend_from_slice(&codes);
    }

    for (b, chunk) in x.chunks(BLOCK).enumerate() {
        let a = out.view().block_absmax(b);
        let inv = if a > 0.0 { 1.0 / a } else { 0.0 };
        for (j, &v) in chunk.iter().enumerate() {
            let v = if v.is_finite() { v } else { 0.0 };
            let code = nearest_code((v * inv).clamp(-1.0, 1.0));
            let i = b * BLOCK + j;
            if i.is_multiple_of(2) {
                out.codes[i / 2] |= code;
            } else {
                out.codes[i / 2] |= code << 4;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(rand::random())
    }

    fn dequantize_all(q: &Nf4Owned, n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize(&q.view(), 0, &mut out);
        out
    }

    /// The largest distance between consecutive table entries.
    fn largest_gap() -> f32 {
        NF4_TABLE.windows(2).map(|p| p[1] - p[0]).fold(0.0, f32::max)
    }

    #[test]
    fn table_is_the_published_qlora_code_book() {
        // bitsandbytes `create_normal_map` / QLoRA Appendix E, as printed there (f64 digits).
        let published = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        for (i, (&ours, &theirs)) in NF4_TABLE.iter().zip(&published).enumerate() {
            assert!((ours as f64 - theirs).abs() <= 1e-7, "entry {i}: {ours} != {theirs}");
        }
    }

    #[test]
    fn table_is_ascending_and_nearly_symmetric() {
        assert!(NF4_TABLE.windows(2).all(|p| p[0] < p[1]), "not strictly ascending");
        assert_eq!((NF4_TABLE[0], NF4_TABLE[7], NF4_TABLE[15]), (-1.0, 0.0, 1.0));
        // Seven negative and eight positive quantiles: each negative magnitude falls between the
        // positive entries of the same and the next rank.
        for i in 1..7 {
            let negative = -NF4_TABLE[7 - i];
            assert!(NF4_TABLE[7 + i] < negative && negative < NF4_TABLE[8 + i], "rank {i}: {negative}");
        }
    }

    #[test]
    fn nearest_code_picks_each_entry_and_its_neighbourhood() {
        for (c, &v) in NF4_TABLE.iter().enumerate() {
            assert_eq!(nearest_code(v) as usize, c);
        }
        let mut rng = rng();
        for _ in 0..10_000 {
            let x: f32 = rng.gen_range(-1.0..=1.0);
            let best = (0..16).min_by(|&a, &b| (NF4_TABLE[a] - x).abs().total_cmp(&(NF4_TABLE[b] - x).abs())).unwrap();
            let got = nearest_code(x) as usize;
            assert!((NF4_TABLE[got] - x).abs() <= (NF4_TABLE[best] - x).abs(), "x={x}: code {got}, nearest {best}");
        }
    }

    #[test]
    fn exact_table_values_times_absmax_round_trip() {
        let mut rng = rng();
        let absmax: f32 = rng.gen_range(0.01..100.0);
        let blocks = 3;
        let mut codes: Vec<u8> = (0..blocks * BLOCK).map(|_| rng.gen_range(0..16)).collect();
        for b in 0..blocks {
            codes[b * BLOCK + rng.gen_range(0..BLOCK)] = 15; // makes the block's absmax exact
        }
        let x: Vec<f32> = codes.iter().map(|&c| NF4_TABLE[c as usize] * absmax).collect();
        let q = quantize(&x);
        // Equal absmaxes: a zero-width log range, exact but for the f32 log2/exp2 round trip.
        for b in 0..blocks {
            assert!((q.view().block_absmax(b) / absmax - 1.0).abs() <= 1e-6);
        }
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(q.view().code(i), c, "element {i}");
        }
        for (got, want) in dequantize_all(&q, x.len()).iter().zip(&x) {
            assert!((got - want).abs() <= 1e-6 * absmax);
        }
    }

    #[test]
    fn quantisation_error_is_bounded() {
        let mut rng = rng();
        // More than one scale group, blocks of very different magnitudes, a ragged last block.
        let n = BLOCK * (SCALE_GROUP + 37) + 23;
        let block_scales: Vec<f32> = (0..n.div_ceil(BLOCK)).map(|_| 10f32.powf(rng.gen_range(-2.0..1.0))).collect();
        let x: Vec<f32> = (0..n).map(|i| rng.gen_range(-1.0..1.0) * block_scales[i / BLOCK]).collect();
        let q = quantize(&x);
        let y = dequantize_all(&q, n);
        let half_gap = 0.5 * largest_gap();
        for (b, chunk) in x.chunks(BLOCK).enumerate() {
            let true_absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let stored_absmax = q.view().block_absmax(b);
            let scale_error = (true_absmax - stored_absmax).abs();
            for (j, &v) in chunk.iter().enumerate() {
                let i = b * BLOCK + j;
                let bound = half_gap * stored_absmax + scale_error + 1e-6 * true_absmax;
                assert!((y[i] - v).abs() <= bound, "element {i}: {v} -> {}, bound {bound}", y[i]);
            }
        }
    }

    #[test]
    fn double_quantised_absmaxes_keep_relative_precision() {
        // Block scales spread over six orders of magnitude, as BatchNorm folding produces: every
        // block's dequantised absmax must be within half a log step of the true one.
        let mut rng = rng();
        let n = BLOCK * (2 * SCALE_GROUP + 5);
        let x: Vec<f32> = (0..n).map(|i| rng.gen_range(-1.0..1.0) * 10f32.powi((i / BLOCK % 7) as i32 - 5)).collect();
        let absmax: Vec<f32> = x.chunks(BLOCK).map(|c| c.iter().fold(0.0f32, |m, v| m.max(v.abs()))).collect();
        let q = quantize(&x);
        for (g, group) in absmax.chunks(SCALE_GROUP).enumerate() {
            let logs: Vec<f64> = group.iter().map(|&a| (a as f64).log2()).collect();
            let span = logs.iter().cloned().fold(f64::MIN, f64::max) - logs.iter().cloned().fold(f64::MAX, f64::min);
            let bound = (span / 254.0 / 2.0).exp2() - 1.0 + 1e-6;
            for (j, &a) in group.iter().enumerate() {
                let b = g * SCALE_GROUP + j;
                let rel = ((q.view().block_absmax(b) - a) / a).abs() as f64;
                assert!(rel <= bound, "block {b}: absmax {a}, relative error {rel} > {bound}");
            }
        }
        // The same data through a linear 8-bit code around the mean (QLoRA's) would lose the
        // small blocks entirely; here even the 1e-5-scaled blocks keep their scale to < 2.2%.
        assert!((0..absmax.len()).all(|b| q.view().block_absmax(b) > 0.0));
    }

    #[test]
    fn corrupt_scale_records_are_refused() {
        let q = quantize(&[0.5f32; 3 * BLOCK]);
        let mut scales = q.absmax_scales.clone();
        scales[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        let view = Nf4View { codes: &q.codes, absmax_q: &q.absmax_q, absmax_scales: &scales };
        assert!(view.check_len(3 * BLOCK).is_err());
        scales[0..8].copy_from_slice(&[100.0f32.to_le_bytes(), 1.0f32.to_le_bytes()].concat());
        let view = Nf4View { codes: &q.codes, absmax_q: &q.absmax_q, absmax_scales: &scales };
        assert!(view.check_len(3 * BLOCK).is_err(), "2^(100 + 254) overflows f32");
        assert!(q.view().check_len(3 * BLOCK).is_ok());
        assert!(q.view().check_len(3 * BLOCK + 1).is_err());
    }

    #[test]
    fn packed_sizes_match_quantize_and_known_values() {
        assert_eq!(packed_sizes(0), (0, 0, 0));
        assert_eq!(packed_sizes(1), (1, 1, 8));
        assert_eq!(packed_sizes(64), (32, 1, 8));
        assert_eq!(packed_sizes(65), (33, 2, 8));
        assert_eq!(packed_sizes(BLOCK * SCALE_GROUP), (8192, 256, 8));
        assert_eq!(packed_sizes(BLOCK * SCALE_GROUP + 1), (8193, 257, 16));
        let mut rng = rng();
        for n in [0, 1, 2, 63, 64, 65, 127, 16_384, 16_385, rng.gen_range(1..100_000)] {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let q = quantize(&x);
            assert_eq!((q.codes.len(), q.absmax_q.len(), q.absmax_scales.len()), packed_sizes(n), "n={n}");
            assert!(q.view().check_len(n).is_ok());
            assert!(q.view().check_len(n + 128).is_err());
        }
    }

    #[test]
    fn zero_blocks_dequantise_to_zero() {
        let mut rng = rng();
        let mut x: Vec<f32> = (0..BLOCK * 5).map(|_| rng.gen_range(-2.0..2.0)).collect();
        x[BLOCK * 2..BLOCK * 3].fill(0.0);
        let y = dequantize_all(&quantize(&x), x.len());
        assert!(y[BLOCK * 2..BLOCK * 3].iter().all(|&v| v == 0.0));
        assert!(y.iter().all(|v| v.is_finite()));

        let zeros = vec![0.0f32; 130];
        assert_eq!(dequantize_all(&quantize(&zeros), 130), zeros);
    }

    #[test]
    fn partial_ranges_equal_the_full_dequantisation() {
        let mut rng = rng();
        let n = 1000;
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let q = quantize(&x);
        let full = dequantize_all(&q, n);
        for _ in 0..50 {
            let start = rng.gen_range(0..n);
            let len = rng.gen_range(0..=n - start);
            let mut part = vec![f32::NAN; len];
            dequantize(&q.view(), start, &mut part);
            assert_eq!(part, full[start..start + len]);
        }
    }

    #[test]
    fn non_finite_inputs_become_zero() {
        let mut x = vec![0.5f32; BLOCK];
        x[3] = f32::NAN;
        x[9] = f32::INFINITY;
        let y = dequantize_all(&quantize(&x), BLOCK);
        assert_eq!((y[3], y[9], y[0]), (0.0, 0.0, 0.5));
    }
}
