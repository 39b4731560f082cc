//! Opening a packed file: memory-map it read-only, validate everything (header, manifest,
//! every range, sizes against shapes, no overlaps, zero padding, every CRC) before any tensor
//! is handed out, then serve tensors as views into the map without copying.

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use minisam_kernels::nf4::Nf4View;
use sha2::{Digest, Sha256};

use super::*;
use crate::store::{Nf4Data, SharedBytes, StoredTensor, TensorData, WeightStore};
use crate::{Error, Result};

/// One row of [`PackedModel::tensors`], for `inspect`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub bytes: u64,
    pub crc32: u32,
}

/// A validated packed model.
pub struct PackedModel {
    map: Arc<Mmap>,
    manifest: Manifest,
    /// Absolute start of the data section.
    data_start: usize,
    /// Name → index into `manifest.tensors`.
    index: std::collections::BTreeMap<String, usize>,
    /// SHA-256 of the whole file, computed at open: it is the model's identity, which every
    /// adapter bind checks.
    sha256: String,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

impl PackedModel {
    pub fn open(path: &Path) -> Result<PackedModel> {
        let io = |source| Error::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_LEN as u64 {
            return Err(bad(format!("{}: {len} bytes is shorter than the {HEADER_LEN}-byte header", path.display())));
        }
        // SAFETY: the map is read-only; as with every memory-mapped model format, the file must
        // not be truncated or rewritten while open (the packer replaces files by rename).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_map(Arc::new(map)).map_err(|e| match e {
            Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    fn from_map(map: Arc<Mmap>) -> Result<PackedModel> {
        let (manifest, data_start) = parse_head(&map)?;
        let data = &map[data_start..];
        let index = validate_tensors(&manifest, data)?;
        let sha256 = crate::import::hex(&Sha256::digest(&map[..]));
        Ok(PackedModel { map, manifest, data_start, index, sha256 })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.manifest.config
    }

    pub fn provenance(&self) -> &Provenance {
        &self.manifest.provenance
    }

    /// Lower-case hex SHA-256 of the whole file (computed once, at open): the model's identity,
    /// named by adapters as their `base_model_sha256`.
    pub fn sha256_hex(&self) -> &str {
        &self.sha256
    }

    /// The same as [`PackedModel::sha256_hex`] (the name `inspect` and older callers use).
    pub fn file_sha256(&self) -> &str {
        &self.sha256
    }

    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.manifest
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                dtype: t.dtype,
                bytes: t.arrays.iter().map(|a| a.len).sum(),
                crc32: t.crc32,
            })
            .collect()
    }

    fn bytes(&self, r: &ByteRange) -> Result<SharedBytes> {
        // Ranges were validated at open, so these conversions cannot fail.
        let start = self.data_start + r.offset as usize;
        SharedBytes::new(self.map.clone() as Arc<dyn AsRef<[u8]> + Send + Sync>, start..start + r.len as usize)
    }
}

/// Runs every check [`PackedModel::open`] runs over a file held in memory and returns its
/// manifest: the fuzz harness (`benches/fuzz`) calls this so it needs no file to map per input.
pub fn validate(file: &[u8]) -> Result<Manifest> {
    let (manifest, data_start) = parse_head(file)?;
    validate_tensors(&manifest, &file[data_start..])?;
    Ok(manifest)
}

/// Checks the fixed header and decodes the manifest; returns it and the data section's start.
fn parse_head(file: &[u8]) -> Result<(Manifest, usize)> {
    if file.len() < HEADER_LEN {
        return Err(bad(format!("{} bytes is shorter than the {HEADER_LEN}-byte header", file.len())));
    }
    if &file[..8] != MAGIC {
        return Err(bad("wrong magic: not a MSAMPACK model file"));
    }
    let u32_at = |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(format!("format version {version}; this build reads version {VERSION} (repack the model with this version)")));
    }
    let m_len = u32_at(12) as usize;
    let m_end = HEADER_LEN.checked_add(m_len).filter(|&e| e <= file.len()).ok_or_else(|| bad(format!("manifest of {m_len} bytes runs past the end of the file")))?;
    let m = &file[HEADER_LEN..m_end];
    if crc32fast::hash(m) != u32_at(16) {
        return Err(bad("manifest checksum mismatch (file corrupted)"));
    }
    let manifest: Manifest = postcard::from_bytes(m).map_err(|e| bad(format!("manifest does not decode: {e}")))?;
    let data_start = align_up(m_end as u64).ok_or_else(|| bad("data start overflows"))? as usize;
    let expected = (data_start as u64).checked_add(manifest.data_len).ok_or_else(|| bad("data length overflows"))?;
    if expected != file.len() as u64 {
        return Err(bad(format!("file is {} bytes, header and manifest say {expected}", file.len())));
    }
    if file[m_end..data_start].iter().any(|&b| b != 0) {
        return Err(bad("non-zero padding after the manifest"));
    }
    Ok((manifest, data_start))
}

