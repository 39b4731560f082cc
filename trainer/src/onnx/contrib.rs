//! Ops outside the standard ONNX domain, as graph tools leave them: onnxruntime's optimiser
//! (saved through `SessionOptions.optimized_model_filepath`) fuses `MatMul`+`Mul` into
//! `com.microsoft.FusedMatMul`, `Gemm`+`Relu` into `FusedGemm`, `Conv`+activation into
//! `FusedConv`; its transformer optimiser and onnx-simplifier write `Attention` over a packed
//! q/k/v weight, `SkipLayerNormalization`, `BiasGelu`.
//!
//! Each op the importer understands is described here as the standard ops its weights would
//! have fed ([`Slot`]): which input, read as which op and input slot, transposed, scaled or cut
//! out of a packed tensor. The SAM grammars then read a fused graph exactly like the unfused
//! one. A foreign op that consumes weights and is not described is refused by name, with its
//! domain and the tool that wrote it ([`Tool`]), instead of surfacing later as a shape mismatch.

use anyhow::{bail, Result};
use tract_onnx::pb::{self, AttributeProto, NodeProto};

/// How one input of a node feeds the SAM grammars.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    /// Index into the node's inputs.
    pub input: usize,
    /// The standard op and input slot the grammars see.
    pub op: String,
    pub slot: usize,
    /// The constant is used transposed (last two axes swapped), as `transB` says.
    pub transpose_last_two: bool,
    /// Factor the op applies to this operand's contribution (`alpha` of a product, `beta` of
    /// `Gemm`'s bias).
    pub scale: f32,
    /// One part of a tensor packed along its last axis.
    pub part: Option<Part>,
}

/// A part along the last axis of a packed tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// `len` entries from `start`.
    Range { start: usize, len: usize },
    /// The `k`-th of three equal parts (sizes not given by the node).
    Third(usize),
}

impl Part {
    /// `(start, len)` in an axis of `size`, or `None` when it does not fit.
    pub fn range(self, size: usize) -> Option<(usize, usize)> {
        let (start, len) = match self {
            Part::Range { start, len } => (start, len),
            Part::Third(k) if size % 3 == 0 => (k * size / 3, size / 3),
            Part::Third(_) => return None,
        };
        (start + len <= size && len > 0).then_some((start, len))
    }
}

impl Slot {
    fn plain(input: usize, op: &str, slot: usize) -> Self {
        Self { input, op: op.to_string(), slot, transpose_last_two: false, scale: 1.0, part: None }
    }
}

