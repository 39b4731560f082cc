//! Image embeddings kept on disk, so that a frozen image encoder runs once per image across
//! training epochs, validation, and the zero-shot and adapter evaluations of the same images.
//!
//! An entry is addressed by content: SHA-256 over the model file's hash, the hash of whatever
//! changes the encoder beyond the base (an adapter with image-encoder layers; empty otherwise),
//! the backend's numerics when they are not the CPU reference's (`Backend::numerics`: a GPU's
//! bf16 embeddings never stand in for the CPU's, nor the other way round) and the image's size and
//! pixels. A flipped training image is a different image and gets its own
//! entry. Values are stored in f32, exactly as the encoder produced them, so an evaluation that
//! reads the cache scores bit for bit what an uncached one would.
//!
//! File layout (little endian): magic `MSEMBED1`, rank `u32`, dims `u32 × rank`, the f32 values,
//! then the SHA-256 of everything before it. A truncated or altered entry fails its checksum and
//! is recomputed (with a warning) instead of being used. Writes go to a temporary file renamed into
//! place, so a run killed mid-write leaves no half entry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minisam_models::backend::Backend;
use minisam_models::image::RgbImage;
use minisam_models::sam::Segmenter;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"MSEMBED1";
const MAX_RANK: usize = 8;

/// An encoder output: its shape and values.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Embeddings for one (model, encoder variant): in a directory, or in memory for one run.
pub struct EmbeddingCache {
    store: Store,
    /// Hash input shared by every key of this cache: model and encoder-changing adapter.
    identity: Vec<u8>,
}

enum Store {
    Dir(PathBuf),
    /// Bounded by the run's distinct images (a training set of at most a few hundred images,
    /// two variants each; 4 MB per LiteMedSAM embedding).
    Memory(RefCell<HashMap<String, Embedding>>),
}

fn identity(model_sha256: &str, encoder_variant: &str) -> Vec<u8> {
    format!("minisam-embedding-v1\nmodel {model_sha256}\nencoder {encoder_variant}\n").into_bytes()
}

impl EmbeddingCache {
    /// Opens (creating) `dir` for embeddings of the model whose file hashes to `model_sha256`,
    /// with `encoder_variant` naming anything that changes the encoder's output beyond the base
    /// (the SHA-256 of an adapter that has image-encoder layers), or `""`.
    pub fn open(dir: &Path, model_sha256: &str, encoder_variant: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating embedding cache {}", dir.display()))?;
        Ok(Self { store: Store::Dir(dir.to_path_buf()), identity: identity(model_sha256, encoder_variant) })
    }

    /// A cache that lives as long as the value (same keys as [`EmbeddingCache::open`]).
    pub fn in_memory(model_sha256: &str, encoder_variant: &str) -> Self {
        Self { store: Store::Memory(RefCell::new(HashMap::new())), identity: identity(model_sha256, encoder_variant) }
    }

    fn key(&self, image: &RgbImage, numerics: &str) -> String {
        let mut h = Sha256::new();
        h.update(&self.identity);
        // Nothing added for the reference numerics, so entries made before backends were told
        // apart keep their keys.
        if !numerics.is_empty() {
            h.update(b"numerics:");
            h.update((numerics.len() as u64).to_le_bytes());
            h.update(numerics.as_bytes());
        }
        h.update((image.width as u64).to_le_bytes());
        h.update((image.height as u64).to_le_bytes());
        h.update(&image.data);
        format!("{:x}", h.finalize())
    }

    /// The embedding of `image` from the cache, or `encode(image)` stored for next time, for an
    /// encoder computing with the CPU reference's numerics.
    pub fn get_or_encode(&self, image: &RgbImage, encode: impl FnOnce() -> Result<Embedding>) -> Result<Embedding> {
        self.get_or_encode_as(image, "", encode)
    }

    /// [`EmbeddingCache::get_or_encode`] for an encoder computing with `numerics`
    /// (`Backend::numerics`).
    pub fn get_or_encode_as(&self, image: &RgbImage, numerics: &str, encode: impl FnOnce() -> Result<Embedding>) -> Result<Embedding> {
        let key = self.key(image, numerics);
        let dir = match &self.store {
            Store::Dir(dir) => dir,
            Store::Memory(map) => {
                if let Some(e) = map.borrow().get(&key) {
                    return Ok(e.clone());
                }
                let embedding = encode()?;
                map.borrow_mut().insert(key, embedding.clone());
                return Ok(embedding);
            }
        };
        let path = dir.join(&key[..2]).join(format!("{}.emb", &key[2..]));
        if path.exists() {
            match read_entry(&path) {
                Ok(e) => return Ok(e),
                Err(e) => eprintln!("warning: embedding cache entry {} unusable ({e:#}); encoding again", path.display()),
            }
        }
        let embedding = encode()?;
        write_entry(&path, &embedding).with_context(|| format!("writing embedding cache entry {}", path.display()))?;
        Ok(embedding)
    }
}

impl EmbeddingCache {
    /// The embedding of `image` from the cache, or `segmenter`'s encoder output stored for next time.
    pub fn embedding<B: Backend>(&self, segmenter: &Segmenter<B>, image: &RgbImage) -> Result<Embedding> {
        self.get_or_encode_as(image, &segmenter.backend().numerics(), || {
            let e = segmenter.encode(image)?;
            let b = segmenter.backend();
            Ok(Embedding { shape: b.shape(&e.embedding).to_vec(), values: b.to_host(&e.embedding)? })
        })
    }
}

