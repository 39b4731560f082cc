//! An ONNX graph reduced to what the mapper needs: the float constants (initializers and
//! `Constant` nodes) in the order the graph first consumes them, each with the op and input slot
//! that consumes it.
//!
//! Why the order of use and not the names: exporters rename initializers freely (torch.onnx
//! calls a transposed linear weight `onnx::MatMul_1234`, BatchNorm-folded kernels
//! `onnx::Conv_56`), but ONNX requires nodes in topological order and a traced exporter emits
//! them in the module's forward order, so the sequence of parameter uses is the architecture
//! read aloud. Constants that only pass through `Identity`/`Cast`/`Transpose` are followed to
//! their consumer (the transpose applied), so `MatMul(x, Transpose(W))` is seen as `MatMul`
//! with a right operand `Wᵀ`, the same as a folded export. Scalars and integer constants (shapes,
//! indices, epsilons) carry no weights and are left out.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::pb::{self, AttributeProto, NodeProto, TensorProto};
use tract_onnx::prelude::{DatumType, Framework, TractResult};

use super::contrib::{self, Tool};

/// One use of a float constant by a node.
#[derive(Clone, Debug)]
pub struct ParamUse {
    /// The constant's name in the file (an initializer, or a `Constant` node's output).
    pub tensor: String,
    /// Name and op type of the consuming node; for a foreign op, the standard op its weights
    /// are read as (`com.microsoft.FusedMatMul` is a `MatMul`, see [`contrib`]).
    pub node: String,
    pub op: String,
    /// The consuming node's op as the file writes it, when it differs from `op`.
    pub written_as: Option<String>,
    /// Which input of the node the constant feeds.
    pub input: usize,
    /// `Gemm`'s `transB` (the weight is `[out, in]` when set); false for every other op.
    pub trans_b: bool,
    /// Factor the node applies to this constant's contribution: `alpha` of `Gemm` and
    /// `FusedMatMul` (weights), `beta` of `Gemm` (bias); 1 for every other op.
    pub scale: f32,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl ParamUse {
    pub fn numel(&self) -> usize {
        self.values.len()
    }

    /// "tensor `X` (shape [..]) at input N of node `Y` (Op)", for errors.
    pub fn describe(&self) -> String {
        let op = match &self.written_as {
            Some(w) => format!("{w}, read as {}", self.op),
            None => self.op.clone(),
        };
        format!("ONNX tensor `{}` {:?} at input {} of node `{}` ({op})", self.tensor, self.shape, self.input, self.node)
    }
}

/// One file read by the importer, with the SHA-256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadFile {
    pub path: PathBuf,
    pub sha256: String,
    /// For an external-data file: the file name of the model that refers to it.
    pub external_data_of: Option<String>,
}

/// An ONNX model as the importer read it.
pub struct OnnxModel {
    pub uses: Vec<ParamUse>,
    /// The model file, then each external-data file in the order first used.
    pub files: Vec<ReadFile>,
    /// Some weights were stored as fp16 (they are converted to f32).
    pub fp16: bool,
    /// Who wrote the file, for messages.
    pub tool: Tool,
}

/// Ops that carry a constant through unchanged (or transposed) to its real consumer. The
/// reshaping ones keep the row-major values; the mapper checks element counts, not their shape.
const PASS_THROUGH: &[&str] = &["Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"];

/// Ops of quantised graphs: their weights are integers the mapper cannot read as SAM weights.
const QUANTISED: &[&str] = &[
    "DequantizeLinear",
    "QuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "QGemm",
];

/// Reads `path` and lists its parameter uses in graph order.
pub fn read_uses(path: &Path) -> Result<Vec<ParamUse>> {
    Ok(read_model(path, &mut Sha256::new())?.uses)
}

/// Reads `path` (and the external-data files it names, resolved inside its directory), hashing
/// every file read, and lists its parameter uses in graph order. `all_bytes` is fed the files'
/// bytes in the order of [`OnnxModel::files`].
pub fn read_model(path: &Path, all_bytes: &mut Sha256) -> Result<OnnxModel> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Decoded from the very bytes that are hashed.
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .with_context(|| format!("{} is not a readable ONNX model", path.display()))?;
    let graph = proto.graph.as_ref().with_context(|| format!("{}: the ONNX model has no graph", path.display()))?;
    let tool = Tool::of(&proto);
    let resolver = HashingResolver::default();
    let dir = model_dir(path);
    let (uses, fp16) = uses_of_graph(graph, &dir, &resolver, &tool).with_context(|| format!("reading the graph of {}", path.display()))?;
    let model_name = file_name(path);
    all_bytes.update(&bytes);
    let mut files = vec![ReadFile { path: path.to_path_buf(), sha256: sha256_hex(&bytes), external_data_of: None }];
    files.extend(resolver.into_files(all_bytes).into_iter().map(|(path, sha256)| ReadFile { path, sha256, external_data_of: Some(model_name.clone()) }));
    Ok(OnnxModel { uses, files, fp16, tool })
}

