//! Compute kernels of QLoRA-MiniSAM, CPU reference implementations.
//!
//! Each kernel works on plain slices with explicit shapes (the first comment of each function
//! states them), so the same function is the reference a GPU kernel is checked against.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod fastmath;
pub mod gemm;
pub mod nf4;
pub mod norm;
pub mod resize;
pub mod weights;

pub use activation::Activation;
pub use weights::MatrixRef;
