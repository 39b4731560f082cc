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

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tract_onnx::pb::{self, AttributeProto, NodeProto, TensorProto};
use tract_onnx::prelude::{DatumType, Framework};

/// One use of a float constant by a node.
#[derive(Clone, Debug)]
pub struct ParamUse {
    /// The constant's name in the file (an initializer, or a `Constant` node's output).
    pub tensor: String,
    /// Name and op type of the consuming node.
    pub node: String,
    pub op: String,
    /// Which input of the node the constant feeds.
    pub input: usize,
    /// `Gemm`'s `transB` (the weight is `[out, in]` when set); false for every other op.
    pub trans_b: bool,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl ParamUse {
    pub fn numel(&self) -> usize {
        self.values.len()
    }

    /// "tensor `X` (shape [..]) at input N of node `Y` (Op)", for errors.
    pub fn describe(&self) -> String {
        format!("ONNX tensor `{}` {:?} at input {} of node `{}` ({})", self.tensor, self.shape, self.input, self.node, self.op)
    }
}

/// Ops that carry a constant through unchanged (or transposed) to its real consumer. The
/// reshaping ones keep the row-major values; the mapper checks element counts, not their shape.
const PASS_THROUGH: &[&str] = &["Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"];

/// Ops of quantised graphs: their weights are integers the mapper cannot read as SAM weights.
const QUANTISED: &[&str] = &["DequantizeLinear", "QuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"];

/// Reads `path` and lists its parameter uses in graph order.
pub fn read_uses(path: &Path) -> Result<Vec<ParamUse>> {
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .with_context(|| format!("{} is not a readable ONNX model", path.display()))?;
    let graph = proto.graph.as_ref().with_context(|| format!("{}: the ONNX model has no graph", path.display()))?;
    let dir = path.parent().and_then(Path::to_str);
    uses_of_graph(graph, dir).with_context(|| format!("reading the graph of {}", path.display()))
}

fn uses_of_graph(graph: &pb::GraphProto, dir: Option<&str>) -> Result<Vec<ParamUse>> {
    let mut consts: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    for node in &graph.node {
        if node.op_type == "Constant" {
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
    for node in &graph.node {
        if QUANTISED.contains(&node.op_type.as_str()) {
            bail!("node `{}` is a {}: quantised ONNX graphs are not supported, export the float model", node.name, node.op_type);
        }
        if node.op_type == "Constant" {
            continue;
        }
        // Only the first input carries data; the others of Reshape/Unsqueeze/Squeeze are shapes/axes.
        if PASS_THROUGH.contains(&node.op_type.as_str()) && !node.input.is_empty() && node.output.len() == 1 {
            if let Some((src, mut perms)) = source(&derived, &consts, &node.input[0]) {
                if node.op_type == "Transpose" {
                    perms.push(attr(node, "perm").map(|a| a.ints.iter().map(|&i| i as usize).collect()));
                }
                derived.insert(node.output[0].as_str(), (src, perms));
                continue;
            }
        }
        for (slot, input) in node.input.iter().enumerate() {
            let Some((src, perms)) = source(&derived, &consts, input) else { continue };
            // Each constant is reported once, at its first use (a shared weight is one parameter).
            if !seen.insert(src) {
                continue;
            }
            let Some((mut shape, mut values)) = load_float(consts[src], dir).with_context(|| format!("reading constant `{src}`"))? else { continue };
            if values.len() <= 1 {
                continue;
            }
            for p in perms {
                let p = p.unwrap_or_else(|| (0..shape.len()).rev().collect());
                (shape, values) = transpose(&shape, &values, &p).with_context(|| format!("transposing {src} for node `{}`", node.name))?;
            }
            let trans_b = node.op_type == "Gemm" && attr(node, "transB").is_some_and(|a| a.i != 0);
            uses.push(ParamUse { tensor: src.to_string(), node: node.name.clone(), op: node.op_type.clone(), input: slot, trans_b, shape, values });
        }
    }
    Ok(uses)
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

/// A float constant as f32 (f16/f64 converted); `None` for integer and boolean tensors.
fn load_float(t: &TensorProto, dir: Option<&str>) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    let provider = tract_onnx::data_resolver::MmapDataResolver;
    let tensor = tract_onnx::tensor::load_tensor(&provider, t, dir).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    if !matches!(tensor.datum_type(), DatumType::F16 | DatumType::F32 | DatumType::F64) {
        return Ok(None);
    }
    let f = tensor.cast_to::<f32>().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let values: Vec<f32> = f.to_plain_array_view::<f32>().map_err(|e| anyhow::anyhow!("{e:#}"))?.iter().copied().collect();
    Ok(Some((tensor.shape().to_vec(), values)))
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
}
