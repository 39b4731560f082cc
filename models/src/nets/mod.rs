//! The SAM-family networks, each written once over [`crate::backend::Backend`].

pub mod common;
pub mod mask_decoder;
pub(crate) mod neck;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod vit;
pub(crate) mod window;
pub mod transformer;
