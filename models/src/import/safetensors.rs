//! `.safetensors` files (Hugging Face): 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw
//! little-endian tensor bytes, offsets relative to the end of the header. Only floating
//! dtypes F32 / F16 / BF16 are read (to f32); every offset is checked against the file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

use super::fold::TensorMap;

/// Refuse absurd headers before allocating for them.
const MAX_HEADER: u64 = 100 << 20;

#[derive(Serialize, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Import(format!("safetensors: {}", msg.into()))
}

/// True when `bytes` start like a safetensors file (a plausible length then `{`).
pub fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

/// Every floating tensor in the file, converted to f32.
pub fn read(bytes: &[u8]) -> Result<TensorMap> {
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| bad("file shorter than 8 bytes"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER {
        return Err(bad(format!("header of {header_len} bytes is implausibly large")));
    }
    let data_start = 8 + header_len as usize;
    let header = bytes.get(8..data_start).ok_or_else(|| bad("header past the end of the file"))?;
    let data = &bytes[data_start..];
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let mut out = TensorMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry = serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let elem = match e.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => return Err(bad(format!("tensor {name}: dtype {other} is not supported (F32, F16, BF16)"))),
        };
        let [begin, end] = e.data_offsets;
        let numel = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("tensor {name}: shape overflows")))?;
        let want = numel.checked_mul(elem).ok_or_else(|| bad(format!("tensor {name}: size overflows")))?;
        let raw = data.get(begin..end).ok_or_else(|| bad(format!("tensor {name}: offsets {begin}..{end} outside {} data bytes", data.len())))?;
        if raw.len() != want {
            return Err(bad(format!("tensor {name}: {} bytes for shape {:?} of {}", raw.len(), e.shape, e.dtype)));
        }
        let values: Vec<f32> = match e.dtype.as_str() {
            "F32" => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "F16" => raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        out.insert(name, (e.shape, values));
    }
    Ok(out)
}

/// Writes f32 tensors as a safetensors file (header padded with spaces to 8 bytes).
pub fn write(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Shape(format!("{name}: {} values for shape {shape:?}", values.len())));
        }
        let end = offset + values.len() * 4;
        header.insert(name.clone(), Entry { dtype: "F32".into(), shape: shape.clone(), data_offsets: [offset, end] });
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    // Offsets were assigned in input order, so the data follows that order.
    for (_, _, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(|source| Error::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
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
