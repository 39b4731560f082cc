//! The SAM-family networks, each written once over [`crate::backend::Backend`].

pub mod common;
