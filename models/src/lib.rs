//! SAM-family networks for medical segmentation: checkpoint import, the packed NF4 model format,
//! and one implementation of the networks over a [`backend::Backend`].

pub mod backend;
pub mod config;
pub mod error;
pub mod image;
pub mod nets;
pub mod prompt;
pub mod store;

pub use error::{Error, Result};
