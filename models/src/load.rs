//! Opening a model file of any supported kind: our packed NF4 file, or an official checkpoint
//! read directly in f32 (to separate quantisation error from implementation error).

use std::io::Read;
use std::path::Path;

use crate::config::ModelConfig;
use crate::format::PackedModel;
use crate::import::Checkpoint;
use crate::store::WeightStore;
use crate::{Error, Result};

pub enum ModelFile {
    Packed(PackedModel),
    Checkpoint(Checkpoint),
}

/// A file that is neither a checkpoint (zip, safetensors) nor an intact packed model, but whose
/// first bytes are mostly `MSAMPACK` or whose name ends in `.msam`: a packed model damaged in
/// copying deserves that diagnosis rather than "not a PyTorch checkpoint".
fn looks_like_damaged_pack(magic: &[u8; 8], path: &Path) -> bool {
    let same = magic.iter().zip(crate::format::MAGIC).filter(|(a, b)| a == b).count();
    !magic.starts_with(b"PK\x03\x04") && (same >= 4 || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("msam")))
}

impl ModelFile {
    /// Decides by content, not by extension: packed files start with `MSAMPACK`; anything else is
    /// handed to the checkpoint importer (PyTorch zip or safetensors).
    pub fn open(path: &Path) -> Result<Self> {
        let mut magic = [0u8; 8];
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        if n == magic.len() && &magic == crate::format::MAGIC {
            Ok(Self::Packed(PackedModel::open(path)?))
        } else if n == magic.len() && looks_like_damaged_pack(&magic, path) {
            Err(Error::Format(format!(
                "{}: starts with {:?} instead of \"MSAMPACK\": this looks like a damaged packed model; copy it again or re-run `minisam pack`",
                path.display(),
                String::from_utf8_lossy(&magic)
            )))
        } else {
            Ok(Self::Checkpoint(Checkpoint::open(path)?))
        }
    }

    pub fn store(&self) -> &dyn WeightStore {
        match self {
            Self::Packed(m) => m,
            Self::Checkpoint(c) => c,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Self::Packed(m) => m.config(),
            Self::Checkpoint(c) => c.config(),
        }
    }

    /// Lower-case hex SHA-256 of the whole model file (packed file or checkpoint): the identity
    /// adapters name as their base model.
    pub fn sha256_hex(&self) -> &str {
        match self {
            Self::Packed(m) => m.sha256_hex(),
            Self::Checkpoint(c) => c.sha256(),
        }
    }

    /// One line for logs and the CLI: kind, architecture, content hash prefix.
    pub fn describe(&self) -> String {
        let arch = match &self.config().encoder {
            crate::config::EncoderConfig::Vit(v) => format!("SAM ViT (dim {}, depth {})", v.embed_dim, v.depth),
            crate::config::EncoderConfig::TinyVit(t) => format!("TinyViT {:?}", t.embed_dims),
        };
        let input = self.config().image_size;
        match self {
            Self::Packed(m) => format!("packed NF4 model, {arch}, input {input}, sha256 {}", &m.sha256_hex()[..12]),
            Self::Checkpoint(c) => format!("f32 checkpoint, {arch}, input {input}, sha256 {}", &c.sha256()[..12]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn identity_is_the_sha256_of_the_whole_file_for_both_kinds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for path in [root.join("litemedsam-nf4.msam"), root.join("../tests/fixtures/tiny_sam/tiny_sam.pth")] {
            let want = crate::import::hex(&Sha256::digest(std::fs::read(&path).unwrap()));
            let file = ModelFile::open(&path).unwrap();
            assert_eq!(file.sha256_hex(), want, "{}", path.display());
            assert_eq!(file.store().model_sha256(), Some(want.as_str()));
            assert!(file.describe().contains(&want[..12]));
        }
    }

    #[test]
    fn a_packed_model_with_a_damaged_magic_is_called_that() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut bytes = std::fs::read(root.join("litemedsam-nf4.msam")).unwrap();
        bytes[3] ^= 0x20;
        let dir = std::env::temp_dir().join(format!("minisam-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["damaged.msam", "damaged.bin"] {
            let path = dir.join(name);
            std::fs::write(&path, &bytes).unwrap();
            let e = ModelFile::open(&path).err().expect("a damaged file must not open").to_string();
            assert!(e.contains("looks like a damaged packed model"), "{name}: {e}");
        }
        // Any other unknown file still gets the importer's answer.
        let other = dir.join("notes.txt");
        std::fs::write(&other, b"hello, this is not a model").unwrap();
        let e = ModelFile::open(&other).err().unwrap().to_string();
        assert!(!e.contains("packed model"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
