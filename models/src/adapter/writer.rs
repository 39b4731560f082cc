//! Writing adapters: factors laid out 64-byte aligned after the manifest, checksummed, and the
//! result validated by the reader before a byte leaves, so a writer can never produce a file
//! that `AdapterFile::open` refuses. Crash-safe installation (temp + fsync + rename) is the
//! installer's job (the daemon); this writes to whatever it is given.

use std::io::Write;

use super::*;
use crate::{Error, Result};

/// The complete file for `meta` and `factors` (one [`LoraFactors`] per adapted linear, in the
/// order they should appear), validated as the reader would.
pub fn encode_adapter(meta: &AdapterMeta, factors: &[LoraFactors]) -> Result<AdapterFile> {
    let rank = meta.rank as usize;
    let mut data: Vec<u8> = Vec::new();
    let mut tensors = Vec::with_capacity(factors.len());
    let mut put = |values: &[f32], crc: &mut crc32fast::Hasher| -> Result<ByteRange> {
        let start = crate::format::align_up(data.len() as u64).ok_or_else(|| Error::Adapter("data too large".into()))?;
        data.resize(start as usize, 0);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        crc.update(&bytes);
        data.extend_from_slice(&bytes);
        Ok(ByteRange { offset: start, len: bytes.len() as u64 })
    };
    for f in factors {
        // The reader would refuse these too, but only after the fact and with byte counts; say
        // it in the writer's terms.
        let (want_a, want_b) = (rank.checked_mul(f.in_features), f.out_features.checked_mul(rank));
        if want_a != Some(f.a.len()) || want_b != Some(f.b.len()) {
            return Err(Error::Adapter(format!(
                "tensor {}: A has {} values and B {}, rank {rank} with in {} / out {} needs {} and {}",
                f.name,
                f.a.len(),
                f.b.len(),
                f.in_features,
                f.out_features,
                rank as u128 * f.in_features as u128,
                f.out_features as u128 * rank as u128
            )));
        }
        let mut crc = crc32fast::Hasher::new();
        let a = put(&f.a, &mut crc)?;
        let b = put(&f.b, &mut crc)?;
        tensors.push(AdapterTensor { name: f.name.clone(), in_features: f.in_features as u64, out_features: f.out_features as u64, a, b, crc32: crc.finalize() });
    }
    let manifest = AdapterManifest {
        name: meta.name.clone(),
        modality: meta.modality.clone(),
        base_model_sha256: meta.base_model_sha256.clone(),
        rank: meta.rank,
        alpha: meta.alpha,
        targets: meta.targets.clone(),
        training_set_sha256: meta.training_set_sha256.clone(),
        created: meta.created.clone(),
        val_dice: meta.val_dice,
        trainer_version: meta.trainer_version.clone(),
        data_len: data.len() as u64,
        tensors,
    };
    let m = postcard::to_stdvec(&manifest).map_err(|e| Error::Adapter(format!("cannot encode manifest: {e}")))?;
    let m_len = u32::try_from(m.len()).map_err(|_| Error::Adapter("manifest larger than 4 GiB".into()))?;
    let mut file = Vec::with_capacity(HEADER_LEN + m.len() + ALIGN + data.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&VERSION.to_le_bytes());
    file.extend_from_slice(&m_len.to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(&m).to_le_bytes());
    file.extend_from_slice(&m);
    let start = crate::format::align_up(file.len() as u64).ok_or_else(|| Error::Adapter("manifest too large".into()))?;
    file.resize(start as usize, 0);
    file.extend_from_slice(&data);
    AdapterFile::from_bytes(file)
}

/// Encodes (see [`encode_adapter`]) and writes the file to `out` (a `File`, `&mut Vec<u8>`, a
/// socket); returns the validated adapter, whose `sha256_hex` is the written file's.
pub fn write_adapter<W: Write>(mut out: W, meta: &AdapterMeta, factors: &[LoraFactors]) -> Result<AdapterFile> {
    let adapter = encode_adapter(meta, factors)?;
    out.write_all(adapter.bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io { path: "<adapter output>".into(), source })?;
    Ok(adapter)
}
