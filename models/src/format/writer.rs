//! Packing: every tensor of a [`WeightStore`] is encoded (NF4 or fp16 by [`is_quantised_by_default`]
//! and the `keep_fp16` patterns), laid out 64-byte aligned, checksummed, and written to a
//! temporary file that is fsynced and renamed over `out`, so a crash never leaves a half file.

use std::io::Write;
use std::path::Path;

use super::*;
use crate::store::WeightStore;
use crate::{Error, Result};

/// Sizes of what was written, per dtype.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackReport {
    pub file_bytes: u64,
    pub tensors: usize,
    pub nf4_tensors: usize,
    pub nf4_bytes: u64,
    pub f16_tensors: usize,
    pub f16_bytes: u64,
    pub f32_tensors: usize,
    pub f32_bytes: u64,
    /// The same parameters as f32, for the compression ratio.
    pub source_f32_bytes: u64,
}

/// Writes `store`'s tensors to `out` in the packed format.
pub fn pack(store: &dyn WeightStore, config: &ModelConfig, provenance: Provenance, keep_fp16: &[String], out: &Path) -> Result<PackReport> {
    pack_with_progress(store, config, provenance, keep_fp16, out, &mut |_| {})
}

/// Where [`pack_with_progress`] is: the CLI shows it (ViT-H's 2.5 GB of f32 take minutes to
/// quantise); the library only reports it, so it stays free of any terminal code.
#[derive(Clone, Copy, Debug)]
pub enum PackStep<'a> {
    /// Tensor `done` of `total` (1-based) was encoded.
    Encoded { done: usize, total: usize, name: &'a str },
    /// Every tensor is encoded; the file is being written and synced.
    Writing { bytes: u64 },
}

/// [`pack`], calling `progress` after each tensor and before the write.
pub fn pack_with_progress(
    store: &dyn WeightStore,
    config: &ModelConfig,
    mut provenance: Provenance,
    keep_fp16: &[String],
    out: &Path,
    progress: &mut dyn FnMut(PackStep<'_>),
) -> Result<PackReport> {
    provenance.keep_fp16 = keep_fp16.to_vec();
    let mut report = PackReport::default();
    let mut data: Vec<u8> = Vec::new();
    let mut tensors = Vec::new();
    let names = store.names();
    let n_tensors = names.len();
    for (i, name) in names.into_iter().enumerate() {
        let t = store.get(&name)?;
        let values = t.to_f32();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!("tensor {name} holds a non-finite value ({}) at element {i}", values[i])));
        }
        let quantise = is_quantised_by_default(&name, &t.shape) && !keep_fp16.iter().any(|p| glob_match(p, &name));
        let fits_f16 = values.iter().all(|v| v.abs() <= f32::from(half::f16::MAX));
        let (dtype, arrays): (Dtype, Vec<Vec<u8>>) = if quantise {
            let q = minisam_kernels::nf4::quantize(&values);
            (Dtype::Nf4, vec![q.codes, q.absmax_q, q.absmax_scales])
        } else if fits_f16 {
            (Dtype::F16, vec![values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()])
        } else {
            (Dtype::F32, vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()])
        };
        let mut crc = crc32fast::Hasher::new();
        let mut ranges = Vec::with_capacity(arrays.len());
        let mut bytes = 0u64;
        for a in &arrays {
            data.resize(align_up(data.len() as u64).ok_or_else(|| Error::Format("data too large".into()))? as usize, 0);
            ranges.push(ByteRange { offset: data.len() as u64, len: a.len() as u64 });
            data.extend_from_slice(a);
            crc.update(a);
            bytes += a.len() as u64;
        }
        let (count, total) = match dtype {
            Dtype::Nf4 => (&mut report.nf4_tensors, &mut report.nf4_bytes),
            Dtype::F16 => (&mut report.f16_tensors, &mut report.f16_bytes),
            Dtype::F32 => (&mut report.f32_tensors, &mut report.f32_bytes),
        };
        *count += 1;
        *total += bytes;
        report.tensors += 1;
        report.source_f32_bytes += 4 * values.len() as u64;
        progress(PackStep::Encoded { done: i + 1, total: n_tensors, name: &name });
        tensors.push(TensorEntry { name, shape: t.shape.iter().map(|&d| d as u64).collect(), dtype, arrays: ranges, crc32: crc.finalize() });
    }
    let manifest = Manifest { config: config.clone(), provenance, data_len: data.len() as u64, tensors };
    let (head, _) = encode_head(&manifest)?;
    report.file_bytes = (head.len() + data.len()) as u64;
    progress(PackStep::Writing { bytes: report.file_bytes });
    write_atomically(out, &[&head, &data])?;
    Ok(report)
}

/// Header + manifest + zero padding up to the data section; also returns the data start.
pub(crate) fn encode_head(manifest: &Manifest) -> Result<(Vec<u8>, usize)> {
    let m = postcard::to_stdvec(manifest).map_err(|e| Error::Format(format!("cannot encode manifest: {e}")))?;
    let m_len = u32::try_from(m.len()).map_err(|_| Error::Format("manifest larger than 4 GiB".into()))?;
    let mut head = Vec::with_capacity(HEADER_LEN + m.len() + ALIGN);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&m_len.to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(&m).to_le_bytes());
    head.extend_from_slice(&m);
    let start = align_up(head.len() as u64).unwrap_or(u64::MAX) as usize;
    head.resize(start, 0);
    Ok((head, start))
}

fn write_atomically(out: &Path, parts: &[&[u8]]) -> Result<()> {
    fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.display().to_string(), source }
    }
    let file_name = out.file_name().ok_or_else(|| Error::Input(format!("{} is not a file path", out.display())))?;
    let tmp = out.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        for p in parts {
            f.write_all(p).map_err(io(&tmp))?;
        }
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        // Make the rename itself durable; not every platform can open a directory, so best effort.
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