/// Expected byte lengths of a tensor's arrays.
fn expected_lens(t: &TensorEntry) -> Result<Vec<u64>> {
    let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).and_then(|n| usize::try_from(n).ok());
    let n = numel.ok_or_else(|| bad(format!("tensor {}: shape {:?} overflows", t.name, t.shape)))?;
    let lens = match t.dtype {
        Dtype::F16 => vec![(n as u64).checked_mul(2)],
        Dtype::F32 => vec![(n as u64).checked_mul(4)],
        Dtype::Nf4 => {
            let (c, q, s) = minisam_kernels::nf4::packed_sizes(n);
            vec![Some(c as u64), Some(q as u64), Some(s as u64)]
        }
    };
    lens.into_iter().collect::<Option<Vec<u64>>>().ok_or_else(|| bad(format!("tensor {}: size overflows", t.name)))
}

/// Every range inside the data, aligned, sized for its shape and dtype, non-overlapping, padding
/// zero and every CRC right. Returns the name index.
fn validate_tensors(m: &Manifest, data: &[u8]) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut index = std::collections::BTreeMap::new();
    let mut spans: Vec<(u64, u64, usize)> = Vec::new();
    for (i, t) in m.tensors.iter().enumerate() {
        if index.insert(t.name.clone(), i).is_some() {
            return Err(bad(format!("tensor {} listed twice", t.name)));
        }
        let lens = expected_lens(t)?;
        if lens.len() != t.arrays.len() {
            return Err(bad(format!("tensor {}: {:?} needs {} arrays, manifest lists {}", t.name, t.dtype, lens.len(), t.arrays.len())));
        }
        let mut crc = crc32fast::Hasher::new();
        for (a, &want) in t.arrays.iter().zip(&lens) {
            if a.len != want {
                return Err(bad(format!("tensor {}: array of {} bytes, shape {:?} as {:?} needs {want}", t.name, a.len, t.shape, t.dtype)));
            }
            if a.offset % ALIGN as u64 != 0 {
                return Err(bad(format!("tensor {}: array at {} is not {ALIGN}-byte aligned", t.name, a.offset)));
            }
            let end = a.offset.checked_add(a.len).filter(|&e| e <= data.len() as u64);
            let end = end.ok_or_else(|| bad(format!("tensor {}: array {}+{} outside the {}-byte data section", t.name, a.offset, a.len, data.len())))?;
            crc.update(&data[a.offset as usize..end as usize]);
            spans.push((a.offset, end, i));
        }
        if crc.finalize() != t.crc32 {
            return Err(bad(format!("tensor {}: checksum mismatch (file corrupted)", t.name)));
        }
        if t.dtype == Dtype::Nf4 {
            // Scale records decide every block's magnitude: a NaN or out-of-range one is refused
            // here, not discovered as NaN logits later.
            let slice = |r: &ByteRange| &data[r.offset as usize..(r.offset + r.len) as usize];
            let view = Nf4View { codes: slice(&t.arrays[0]), absmax_q: slice(&t.arrays[1]), absmax_scales: slice(&t.arrays[2]) };
            let n = t.shape.iter().product::<u64>() as usize;
            view.check_len(n).map_err(|e| bad(format!("tensor {}: {e}", t.name)))?;
        }
    }
    spans.sort_unstable();
    let mut cursor = 0u64;
    for &(start, end, i) in &spans {
        if start < cursor {
            return Err(bad(format!("tensor {}: array at {start} overlaps the previous array", m.tensors[i].name)));
        }
        if data[cursor as usize..start as usize].iter().any(|&b| b != 0) {
            return Err(bad(format!("non-zero padding before tensor {}", m.tensors[i].name)));
        }
        cursor = end;
    }
    if data[cursor as usize..].iter().any(|&b| b != 0) {
        return Err(bad("non-zero bytes after the last array"));
    }
    Ok(index)
}

impl WeightStore for PackedModel {
    fn get(&self, name: &str) -> Result<StoredTensor> {
        let &i = self.index.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let t = &self.manifest.tensors[i];
        let data = match t.dtype {
            Dtype::F16 => TensorData::F16(self.bytes(&t.arrays[0])?),
            Dtype::F32 => {
                let b = self.bytes(&t.arrays[0])?;
                TensorData::F32(b.as_slice().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::Nf4 => {
                let q = Nf4Data {
                    codes: self.bytes(&t.arrays[0])?,
                    absmax_q: self.bytes(&t.arrays[1])?,
                    absmax_scales: self.bytes(&t.arrays[2])?,
                };
                let n = t.shape.iter().product::<u64>() as usize;
                q.view().check_len(n).map_err(|e| bad(format!("tensor {name}: {e}")))?;
                TensorData::Nf4(q)
            }
        };
        Ok(StoredTensor { name: name.to_string(), shape: t.shape.iter().map(|&d| d as usize).collect(), data })
    }
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.manifest.tensors.iter().map(|t| t.name.clone()).collect()
    }
    fn model_sha256(&self) -> Option<&str> {
        Some(&self.sha256)
    }
}
