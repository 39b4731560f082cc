//! Reading NumPy `.npy` arrays (version 1/2, little-endian f32/f64/u8, C order): the format of the
//! PyTorch reference's golden outputs and of the fixtures our Python generators write.

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parses an `.npy` file's bytes into f32 (f64 and u8 are converted).
pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    let bad = |m: &str| Error::Format(format!("npy: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing magic"));
    }
    let (header_len, header_start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(&format!("unsupported version {v}"))),
    };
    let data_start = header_start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or_else(|| bad("header past end"))?;
    let header = std::str::from_utf8(&bytes[header_start..data_start]).map_err(|_| bad("header not UTF-8"))?;

    let field = |key: &str| -> Result<&str> {
        let at = header.find(&format!("'{key}'")).ok_or_else(|| bad(&format!("no '{key}' in header")))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    if field("fortran_order")?.starts_with("True") {
        return Err(bad("Fortran order not supported"));
    }
    let descr = field("descr")?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or("");
    let shape_text = field("shape")?;
    let shape_text = shape_text.trim_start_matches('(').split(')').next().unwrap_or("");
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad(&format!("bad shape entry {s:?}"))))
        .collect::<Result<Vec<_>>>()?;
    let count: usize = shape.iter().product();
    let payload = &bytes[data_start..];
    let need = |size: usize| -> Result<&[u8]> {
        payload.get(..count.checked_mul(size).ok_or_else(|| bad("shape overflows"))?).ok_or_else(|| bad("data shorter than shape"))
    };
    let data = match descr {
        "<f4" => need(4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "<f8" => need(8)?.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
        "|u1" | "|b1" => need(1)?.iter().map(|&v| v as f32).collect(),
        other => return Err(bad(&format!("unsupported dtype {other}"))),
    };
    Ok(NpyArray { shape, data })
}

pub fn read(path: &std::path::Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    parse(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_f32_and_f64_arrays() {
        let vals = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.5];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = parse(&npy("<f4", "(2, 3)", &bytes)).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vals);
        let bytes: Vec<u8> = vals.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
        assert_eq!(parse(&npy("<f8", "(6,)", &bytes)).unwrap().data, vals);
    }

    #[test]
    fn refuses_truncated_and_foreign_data() {
        assert!(parse(b"not an npy").is_err());
        assert!(parse(&npy("<f4", "(4,)", &[0u8; 8])).is_err());
        assert!(parse(&npy("<i8", "(1,)", &[0u8; 8])).is_err());
    }
}
