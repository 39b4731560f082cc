//! The offline tools of QLoRA-MiniSAM as a library, so integration tests (`tests/`) and benches
//! (`benches/`) use the same image reading and evaluation protocol as the `minisam` binary.
//!
//! Layout: `cli` parses, `commands::*` run one subcommand each, `eval` holds the evaluation
//! protocol independent of any model, `image_io`/`dicom`/`nifti_io` turn files into the protocol's 3-channel
//! uint8 image, `overlay` draws masks and prompts over an image for people, `onnx` (feature `onnx`) imports and cross-checks ONNX exports through tract,
//! `runtime` holds process facts
//! (model path, peak memory).

pub mod cli;
pub mod commands;
pub mod dicom;
mod dicom_lengths;
pub mod distill;
pub mod embedding_cache;
pub mod eval;
pub mod frozen;
pub mod image_io;
pub mod nifti_io;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod overlay;
pub mod progress;
pub mod runtime;
pub mod selection;
pub mod train;
