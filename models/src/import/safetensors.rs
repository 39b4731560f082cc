//! `.safetensors` files (Hugging Face): 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw
//! little-endian tensor bytes. The header is untrusted input, so it is parsed and validated
//! (header size limit, offsets contiguous and inside the file, byte counts matching shapes) by
//! the `safetensors` crate, the format's reference implementation; we only convert the
//! floating dtypes F32 / F16 / BF16 to f32.

#[cfg(feature = "checkpoint-import")]
use ::safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

use super::fold::TensorMap;

#[cfg(feature = "checkpoint-import")]
fn bad(msg: impl Into<String>) -> Error {
    Error::Import(format!("safetensors: {}", msg.into()))
}

/// True when `bytes` start like a safetensors file (a plausible length then `{`).
pub fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

/// Without the `checkpoint-import` feature no safetensors file is read or written.
#[cfg(not(feature = "checkpoint-import"))]
pub fn read(_bytes: &[u8]) -> Result<TensorMap> {
    Err(Error::Import("this build reads packed models only (minisam-models without its `checkpoint-import` feature); pack the checkpoint with `minisam pack CKPT -o FILE.msam`".into()))
}

#[cfg(not(feature = "checkpoint-import"))]
pub fn write(_path: &std::path::Path, _tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    Err(Error::Import("this build reads packed models only (minisam-models without its `checkpoint-import` feature); pack the checkpoint with `minisam pack CKPT -o FILE.msam`".into()))
}

/// Every floating tensor in the file, converted to f32.
#[cfg(feature = "checkpoint-import")]
pub fn read(bytes: &[u8]) -> Result<TensorMap> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("{e} (truncated or not a safetensors file: re-download or re-export it)")))?;
    let mut out = TensorMap::new();
    for (name, view) in file.iter() {
        let raw = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(bad(format!("tensor {name}: dtype {other:?} is not supported (F32, F16, BF16)"))),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Writes f32 tensors as a safetensors file (through the crate's serializer, so what we write
/// is what every other reader expects).
#[cfg(feature = "checkpoint-import")]
pub fn write(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, shape, values) in tensors {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Shape(format!("{name}: {} values for shape {shape:?}", values.len())));
        }
        bytes.push(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            ::safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.as_str(), v)).map_err(|e| bad(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let out = ::safetensors::serialize(views, None).map_err(|e| bad(e.to_string()))?;
    std::fs::write(path, out).map_err(|source| Error::Io { path: path.display().to_string(), source })
}

#[cfg(all(test, feature = "checkpoint-import"))]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_f16_and_bf16() {
        let mut data = half::f16::from_f32(1.5).to_le_bytes().to_vec();
        data.extend_from_slice(&half::bf16::from_f32(-2.0).to_le_bytes());
        let h = r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[2,4]},"__metadata__":{"format":"pt"}}"#;
        let t = read(&file(h, &data)).unwrap();
        assert_eq!(t["a"].1, [1.5]);
        assert_eq!(t["b"].1, [-2.0]);
    }

    #[test]
    fn bad_offsets_shapes_and_dtypes_are_errors() {
        let data = [0u8; 8];
        for h in [
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            r#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
            r#"{"a":"#,
        ] {
            assert!(read(&file(h, &data)).is_err(), "{h}");
        }
        let mut huge = file("{}", &[]);
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read(&huge).is_err());
        assert!(read(&[1, 2, 3]).is_err());
    }
}
