//! Named parameters as they are stored: in a packed model (NF4 / fp16, memory-mapped) or in a
//! checkpoint imported to f32 in memory. Networks read their weights through [`WeightStore`] by
//! canonical name (the `segment_anything` naming, with BatchNorms already folded into the
//! preceding convolution — see `crate::import`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crate::{Error, Result};

/// Bytes shared with their owner (a memory map or an in-memory buffer), never copied.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl SharedBytes {
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(Error::Format(format!("byte range {range:?} outside a buffer of {len} bytes")));
        }
        Ok(Self { owner, range })
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self { owner: Arc::new(v), range: 0..len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len())
    }
}

/// The payload of one stored tensor.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// Plain f32 (checkpoint import path, unquantised).
    F32(Arc<[f32]>),
    /// IEEE fp16, little-endian, one `u16` per element.
    F16(SharedBytes),
    /// NF4 with double-quantised block scales; layout in `minisam_kernels::nf4`.
    Nf4(Nf4Data),
}

/// The three arrays of an NF4 tensor of `n` elements (flattened row-major):
/// - `codes`: `ceil(n/2)` bytes, element `2i` in the low nibble of byte `i`, `2i+1` in the high;
/// - `absmax_q`: one log2-coded `u8` per block of 64 elements, `ceil(n/64)` bytes;
/// - `absmax_scales`: an f32 (LE) log2 offset and step per group of 256 blocks.
///
/// `minisam_kernels::nf4` documents the encoding.
#[derive(Clone, Debug)]
pub struct Nf4Data {
    pub codes: SharedBytes,
    pub absmax_q: SharedBytes,
    pub absmax_scales: SharedBytes,
}

#[derive(Clone, Debug)]
pub struct StoredTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl StoredTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Dequantise to f32, whatever the stored dtype. For parameters that are small, or for tests.
    pub fn to_f32(&self) -> Vec<f32> {
        let n = self.numel();
        match &self.data {
            TensorData::F32(v) => v.to_vec(),
            TensorData::F16(bytes) => bytes
                .as_slice()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TensorData::Nf4(q) => {
                let mut out = vec![0.0f32; n];
                minisam_kernels::nf4::dequantize(&q.view(), 0, &mut out);
                out
            }
        }
    }
}

impl Nf4Data {
    /// The borrowed view the kernels work on.
    pub fn view(&self) -> minisam_kernels::nf4::Nf4View<'_> {
        minisam_kernels::nf4::Nf4View {
            codes: self.codes.as_slice(),
            absmax_q: self.absmax_q.as_slice(),
            absmax_scales: self.absmax_scales.as_slice(),
        }
    }
}

/// Where networks find their parameters.
pub trait WeightStore: Send + Sync {
    /// The tensor called `name`, or a clear error naming what is missing.
    fn get(&self, name: &str) -> Result<StoredTensor>;
    fn contains(&self, name: &str) -> bool;
    /// Every tensor name, in a stable order.
    fn names(&self) -> Vec<String>;

    /// Identity of the file these weights came from: lower-case hex SHA-256 of the whole file,
    /// or `None` for weights built in memory. LoRA adapters name the base model by this hash,
    /// so a `Segmenter` loaded from a store without one cannot bind adapters.
    fn model_sha256(&self) -> Option<&str> {
        None
    }

    /// `get`, then check the shape: networks call this so a mismatched checkpoint is refused with
    /// the tensor's name instead of failing deep inside an operation.
    fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<StoredTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::Shape(format!("tensor {name}: expected shape {shape:?}, found {:?}", t.shape)));
        }
        Ok(t)
    }
}

/// Named f32 tensors held in memory: weights built in code (tests, adapters under training, small
/// derived parameters) rather than read from a file. The map is public so builders can fill it.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore(pub BTreeMap<String, (Vec<usize>, Vec<f32>)>);

impl MemoryStore {
    pub fn new(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Self {
        Self(tensors.into_iter().map(|(name, shape, values)| (name, (shape, values))).collect())
    }
}

impl WeightStore for MemoryStore {
    fn get(&self, name: &str) -> Result<StoredTensor> {
        let (shape, values) = self.0.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Shape(format!("tensor {name}: shape {shape:?} but {} values", values.len())));
        }
        Ok(StoredTensor { name: name.to_string(), shape: shape.clone(), data: TensorData::F32(values.as_slice().into()) })
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}
