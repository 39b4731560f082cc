//! PyTorch zip checkpoints (`torch.save` ≥ 1.6): locate `<root>/data.pkl`, run it through the
//! restricted pickle VM, and gather each tensor's elements from `<root>/data/<key>` following
//! its offset and strides (so transposed or sliced tensors come out right), converting to f32.

use super::fold::TensorMap;
use super::pickle::{self, StorageDtype, TensorRef, Value};
use super::zip;
use crate::{Error, Result};

/// Every floating tensor of the state dict in `bytes` (integer scalars such as
/// `num_batches_tracked` are dropped).
pub fn read(bytes: &[u8]) -> Result<TensorMap> {
    let entries = zip::entries(bytes)?;
    let pkl = entries
        .keys()
        .find(|k| k.ends_with("/data.pkl") && k.matches('/').count() == 1)
        .ok_or_else(|| Error::Import("zip has no <root>/data.pkl: not a torch.save checkpoint".into()))?
        .clone();
    let root = pkl.trim_end_matches("data.pkl").to_string();
    let top = pickle::load(&entries[&pkl])?;
    let dict = state_dict(&top, true)?;
    let mut out = TensorMap::new();
    for (name, t) in dict {
        if matches!(t.dtype, StorageDtype::I64 | StorageDtype::I32) {
            // Checked: the sizes come from the file, and an overflowing product is no scalar.
            if t.size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n <= 1) {
                continue;
            }
            return Err(Error::Import(format!("tensor {name}: integer tensors are not model weights")));
        }
        let key = format!("{root}data/{}", t.key);
        let data = entries.get(&key).ok_or_else(|| Error::Import(format!("tensor {name}: storage {key} missing from the zip")))?;
        let values = gather(data, &t).map_err(|e| Error::Import(format!("tensor {name}: {e}")))?;
        out.insert(name, (t.size.clone(), values));
    }
    Ok(out)
}

/// The `{name: tensor}` dict: the top-level object, or its `"model"` / `"state_dict"` entry.
/// Only one level is unwrapped, so a self-referencing pickle cannot recurse forever.
fn state_dict(top: &Value, unwrap: bool) -> Result<Vec<(String, TensorRef)>> {
    let d = match top {
        Value::Dict(d) => d.borrow(),
        _ => return Err(Error::Import("checkpoint top level is not a dict".into())),
    };
    for wrapper in ["model", "state_dict"].iter().filter(|_| unwrap) {
        if let Some((_, inner)) = d.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == wrapper)) {
            if matches!(inner, Value::Dict(_)) {
                return state_dict(inner, false);
            }
        }
    }
    let mut out = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => out.push((k.clone(), (**t).clone())),
            (Value::Str(k), _) => return Err(Error::Import(format!("state dict entry {k} is not a tensor"))),
            _ => return Err(Error::Import("state dict key is not a string".into())),
        }
    }
    Ok(out)
}