/// The directory external data is resolved in, as tract wants it (`""` for a bare file name).
pub fn model_dir(path: &Path) -> String {
    path.parent().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves external data from whole-file memory maps, each hashed once: every byte the importer
/// reads lies in a file whose SHA-256 is recorded. (tract checks the location first: relative,
/// inside the model's directory.)
#[derive(Default)]
struct HashingResolver {
    files: RefCell<Vec<(PathBuf, Mmap)>>,
}

impl HashingResolver {
    /// The files read, in first-use order, with their SHA-256; `all_bytes` is fed each in turn.
    fn into_files(self, all_bytes: &mut Sha256) -> Vec<(PathBuf, String)> {
        let files = self.files.into_inner();
        files
            .into_iter()
            .map(|(p, map)| {
                all_bytes.update(&map[..]);
                (p, sha256_hex(&map))
            })
            .collect()
    }
}

impl ModelDataResolver for HashingResolver {
    fn read_bytes_from_path(&self, buf: &mut Vec<u8>, p: &Path, offset: usize, length: Option<usize>) -> TractResult<()> {
        let mut files = self.files.borrow_mut();
        let at = match files.iter().position(|(q, _)| q == p) {
            Some(at) => at,
            None => {
                let file = std::fs::File::open(p).with_context(|| format!("opening the external data file {}", p.display()))?;
                // SAFETY: read-only map of a file the caller does not write; a concurrent writer
                // could change the bytes, as with any reader.
                let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", p.display()))?;
                files.push((p.to_path_buf(), map));
                files.len() - 1
            }
        };
        let map = &files[at].1;
        let end = match length {
            Some(len) => offset.checked_add(len),
            None => Some(map.len()),
        };
        match end {
            Some(end) if offset <= end && end <= map.len() => {
                buf.extend_from_slice(&map[offset..end]);
                Ok(())
            }
            _ => bail!("external data at offset {offset}, length {length:?} lies past the end of {} ({} bytes)", p.display(), map.len()),
        }
    }
}

/// ONNX `TensorProto.DataType` codes of float tensors: FLOAT, FLOAT16, DOUBLE, BFLOAT16.
const FLOAT_TYPES: [i32; 4] = [1, 10, 11, 16];

fn uses_of_graph(graph: &pb::GraphProto, dir: &str, resolver: &HashingResolver, tool: &Tool) -> Result<(Vec<ParamUse>, bool)> {
    let mut consts: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    for node in &graph.node {
        if node.op_type == "Constant" && contrib::is_standard(&node.domain) {
            if let (Some(out), Some(t)) = (node.output.first(), attr(node, "value").and_then(|a| a.t.as_ref())) {
                consts.insert(out.as_str(), t);
            }
        }
    }
    // Outputs of pass-through nodes over constants: name -> (source constant, the transposes met
    // on the way, each `perm` or `None` for Transpose's default axis reversal).
    let mut derived: HashMap<&str, (&str, Vec<Option<Vec<usize>>>)> = HashMap::new();
    let mut uses = Vec::new();
    let mut seen = HashSet::new();
    let mut fp16 = false;
    for node in &graph.node {
        if QUANTISED.contains(&node.op_type.as_str()) {
            bail!("node `{}` is a {}: quantised ONNX graphs are not supported, export the float model", node.name, contrib::qualified(node));
        }
        let standard = contrib::is_standard(&node.domain);
        if standard && node.op_type == "Constant" {
            continue;
        }
        // Only the first input carries data; the others of Reshape/Unsqueeze/Squeeze are shapes/axes.
        if standard && PASS_THROUGH.contains(&node.op_type.as_str()) && !node.input.is_empty() && node.output.len() == 1 {
            if let Some((src, mut perms)) = source(&derived, &consts, &node.input[0]) {
                if node.op_type == "Transpose" {
                    perms.push(attr(node, "perm").map(|a| a.ints.iter().map(|&i| i as usize).collect()));
                }
                derived.insert(node.output[0].as_str(), (src, perms));
                continue;
            }
        }
        let float_constant = |i: usize| {
            node.input.get(i).and_then(|n| source(&derived, &consts, n)).is_some_and(|(src, _)| FLOAT_TYPES.contains(&consts[src].data_type) && consts[src].dims.iter().product::<i64>() > 1)
        };
        let slots = if standard {
            contrib::standard_slots(node)
        } else {
            match contrib::foreign_slots(node, &float_constant)? {
                Some(slots) => slots,
                None if (0..node.input.len()).any(float_constant) => bail!(
                    "node `{}` is `{}` (domain `{}`, written by {tool}), which the importer cannot read weights through; export the model again without that tool, or map the op in trainer/src/onnx/contrib.rs",
                    node.name,
                    node.op_type,
                    node.domain
                ),
                None => continue,
            }
        };
        for slot in slots {
            let Some(input) = node.input.get(slot.input) else { continue };
            let Some((src, perms)) = source(&derived, &consts, input) else { continue };
            // Each constant is reported once, at its first use (a shared weight is one
            // parameter); each part of a packed one once.
            if !seen.insert((src, slot.part)) {
                continue;
            }
            let Some((mut shape, mut values, was_f16)) = load_float(consts[src], dir, resolver).with_context(|| format!("reading constant `{src}`"))? else { continue };
            if values.len() <= 1 {
                continue;
            }
            fp16 |= was_f16;
            for p in perms {
                let p = p.unwrap_or_else(|| (0..shape.len()).rev().collect());
                (shape, values) = transpose(&shape, &values, &p).with_context(|| format!("transposing {src} for node `{}`", node.name))?;
            }
            if slot.transpose_last_two && shape.len() >= 2 {
                let mut p: Vec<usize> = (0..shape.len()).collect();
                p.swap(shape.len() - 2, shape.len() - 1);
                (shape, values) = transpose(&shape, &values, &p)?;
            }
            let mut tensor = src.to_string();
            if let Some(part) = slot.part {
                let size = shape.last().copied().unwrap_or(0);
                let (start, len) = part.range(size).with_context(|| format!("node `{}` ({}): {part:?} does not fit `{src}` {shape:?}", node.name, contrib::qualified(node)))?;
                (shape, values) = last_axis_part(&shape, &values, start, len);
                tensor = format!("{src}[..., {start}..{}]", start + len);
            }
            let written_as = (!standard || slot.op != node.op_type).then(|| contrib::qualified(node));
            let trans_b = slot.op == "Gemm" && attr(node, "transB").is_some_and(|a| a.i != 0);
            uses.push(ParamUse { tensor, node: node.name.clone(), op: slot.op, written_as, input: slot.slot, trans_b, scale: slot.scale, shape, values });
        }
    }
    Ok((uses, fp16))
}

/// The constant behind `name` (directly, or through pass-through nodes) and the transposes met.
fn source<'g>(
    derived: &HashMap<&'g str, (&'g str, Vec<Option<Vec<usize>>>)>,
    consts: &HashMap<&'g str, &'g TensorProto>,
    name: &str,
) -> Option<(&'g str, Vec<Option<Vec<usize>>>)> {
    if let Some((s, p)) = derived.get(name) {
        Some((*s, p.clone()))
    } else {
        consts.get_key_value(name).map(|(k, _)| (*k, Vec::new()))
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// A float constant as f32 (f16/f64 converted) and whether it was f16; `None` for integer and
/// boolean tensors.
fn load_float(t: &TensorProto, dir: &str, resolver: &HashingResolver) -> Result<Option<(Vec<usize>, Vec<f32>, bool)>> {
    let tensor = tract_onnx::tensor::load_tensor(resolver, t, Some(dir)).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let was_f16 = tensor.datum_type() == DatumType::F16;
    if !matches!(tensor.datum_type(), DatumType::F16 | DatumType::F32 | DatumType::F64) {
        return Ok(None);
    }
    let f = tensor.cast_to::<f32>().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let values: Vec<f32> = f.to_plain_array_view::<f32>().map_err(|e| anyhow::anyhow!("{e:#}"))?.iter().copied().collect();
    Ok(Some((tensor.shape().to_vec(), values, was_f16)))
}

/// Entries `start..start + len` of the last axis of a row-major tensor.
fn last_axis_part(shape: &[usize], values: &[f32], start: usize, len: usize) -> (Vec<usize>, Vec<f32>) {
    let size = shape.last().copied().unwrap_or(1).max(1);
    let values = values.chunks(size).flat_map(|row| row[start..start + len].iter().copied()).collect();
    let mut shape = shape.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = len;
    }
    (shape, values)
}

/// Row-major transpose by `perm` (`out.shape[i] = shape[perm[i]]`).
pub fn transpose(shape: &[usize], values: &[f32], perm: &[usize]) -> Result<(Vec<usize>, Vec<f32>)> {
    let rank = shape.len();
    let mut sorted = perm.to_vec();
    sorted.sort_unstable();
    if perm.len() != rank || sorted.iter().enumerate().any(|(i, &p)| i != p) {
        bail!("permutation {perm:?} does not fit a rank-{rank} tensor");
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; rank];
    for _ in 0..values.len() {
        out.push(values[index.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum::<usize>()]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < out_shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok((out_shape, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_index_arithmetic() {
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let (shape, t) = transpose(&[2, 3, 4], &values, &[2, 0, 1]).unwrap();
        assert_eq!(shape, [4, 2, 3]);
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    assert_eq!(t[c * 6 + a * 3 + b], values[a * 12 + b * 4 + c]);
                }
            }
        }
        assert!(transpose(&[2, 3], &values[..6], &[0, 0]).is_err());
    }

    #[test]
    fn last_axis_part_cuts_every_row() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let (shape, part) = last_axis_part(&[2, 6], &values, 2, 3);
        assert_eq!(shape, [2, 3]);
        assert_eq!(part, [2.0, 3.0, 4.0, 8.0, 9.0, 10.0]);
    }
}
