//! One error type for the engine; each variant says which part of the input was wrong.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    /// A file that is not what it claims to be: wrong magic, bad offsets, checksum mismatch.
    #[error("invalid model file: {0}")]
    Format(String),
    /// A checkpoint we cannot read or map onto a known architecture.
    #[error("cannot import checkpoint: {0}")]
    Import(String),
    #[error("missing tensor: {0}")]
    MissingTensor(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Caller input out of range: image size, prompt coordinates, NaN.
    #[error("invalid input: {0}")]
    Input(String),
    /// A LoRA adapter file that is damaged, or that does not fit the loaded model.
    #[error("adapter rejected: {0}")]
    Adapter(String),
    #[error("backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
