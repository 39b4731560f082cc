//! SAM-family networks for medical segmentation: checkpoint import, the packed NF4 model format,
//! and one implementation of the networks over a [`backend::Backend`].

pub mod adapter;
pub mod autograd;
pub mod backend;
pub mod buffer_pool;
pub mod config;
pub mod cost;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod format;
pub mod image;
pub mod import;
pub mod load;
pub mod nets;
pub mod npy;
pub mod pipeline;
pub mod prompt;
pub mod sam;
pub mod store;

pub use error::{Error, Result};