/// Reads `t`'s elements, row-major, from its storage bytes.
fn gather(storage: &[u8], t: &TensorRef) -> std::result::Result<Vec<f32>, String> {
    let elem = t.dtype.size();
    let storage_len = storage.len() / elem;
    let numel = t.size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Only a broadcast (stride-0) view can have more elements than its storage; no parameter is
    // one, and allowing it would let a tiny file request an arbitrarily large allocation.
    if numel > storage_len {
        return Err(format!("{numel} elements from a storage of {storage_len}: broadcast views are not weights"));
    }
    // Highest element index touched: offset + Σ (size_i − 1)·stride_i.
    let last = t.size.iter().zip(&t.stride).try_fold(t.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
    match last {
        Some(l) if l < storage_len => {}
        _ => return Err(format!("sizes {:?} strides {:?} offset {} reach past a storage of {storage_len} elements", t.size, t.stride, t.offset)),
    }
    let read = |i: usize| -> f32 {
        let b = &storage[i * elem..(i + 1) * elem];
        match t.dtype {
            StorageDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    };
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; t.size.len()];
    for _ in 0..numel {
        let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(read(at));
        for axis in (0..index.len()).rev() {
            index[axis] += 1;
            if index[axis] < t.size[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(out)
}

/// One storage and the tensors viewing it, for [`write_raw`].
pub struct RawStorage {
    pub key: String,
    pub values: Vec<f32>,
}

/// Writes a checkpoint in torch.save's zip layout (`<root>/data.pkl`, `<root>/data/<key>`,
/// `<root>/version`, `<root>/byteorder`) from explicit views, so tests can build strided tensors.
pub fn write_raw(root: &str, views: &[(String, TensorRef)], storages: &[RawStorage]) -> Result<Vec<u8>> {
    let mut z = zip::ZipWriter::default();
    let numel = storages.iter().map(|s| (s.key.clone(), s.values.len())).collect();
    z.add(&format!("{root}/data.pkl"), &pickle::write_state_dict(views, &numel))?;
    z.add(&format!("{root}/byteorder"), b"little")?;
    for s in storages {
        let bytes: Vec<u8> = s.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        z.add(&format!("{root}/data/{}", s.key), &bytes)?;
    }
    z.add(&format!("{root}/version"), b"3\n")?;
    Ok(z.finish())
}

/// Contiguous f32 tensors → torch.save bytes (one storage per tensor, keys "0", "1", …).
pub fn write(root: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    let mut storages = Vec::with_capacity(tensors.len());
    for (i, (name, shape, values)) in tensors.iter().enumerate() {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Shape(format!("{name}: {} values for shape {shape:?}", values.len())));
        }
        let mut stride = vec![1usize; shape.len()];
        for a in (0..shape.len().saturating_sub(1)).rev() {
            stride[a] = stride[a + 1] * shape[a + 1];
        }
        let key = i.to_string();
        views.push((name.clone(), TensorRef { dtype: StorageDtype::F32, key: key.clone(), offset: 0, size: shape.clone(), stride }));
        storages.push(RawStorage { key, values: values.clone() });
    }
    write_raw(root, &views, &storages)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_are_gathered_row_major() {
        // Storage holds a 2x3 row-major matrix; the views are its transpose and a column slice.
        let storage = RawStorage { key: "0".into(), values: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0] };
        let views = vec![
            ("t".to_string(), TensorRef { dtype: StorageDtype::F32, key: "0".into(), offset: 0, size: vec![3, 2], stride: vec![1, 3] }),
            ("col".to_string(), TensorRef { dtype: StorageDtype::F32, key: "0".into(), offset: 1, size: vec![2], stride: vec![3] }),
        ];
        let bytes = write_raw("ck", &views, &[storage]).unwrap();
        let t = read(&bytes).unwrap();
        assert_eq!(t["t"], (vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]));
        assert_eq!(t["col"], (vec![2], vec![1.0, 4.0]));
    }

    #[test]
    fn views_past_their_storage_are_errors() {
        let storage = RawStorage { key: "0".into(), values: vec![0.0; 6] };
        for (offset, size, stride) in [(1, vec![2, 3], vec![3, 1]), (0, vec![4], vec![2]), (usize::MAX / 2, vec![2], vec![usize::MAX / 2]), (0, vec![1 << 40], vec![0])] {
            let views = vec![("x".to_string(), TensorRef { dtype: StorageDtype::F32, key: "0".into(), offset, size, stride })];
            let bytes = write_raw("ck", &views, &[RawStorage { key: "0".into(), values: storage.values.clone() }]).unwrap();
            assert!(matches!(read(&bytes), Err(Error::Import(_))));
        }
        let views = vec![("x".to_string(), TensorRef { dtype: StorageDtype::F32, key: "9".into(), offset: 0, size: vec![1], stride: vec![1] })];
        assert!(read(&write_raw("ck", &views, &[storage]).unwrap()).is_err());
    }

    #[test]
    fn integer_tensor_of_overflowing_shape_is_an_error_not_a_panic() {
        // Found writing benches/fuzz's pth_reader (which reproduces it): the "integer scalar,
        // drop it" test multiplied the sizes unchecked, so 2^62 x 8 overflowed (a panic with
        // overflow checks, a wrapped 0 and a silently dropped tensor without).
        let size = vec![1usize << 62, 8];
        let views = vec![("n".to_string(), TensorRef { dtype: StorageDtype::I64, key: "0".into(), offset: 0, size, stride: vec![8, 1] })];
        let bytes = write_raw("ck", &views, &[RawStorage { key: "0".into(), values: vec![0.0; 2] }]).unwrap();
        assert!(matches!(read(&bytes), Err(Error::Import(_))));
    }

    #[test]
    fn self_referencing_dict_is_an_error_not_a_stack_overflow() {
        // {"model": <the same dict>}
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X'];
        p.extend_from_slice(&5u32.to_le_bytes());
        p.extend_from_slice(b"model");
        p.extend_from_slice(&[b'h', 0, b's', b'.']);
        let mut z = zip::ZipWriter::default();
        z.add("ck/data.pkl", &p).unwrap();
        assert!(matches!(read(&z.finish()), Err(Error::Import(_))));
    }

    #[test]
    fn any_single_byte_change_never_panics() {
        let tensors = vec![
            ("a".to_string(), vec![2, 3], vec![1.0; 6]),
            ("b.weight".to_string(), vec![4], vec![2.0; 4]),
        ];
        let good = write("ck", &tensors).unwrap();
        for at in 0..good.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] ^= x;
                let _ = read(&b); // Ok or Err, but no panic.
            }
        }
    }
}