/// The standard domain, under either of its names.
pub fn is_standard(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// `domain.Op` as written in the file.
pub fn qualified(node: &NodeProto) -> String {
    if is_standard(&node.domain) {
        node.op_type.clone()
    } else {
        format!("{}.{}", node.domain, node.op_type)
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn int_attr(node: &NodeProto, name: &str) -> i64 {
    attr(node, name).map_or(0, |a| a.i)
}

fn float_attr(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

/// The slots of a standard node: every input as itself; `Gemm` carries `transB`, `alpha`
/// (weight) and `beta` (bias).
pub fn standard_slots(node: &NodeProto) -> Vec<Slot> {
    let mut slots: Vec<Slot> = (0..node.input.len()).map(|i| Slot::plain(i, &node.op_type, i)).collect();
    if node.op_type == "Gemm" {
        gemm_attributes(node, &mut slots);
    }
    slots
}

fn gemm_attributes(node: &NodeProto, slots: &mut [Slot]) {
    if let Some(w) = slots.get_mut(1) {
        w.scale = float_attr(node, "alpha", 1.0);
    }
    if let Some(b) = slots.get_mut(2) {
        b.scale = float_attr(node, "beta", 1.0);
    }
}

/// The slots of a foreign node whose constant inputs the importer can read, `None` for an op it
/// does not know. `constant(i)` says whether input `i` is a float constant.
pub fn foreign_slots(node: &NodeProto, constant: &dyn Fn(usize) -> bool) -> Result<Option<Vec<Slot>>> {
    if node.domain != "com.microsoft" {
        return Ok(None);
    }
    let n = node.input.len();
    Ok(Some(match node.op_type.as_str() {
        "FusedMatMul" => {
            // alpha * op(A) @ op(B); the weight is B (A would be a weight on the left, which no
            // SAM layer has: passed on as input 0 for the grammar to refuse).
            let batch_transposed = int_attr(node, "transBatchA") != 0 || int_attr(node, "transBatchB") != 0;
            if batch_transposed && (0..n).any(constant) {
                bail!("node `{}` ({}) transposes batch axes of a weight (transBatchA/transBatchB), which no SAM layer does", node.name, qualified(node));
            }
            let alpha = float_attr(node, "alpha", 1.0);
            let mut slots = vec![Slot::plain(0, "MatMul", 0), Slot::plain(1, "MatMul", 1)];
            slots[0].transpose_last_two = int_attr(node, "transA") != 0;
            slots[1].transpose_last_two = int_attr(node, "transB") != 0;
            for s in &mut slots {
                s.scale = alpha;
            }
            slots
        }
        "FusedGemm" => {
            // Gemm followed by an activation; the weights are Gemm's.
            let mut slots: Vec<Slot> = (0..n.min(3)).map(|i| Slot::plain(i, "Gemm", i)).collect();
            gemm_attributes(node, &mut slots);
            slots
        }
        // Conv (+ optional residual `Z`, input 3) followed by an activation.
        "FusedConv" => (0..n.min(3)).map(|i| Slot::plain(i, "Conv", i)).collect(),
        // Gelu(x + bias): the bias is the preceding linear layer's.
        "BiasGelu" | "FastGelu" => (0..n).map(|i| if i == 1 { Slot::plain(1, "Add", 1) } else { Slot::plain(i, "Gelu", i) }).collect(),
        "Gelu" | "QuickGelu" => Vec::new(),
        // LayerNorm(input + skip + bias): the bias belongs to the linear before the norm, so it
        // is read first; gamma and beta are the norm's scale and bias.
        "SkipLayerNormalization" => {
            let mut slots = Vec::new();
            if n > 4 {
                slots.push(Slot::plain(4, "Add", 1));
            }
            slots.extend([Slot::plain(2, "LayerNormalization", 1), Slot::plain(3, "LayerNormalization", 2)].into_iter().filter(|s| s.input < n));
            slots
        }
        "Attention" => attention_slots(node)?,
        _ => return Ok(None),
    }))
}

/// `Attention(input, weights [in, q+k+v], bias [q+k+v])`: the packed projection read as the
/// q, k and v linear layers (weight then bias each), split by `qkv_hidden_sizes` or in thirds.
/// The output projection stays a separate `MatMul` after the node.
fn attention_slots(node: &NodeProto) -> Result<Vec<Slot>> {
    let sizes: Vec<usize> = attr(node, "qkv_hidden_sizes").map(|a| a.ints.iter().map(|&v| v as usize).collect()).unwrap_or_default();
    if !(sizes.is_empty() || sizes.len() == 3) {
        bail!("node `{}` ({}): qkv_hidden_sizes {sizes:?} is not three sizes", node.name, qualified(node));
    }
    if node.input.len() < 3 || node.input[2].is_empty() {
        bail!("node `{}` ({}) has no bias input: SAM's q/k/v projections have biases", node.name, qualified(node));
    }
    let mut slots = Vec::new();
    let mut start = 0;
    for k in 0..3 {
        let part = match sizes.get(k) {
            Some(&len) => Part::Range { start, len },
            None => Part::Third(k),
        };
        start += sizes.get(k).copied().unwrap_or(0);
        let mut w = Slot::plain(1, "MatMul", 1);
        w.part = Some(part);
        let mut b = Slot::plain(2, "Add", 1);
        b.part = Some(part);
        slots.extend([w, b]);
    }
    Ok(slots)
}

/// Who wrote a model: exporters set `producer_name`, but graph tools keep the exporter's and
/// leave other traces, looked for here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tool(pub String);

impl Tool {
    pub fn of(model: &pb::ModelProto) -> Self {
        let producer = match (model.producer_name.as_str(), model.producer_version.as_str()) {
            ("", _) => "no producer_name".to_string(),
            (name, "") => format!("producer_name `{name}`"),
            (name, version) => format!("producer_name `{name}` {version}"),
        };
        if model.metadata_props.iter().any(|p| p.key.starts_with("onnxsim.")) {
            return Self(format!("onnx-simplifier (its `onnxsim.*` metadata; {producer} is the exporter's)"));
        }
        if model.producer_name == "onnxruntime.transformers" {
            return Self(format!("onnxruntime's transformer optimiser ({producer})"));
        }
        // A session saving its optimised graph imports every domain it has registered.
        let ort_domains = ["com.microsoft.nchwc", "com.microsoft.experimental", "ai.onnx.training"];
        if model.opset_import.iter().any(|o| ort_domains.contains(&o.domain.as_str())) {
            return Self(format!("onnxruntime's graph optimiser (SessionOptions.optimized_model_filepath; {producer} is the exporter's)"));
        }
        Self(producer)
    }
}

impl std::fmt::Display for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, domain: &str, inputs: usize, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto { name: format!("/{op}"), op_type: op.into(), domain: domain.into(), input: (0..inputs).map(|i| format!("in{i}")).collect(), attribute: attrs, ..Default::default() }
    }

    fn int(name: &str, i: i64) -> AttributeProto {
        AttributeProto { name: name.into(), i, ..Default::default() }
    }

    fn float(name: &str, f: f32) -> AttributeProto {
        AttributeProto { name: name.into(), f, ..Default::default() }
    }

    #[test]
    fn fused_matmul_reads_as_a_matmul_with_its_transposes_and_alpha() {
        let n = node("FusedMatMul", "com.microsoft", 2, vec![int("transB", 1), int("transA", 0), float("alpha", 0.5)]);
        let slots = foreign_slots(&n, &|i| i == 1).unwrap().unwrap();
        assert_eq!(slots[1].op, "MatMul");
        assert_eq!(slots[1].slot, 1);
        assert!(slots[1].transpose_last_two && !slots[0].transpose_last_two);
        assert_eq!(slots[1].scale, 0.5);
        let batch = node("FusedMatMul", "com.microsoft", 2, vec![int("transBatchB", 1)]);
        let err = format!("{:#}", foreign_slots(&batch, &|i| i == 1).unwrap_err());
        assert!(err.contains("transBatch") && err.contains("com.microsoft.FusedMatMul"), "{err}");
    }

    #[test]
    fn unknown_or_other_domain_ops_are_not_described() {
        assert!(foreign_slots(&node("QOrderedMatMul", "com.microsoft", 2, vec![]), &|_| true).unwrap().is_none());
        assert!(foreign_slots(&node("Conv", "com.microsoft.nchwc", 2, vec![]), &|_| true).unwrap().is_none());
        assert_eq!(qualified(&node("Conv", "com.microsoft.nchwc", 2, vec![])), "com.microsoft.nchwc.Conv");
        assert_eq!(qualified(&node("Conv", "", 2, vec![])), "Conv");
    }

    #[test]
    fn attention_splits_the_packed_projection_into_q_k_v() {
        let sizes = AttributeProto { name: "qkv_hidden_sizes".into(), ints: vec![8, 8, 4], ..Default::default() };
        let slots = foreign_slots(&node("Attention", "com.microsoft", 3, vec![sizes]), &|_| true).unwrap().unwrap();
        let parts: Vec<_> = slots.iter().map(|s| (s.op.as_str(), s.part)).collect();
        let r = |start, len| Some(Part::Range { start, len });
        assert_eq!(parts, [("MatMul", r(0, 8)), ("Add", r(0, 8)), ("MatMul", r(8, 8)), ("Add", r(8, 8)), ("MatMul", r(16, 4)), ("Add", r(16, 4))]);
        let thirds = foreign_slots(&node("Attention", "com.microsoft", 3, vec![]), &|_| true).unwrap().unwrap();
        assert_eq!(thirds[2].part.unwrap().range(24), Some((8, 8)));
        assert_eq!(thirds[2].part.unwrap().range(25), None);
        assert_eq!(Part::Range { start: 16, len: 9 }.range(24), None);
        assert!(foreign_slots(&node("Attention", "com.microsoft", 2, vec![]), &|_| true).is_err());
    }

    #[test]
    fn skip_layer_norm_reads_the_linear_bias_before_the_norm() {
        let slots = foreign_slots(&node("SkipLayerNormalization", "com.microsoft", 5, vec![]), &|_| true).unwrap().unwrap();
        let read: Vec<_> = slots.iter().map(|s| (s.input, s.op.as_str(), s.slot)).collect();
        assert_eq!(read, [(4, "Add", 1), (2, "LayerNormalization", 1), (3, "LayerNormalization", 2)]);
    }

    #[test]
    fn tools_are_named_from_their_traces() {
        let mut m = pb::ModelProto { producer_name: "pytorch".into(), producer_version: "2.15.0".into(), ..Default::default() };
        assert_eq!(Tool::of(&m).0, "producer_name `pytorch` 2.15.0");
        m.opset_import.push(pb::OperatorSetIdProto { domain: "com.microsoft.nchwc".into(), version: 1 });
        assert!(Tool::of(&m).0.starts_with("onnxruntime's graph optimiser"), "{}", Tool::of(&m));
        m.metadata_props.push(pb::StringStringEntryProto { key: "onnxsim.constant_folding".into(), value: "true".into() });
        assert!(Tool::of(&m).0.starts_with("onnx-simplifier"), "{}", Tool::of(&m));
        let t = pb::ModelProto { producer_name: "onnxruntime.transformers".into(), ..Default::default() };
        assert!(Tool::of(&t).0.starts_with("onnxruntime's transformer optimiser"));
    }
}
