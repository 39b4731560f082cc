//! Element-wise activations fused into the epilogues of GEMM and convolution.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    Gelu,
    Relu,
}