fn encode_entry(e: &Embedding) -> Result<Vec<u8>> {
    if e.shape.len() > MAX_RANK || e.shape.iter().product::<usize>() != e.values.len() {
        bail!("embedding of shape {:?} with {} values", e.shape, e.values.len());
    }
    let mut bytes = Vec::with_capacity(16 + 4 * e.shape.len() + 4 * e.values.len() + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
    for &d in &e.shape {
        bytes.extend_from_slice(&u32::try_from(d).context("embedding dimension over u32")?.to_le_bytes());
    }
    for v in &e.values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    Ok(bytes)
}

fn decode_entry(bytes: &[u8]) -> Result<Embedding> {
    if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..8] != MAGIC {
        bail!("not an embedding cache entry");
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        bail!("checksum mismatch");
    }
    let u32_at = |at: usize| -> Result<usize> {
        let b = body.get(at..at + 4).context("entry truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let rank = u32_at(8)?;
    if rank > MAX_RANK {
        bail!("rank {rank} over {MAX_RANK}");
    }
    let shape = (0..rank).map(|i| u32_at(12 + 4 * i)).collect::<Result<Vec<_>>>()?;
    let data = &body[12 + 4 * rank..];
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
    if data.len() != 4 * count {
        bail!("{} value bytes for shape {shape:?}", data.len());
    }
    let values = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Embedding { shape, values })
}

fn read_entry(path: &Path) -> Result<Embedding> {
    decode_entry(&std::fs::read(path)?)
}

fn write_entry(path: &Path, e: &Embedding) -> Result<()> {
    let bytes = encode_entry(e)?;
    let dir = path.parent().context("cache entry without a directory")?;
    std::fs::create_dir_all(dir)?;
    // Unique per process, so concurrent runs sharing a cache never write the same temporary file.
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn image(seed: u8) -> RgbImage {
        RgbImage { width: 5, height: 4, data: (0..60).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect() }
    }

    fn embedding(seed: f32) -> Embedding {
        Embedding { shape: vec![1, 2, 3, 2], values: (0..12).map(|i| i as f32 * 0.25 - seed).collect() }
    }

    fn entry_path(dir: &Path, cache: &EmbeddingCache, image: &RgbImage) -> PathBuf {
        let key = cache.key(image, "");
        dir.join(&key[..2]).join(format!("{}.emb", &key[2..]))
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisam-embcache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn an_entry_is_computed_once_and_read_back_exactly() {
        let dir = temp_dir("once");
        let cache = EmbeddingCache::open(&dir, "aa", "").unwrap();
        let calls = Cell::new(0);
        let encode = || {
            calls.set(calls.get() + 1);
            Ok(embedding(1.5))
        };
        let first = cache.get_or_encode(&image(0), encode).unwrap();
        let second = cache.get_or_encode(&image(0), encode).unwrap();
        assert_eq!(calls.get(), 1);
        assert_eq!(first, second);
        // Another image, model or encoder variant is another entry.
        cache.get_or_encode(&image(1), encode).unwrap();
        EmbeddingCache::open(&dir, "bb", "").unwrap().get_or_encode(&image(0), encode).unwrap();
        EmbeddingCache::open(&dir, "aa", "adapter").unwrap().get_or_encode(&image(0), encode).unwrap();
        assert_eq!(calls.get(), 4);
        // Other numerics (a GPU's) are other entries; the reference's are the plain ones.
        cache.get_or_encode_as(&image(0), "cuda-bf16", encode).unwrap();
        cache.get_or_encode_as(&image(0), "cuda-bf16", encode).unwrap();
        assert_eq!(calls.get(), 5);
        cache.get_or_encode_as(&image(0), "", encode).unwrap();
        assert_eq!(calls.get(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_memory_store_computes_each_image_once() {
        let cache = EmbeddingCache::in_memory("aa", "");
        let calls = Cell::new(0);
        let encode = || {
            calls.set(calls.get() + 1);
            Ok(embedding(calls.get() as f32))
        };
        let first = cache.get_or_encode(&image(0), encode).unwrap();
        assert_eq!(cache.get_or_encode(&image(0), encode).unwrap(), first);
        cache.get_or_encode(&image(3), encode).unwrap();
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_corrupt_or_truncated_entry_is_encoded_again_not_used() {
        let dir = temp_dir("corrupt");
        let cache = EmbeddingCache::open(&dir, "aa", "").unwrap();
        cache.get_or_encode(&image(0), || Ok(embedding(0.0))).unwrap();
        let path = entry_path(&dir, &cache, &image(0));
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        for bad in [flipped, good[..good.len() - 5].to_vec(), b"MSEMBED1".to_vec()] {
            std::fs::write(&path, &bad).unwrap();
            let got = cache.get_or_encode(&image(0), || Ok(embedding(2.0))).unwrap();
            assert_eq!(got, embedding(2.0), "a damaged entry was used");
            // ... and the fresh value replaced it.
            assert_eq!(read_entry(&path).unwrap(), embedding(2.0));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_encoder_error_is_returned_and_nothing_is_stored() {
        let dir = temp_dir("error");
        let cache = EmbeddingCache::open(&dir, "aa", "").unwrap();
        assert!(cache.get_or_encode(&image(0), || bail!("encoder failed")).is_err());
        assert!(!entry_path(&dir, &cache, &image(0)).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
