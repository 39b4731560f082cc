//! NF4: 4-bit NormalFloat quantisation with double-quantised block scales, as in QLoRA.
//!
//! A tensor of `n` elements is taken in flattened row-major order and cut into blocks of
//! [`BLOCK`] = 64 elements. Each block stores 4-bit codes into [`NF4_TABLE`] (the 16 quantiles of
//! a standard normal, normalised to [-1, 1]) and one absolute maximum. The absmaxes themselves are
//! quantised ("double quantisation"): their mean is subtracted (one f32 `absmax_offset` per
//! tensor), and each group of [`SCALE_GROUP`] = 256 absmaxes is stored as `i8` with one f32 scale.
//! That costs 8 + 32/256 bits per 64 elements for scales, about 4.127 bits per weight in all.
//!
//! Elements are encoded against the *dequantised* absmax, so the error of the scale quantisation
//! is absorbed into the choice of code instead of compounding it.

/// Elements per quantisation block.
pub const BLOCK: usize = 64;
/// Blocks per double-quantisation group of absmaxes.
pub const SCALE_GROUP: usize = 256;

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
    /// One `i8` (stored as `u8`) per block.
    pub absmax_q: &'a [u8],
    /// One little-endian f32 per group of [`SCALE_GROUP`] blocks.
    pub absmax_scales: &'a [u8],
    pub absmax_offset: f32,
}

/// An owned NF4 tensor, as the packer produces it.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Owned {
    pub codes: Vec<u8>,
    pub absmax_q: Vec<u8>,
    pub absmax_scales: Vec<u8>,
    pub absmax_offset: f32,
}

impl Nf4Owned {
    pub fn view(&self) -> Nf4View<'_> {
        Nf4View { codes: &self.codes, absmax_q: &self.absmax_q, absmax_scales: &self.absmax_scales, absmax_offset: self.absmax_offset }
    }
}

/// Byte sizes of the three arrays for `n` elements: (codes, absmax_q, absmax_scales).
pub fn packed_sizes(n: usize) -> (usize, usize, usize) {
    let blocks = n.div_ceil(BLOCK);
    (n.div_ceil(2), blocks, blocks.div_ceil(SCALE_GROUP) * 4)
}

impl Nf4View<'_> {
    /// Checks that the arrays have exactly the sizes `n` elements need, so that later indexing
    /// cannot go out of bounds. The packed-file loader calls this before handing a view out.
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
        if !self.absmax_offset.is_finite() {
            return Err("NF4 absmax offset is not finite".into());
        }
        Ok(())
    }

    /// The dequantised absmax of block `b`.
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        let g = b / SCALE_GROUP;
        let s = &self.absmax_scales[4 * g..4 * g + 4];
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        (self.absmax_q[b] as i8) as f32 * scale + self.absmax_offset
    }

    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.codes[i / 2];
        if i % 2 == 0 {
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

/// Quantises `x` (flattened row-major) to NF4 with double-quantised scales.
///
/// Non-finite inputs are a caller bug (the packer rejects them with the tensor's name first); here
/// they would poison one block's absmax, so they are treated as zero rather than panicking.
pub fn quantize(x: &[f32]) -> Nf4Owned {
    let n = x.len();
    let blocks = n.div_ceil(BLOCK);
    let absmax: Vec<f32> = x
        .chunks(BLOCK)
        .map(|c| c.iter().filter(|v| v.is_finite()).fold(0.0f32, |m, v| m.max(v.abs())))
        .collect();
    let offset = if blocks == 0 { 0.0 } else { (absmax.iter().map(|&a| a as f64).sum::<f64>() / blocks as f64) as f32 };

    let mut absmax_q = vec![0u8; blocks];
    let mut absmax_scales = Vec::with_capacity(blocks.div_ceil(SCALE_GROUP) * 4);
    for (g, group) in absmax.chunks(SCALE_GROUP).enumerate() {
        let spread = group.iter().fold(0.0f32, |m, &a| m.max((a - offset).abs()));
        let scale = if spread > 0.0 { spread / 127.0 } else { 1.0 };
        absmax_scales.extend_from_slice(&scale.to_le_bytes());
        for (j, &a) in group.iter().enumerate() {
            let q = ((a - offset) / scale).round().clamp(-127.0, 127.0) as i8;
            absmax_q[g * SCALE_GROUP + j] = q as u8;
        }
    }

    let mut out = Nf4Owned { codes: vec![0u8; n.div_ceil(2)], absmax_q, absmax_scales, absmax_offset: offset };
    for (b, chunk) in x.chunks(BLOCK).enumerate() {
        let a = out.view().block_absmax(b);
        let inv = if a > 0.0 { 1.0 / a } else { 0.0 };
        for (j, &v) in chunk.iter().enumerate() {
            let v = if v.is_finite() { v } else { 0.0 };
            let code = nearest_code((v * inv).clamp(-1.0, 1.0));
            let i = b * BLOCK + j;
            if i % 2 == 0 {
                out.codes[i / 2] |= code;
            } else {
                out.codes[i / 2] |= code << 4;
            }
        }
    }
    out
}
