//! Kernel parameter records, `#[repr(C)]` mirrors of the structs of the same names in
//! `kernels/*.cu`, passed by value. Every field is 8 bytes (or a pair of f32), so the C and Rust
//! layouts agree without padding rules; a test pins the sizes.

use cudarc::driver::DeviceRepr;

/// `WeightRef` (nf4_gemm.cu, conv.cu): a stored matrix in its precision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightRef {
    pub data: u64,
    pub absq: u64,
    pub scales: u64,
    pub kind: i64,
}

pub const W_F32: i64 = 0;
pub const W_F16: i64 = 1;
pub const W_NF4: i64 = 2;

pub const A_ROWMAJOR: i64 = 0;
pub const A_IM2COL: i64 = 1;

pub const C_ROWMAJOR: i64 = 0;
pub const C_NCHW: i64 = 1;
pub const C_CONVT: i64 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmParams {
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub batch_count: i64,
    pub a: u64,
    pub a_mode: i64,
    pub lda: i64,
    pub a_batch: i64,
    pub cin: i64,
    pub h: i64,
    pub w: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub oh: i64,
    pub ow: i64,
    pub b: WeightRef,
    pub sbn: i64,
    pub sbk: i64,
    pub b_batch: i64,
    pub c: u64,
    pub c_mode: i64,
    pub ldc: i64,
    pub c_batch: i64,
    pub ct_k: i64,
    pub bias: u64,
    pub bias_div: i64,
    pub residual: u64,
    pub act: i64,
    pub lora_t: u64,
    pub lora_b: WeightRef,
    pub lora_r: i64,
    pub lora_scale: f32,
    pub pad_: f32,
    pub lora_a: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub bh: i64,
    pub nq: i64,
    pub nk: i64,
    pub d: i64,
    pub scale: f32,
    pub pad_: f32,
    pub bias_mode: i64,
    pub table: u64,
    pub heads: i64,
    pub rel_h: u64,
    pub rel_w: u64,
    pub kh: i64,
    pub kw: i64,
}

pub const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PermuteParams {
    pub rank: i64,
    pub n: i64,
    pub out_shape: [i64; MAX_RANK],
    pub src_stride: [i64; MAX_RANK],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvParams {
    pub x: u64,
    pub out: u64,
    pub w: WeightRef,
    pub bias: u64,
    pub batch: i64,
    pub cin: i64,
    pub h: i64,
    pub w_: i64,
    pub cout: i64,
    pub kh: i64,
    pub kw: i64,
    pub stride: i64,
    pub pad: i64,
    pub groups: i64,
    pub oh: i64,
    pub ow: i64,
    pub act: i64,
}

// SAFETY: plain-old-data records of integers, floats and device addresses, laid out as the C
// structs they mirror (all fields 8 bytes wide, or two 4-byte floats together).
unsafe impl DeviceRepr for GemmParams {}
unsafe impl DeviceRepr for AttnParams {}
unsafe impl DeviceRepr for PermuteParams {}
unsafe impl DeviceRepr for ConvParams {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes as the C compiler lays the structs out (counted field by field from the .cu files).
    #[test]
    fn cuda_param_records_have_the_c_sizes() {
        assert_eq!(std::mem::size_of::<WeightRef>(), 32);
        // 32 eight-byte fields (lora_a last) + 2 WeightRefs + 2 f32
        assert_eq!(std::mem::size_of::<GemmParams>(), 8 * 32 + 2 * 32 + 8);
        assert_eq!(std::mem::size_of::<AttnParams>(), 8 * 15 + 8);
        assert_eq!(std::mem::size_of::<PermuteParams>(), 8 * (2 + 2 * MAX_RANK));
        assert_eq!(std::mem::size_of::<ConvParams>(), 8 * 16 + 32);
    }
}
