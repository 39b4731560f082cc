//! Reading a stream of parameter uses as SAM layers: each reader takes the next uses, checks
//! the op and shape they must have, and emits the tensors under canonical names in the layout
//! the networks load (linear weights `[out, in]`, norm vectors `[C]`).
//!
//! A mismatch is an error naming the ONNX tensor and node found and the canonical tensor that was
//! expected there, which is also the first tensor of the file that could not be mapped.

use anyhow::{bail, Result};

use super::graph::{transpose, ParamUse};

/// A canonical tensor: name, shape, row-major values.
pub type Named = (String, Vec<usize>, Vec<f32>);

pub struct Cursor<'a> {
    uses: &'a [ParamUse],
    at: usize,
    pub out: Vec<Named>,
}

impl<'a> Cursor<'a> {
    pub fn new(uses: &'a [ParamUse]) -> Self {
        Self { uses, at: 0, out: Vec::new() }
    }

    pub fn peek(&self) -> Option<&'a ParamUse> {
        self.uses.get(self.at)
    }

    pub fn peek_at(&self, ahead: usize) -> Option<&'a ParamUse> {
        self.uses.get(self.at + ahead)
    }

    pub fn done(&self) -> bool {
        self.at >= self.uses.len()
    }

    /// The next use, or an error saying what was expected when the graph ended.
    fn take(&mut self, expected: &str) -> Result<&'a ParamUse> {
        match self.uses.get(self.at) {
            Some(u) => {
                self.at += 1;
                Ok(u)
            }
            None => bail!("the graph ends where {expected} was expected"),
        }
    }

    fn mismatch<T>(u: &ParamUse, expected: &str) -> Result<T> {
        bail!("cannot map {} onto {expected}", u.describe())
    }

    fn emit(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        self.out.push((name, shape, values));
    }

    /// The next use must be `op` at `input`.
    fn expect_op(&mut self, ops: &[&str], input: usize, expected: &str) -> Result<&'a ParamUse> {
        let u = self.take(expected)?;
        if !ops.contains(&u.op.as_str()) || u.input != input {
            return Self::mismatch(u, expected);
        }
        Ok(u)
    }

    /// A convolution kernel `{prefix}.weight` `[out, in, k, k]` (op `Conv` or `ConvTranspose`),
    /// then its bias when the graph has one. Returns the kernel shape.
    pub fn conv(&mut self, op: &str, prefix: &str, bias: bool) -> Result<Vec<usize>> {
        let name = format!("{prefix}.weight");
        let w = self.expect_op(&[op], 1, &format!("{op} kernel {name}"))?;
        if w.shape.len() != 4 {
            return Self::mismatch(w, &format!("{op} kernel {name} (rank 4)"));
        }
        let shape = w.shape.clone();
        self.emit(name, shape.clone(), w.values.clone());
        if bias {
            let channels = if op == "ConvTranspose" { shape[1] } else { shape[0] };
            let name = format!("{prefix}.bias");
            let b = self.expect_op(&[op], 2, &format!("{op} bias {name}"))?;
            if b.numel() != channels {
                return Self::mismatch(b, &format!("{name} [{channels}]"));
            }
            self.emit(name, vec![channels], b.values.clone());
        }
        Ok(shape)
    }

    /// True when the next use is a convolution's bias (input 2), as folded BatchNorms leave.
    pub fn next_is_conv_bias(&self) -> bool {
        self.peek().is_some_and(|u| u.op == "Conv" && u.input == 2)
    }

    /// TinyViT's `Conv2d_BN` at `{prefix}`: `{prefix}.c.weight` and, as the exporter folded the
    /// BatchNorm in eval mode, `{prefix}.c.bias`; an unfolded `BatchNormalization` is kept as
    /// `{prefix}.bn.*` for the importer to fold. Returns the kernel shape.
    pub fn conv_bn(&mut self, prefix: &str) -> Result<Vec<usize>> {
        let c = format!("{prefix}.c");
        let folded = self.peek_at(1).is_some_and(|u| u.op == "Conv" && u.input == 2);
        let shape = self.conv("Conv", &c, folded)?;
        if !folded {
            let bn_expected = format!("the BatchNorm {prefix}.bn (or a folded conv bias)");
            for (slot, field) in [(1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")] {
                let u = self.expect_op(&["BatchNormalization"], slot, &bn_expected)?;
                if u.numel() != shape[0] {
                    return Self::mismatch(u, &format!("{prefix}.bn.{field} [{}]", shape[0]));
                }
                self.emit(format!("{prefix}.bn.{field}"), vec![shape[0]], u.values.clone());
            }
        }
        Ok(shape)
    }

    /// A linear layer `{prefix}.weight` `[out, in]` (+ `{prefix}.bias` `[out]`): `MatMul` with
    /// an `[in, out]` right operand (transposed back), or `Gemm` (`transB` honoured). `input`,
    /// when known, is checked. Returns `(in, out)`.
    pub fn linear(&mut self, prefix: &str, input: Option<usize>) -> Result<(usize, usize)> {
        let name = format!("{prefix}.weight");
        let expected = format!("linear weight {name}");
        let w = self.take(&expected)?;
        let (rows, cols) = match w.shape.as_slice() {
            [r, c] if (w.op == "MatMul" || w.op == "Gemm") && w.input == 1 => (*r, *c),
            _ => return Self::mismatch(w, &expected),
        };
        let (fan_in, out, mut values) = if w.op == "Gemm" && w.trans_b {
            (cols, rows, w.values.clone())
        } else {
            (rows, cols, transpose(&w.shape, &w.values, &[1, 0])?.1)
        };
        // `alpha * (x @ W) + b` is `x @ (alpha * W) + b` (a fused scale, or Gemm's alpha).
        scale_values(&mut values, w.scale);
        if input.is_some_and(|i| i != fan_in) {
            return Self::mismatch(w, &format!("{expected} [_, {}]", input.unwrap_or(0)));
        }
        self.emit(name, vec![out, fan_in], values);
        let name = format!("{prefix}.bias");
        let b = self.take(&format!("linear bias {name}"))?;
        let is_bias = (b.op == "Add" || (b.op == "Gemm" && b.input == 2)) && b.numel() == out;
        if !is_bias {
            return Self::mismatch(b, &format!("linear bias {name} [{out}]"));
        }
        let mut bias = b.values.clone();
        scale_values(&mut bias, b.scale);
        self.emit(name, vec![out], bias);
        Ok((fan_in, out))
    }

    /// True when the next use looks like a linear weight.
    pub fn next_is_linear(&self) -> bool {
        self.peek().is_some_and(|u| (u.op == "MatMul" || u.op == "Gemm") && u.input == 1 && u.shape.len() == 2)
    }

    /// A norm's affine pair `{prefix}.weight`, `{prefix}.bias` of `channels` elements:
    /// `LayerNormalization` scale and bias, or (a decomposed LayerNorm, SAM's `LayerNorm2d`) a
    /// `Mul` then an `Add` by `[C]` / `[C, 1, 1]` constants.
    pub fn norm(&mut self, prefix: &str, channels: usize) -> Result<()> {
        for (field, ops, slot) in [("weight", ["LayerNormalization", "Mul"], 1usize), ("bias", ["LayerNormalization", "Add"], 2)] {
            let name = format!("{prefix}.{field}");
            let expected = format!("norm {field} {name} [{channels}]");
            let u = self.take(&expected)?;
            let op_fits = (u.op == ops[0] && u.input == slot) || u.op == ops[1];
            if !op_fits || u.numel() != channels || u.shape.iter().filter(|&&d| d != 1).count() > 1 {
                return Self::mismatch(u, &expected);
            }
            self.emit(name, vec![channels], u.values.clone());
        }
        Ok(())
    }

    /// True when the next use is a norm's weight of `channels` elements.
    pub fn next_is_norm(&self, channels: usize) -> bool {
        self.peek().is_some_and(|u| (u.op == "LayerNormalization" && u.input == 1 || u.op == "Mul") && u.numel() == channels)
    }

    /// Any constant of exactly `numel` elements, stored under `name` with `shape`.
    pub fn raw(&mut self, name: &str, shape: &[usize], expected: &str) -> Result<&'a ParamUse> {
        let u = self.take(expected)?;
        if u.numel() != shape.iter().product::<usize>() {
            return Self::mismatch(u, &format!("{expected} {shape:?}"));
        }
        self.emit(name.to_string(), shape.to_vec(), u.values.clone());
        Ok(u)
    }

    /// Passes over the next use: a constant the export derives and the model does not keep.
    pub fn skip(&mut self) {
        self.at += 1;
    }

    /// The next use, to be interpreted by the caller (folded or derived constants).
    pub fn next_use(&mut self, expected: &str) -> Result<&'a ParamUse> {
        self.take(expected)
    }

    pub fn push(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        self.emit(name, shape, values);
    }

    /// Errors on the first use left over after a whole model was read.
    pub fn finish(&self, what: &str) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(u) => bail!("{} is not part of a supported {what}", u.describe()),
        }
    }
}

fn scale_values(values: &mut [f32], scale: f32) {
    if scale != 1.0 {
        values.iter_mut().for_each(|v| *v *= scale);
    }
}
