//! Compute kernels of QLoRA-MiniSAM, CPU reference implementations.
//!
//! Each kernel works on plain slices with explicit shapes (the first comment of each function
//! states them), so the same function is the reference a GPU kernel is checked against.

pub mod activation;
pub mod activation_backward;
pub mod attention;
pub mod attention_backward;
pub mod conv;
#[cfg(target_arch = "x86_64")]
mod conv_dw_avx512;
pub mod conv_backward;
pub mod depthwise_nhwc;
pub mod fastmath;
pub mod gemm;
pub mod gemm_backward;
pub mod inverted_residual;
#[cfg(target_arch = "x86_64")]
mod gelu_avx2;
#[cfg(target_arch = "x86_64")]
mod gelu_avx512;
mod microkernel;
#[cfg(test)]
mod gradcheck;
pub mod nf4;
pub mod norm;
pub mod norm_backward;
mod packed_gemm;
pub mod resize;
pub mod resize_backward;
pub mod simd;
pub mod transpose;
pub mod upscale;
pub mod weights;

pub use activation::Activation;
pub use weights::MatrixRef;
