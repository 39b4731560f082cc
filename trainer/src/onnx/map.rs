//! The SAM grammars: the parameter-use stream of an ONNX export read as a ViT or TinyViT image
//! encoder and/or the official decoder export (`segment_anything.utils.onnx.SamOnnxModel`:
//! prompt encoder + mask decoder), producing the canonical `segment_anything` tensors.
//!
//! Every count (blocks, stages, transformer layers, mask tokens, IoU head depth) and width is
//! read from the stream itself, so the same code maps the tiny test SAM, ViT-B/L/H, MobileSAM
//! and LiteMedSAM. What the exporter folded is unfolded here: TinyViT's `attention_biases`
//! gathered into `[heads, N, N]` tables, ViT's relative-position tables gathered into
//! `[q, k, C]`, SAM's `iou_token` and `mask_tokens` concatenated into one `[1, 1 + M, D]`
//! constant. Constants the decoder export computes from others (the dense positional grid)
//! are recognised and dropped.

use anyhow::{bail, Result};
use minisam_models::nets::tiny_vit::AttentionBiasIndex;

use super::cursor::{Cursor, Named};
use super::graph::ParamUse;

/// What one file held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sections {
    pub encoder: Option<&'static str>,
    pub decoder: bool,
    /// The decoder picks one mask (`SamOnnxModel(return_single_mask=True)`).
    pub single_mask: bool,
}

/// Maps one graph's uses; the file may hold an encoder, a decoder, or both in that order.
pub fn map_graph(uses: &[ParamUse]) -> Result<(Vec<Named>, Sections)> {
    let mut c = Cursor::new(uses);
    let mut sections = Sections::default();
    if c.peek().is_some_and(|u| u.op == "Conv" && u.input == 1 && u.shape.len() == 4 && u.shape[1] == 3) {
        if is_vit(uses) {
            vit(&mut c)?;
            sections.encoder = Some("SAM ViT");
        } else {
            tiny_vit(&mut c)?;
            sections.encoder = Some("TinyViT");
        }
    }
    if !c.done() {
        if !c.peek().is_some_and(|u| u.op == "MatMul" && u.shape.len() == 2 && u.shape[0] == 2) {
            let u = c.peek().map(ParamUse::describe).unwrap_or_default();
            bail!("{u} starts neither a SAM image encoder (a Conv over 3 channels) nor the SAM decoder export (the prompt encoder's [2, D/2] Gaussian matrix)");
        }
        sections.single_mask = decoder(&mut c)?;
        sections.decoder = true;
    }
    c.finish("SAM export")?;
    Ok((c.out, sections))
}

/// ViT: the patch kernel is followed (after its bias) by the `[1, g, g, E]` position table.
fn is_vit(uses: &[ParamUse]) -> bool {
    let e = uses[0].shape[0];
    uses.iter().skip(1).find(|u| !(u.op == "Conv" && u.input == 2)).is_some_and(|u| u.shape.len() == 4 && u.shape[0] == 1 && u.shape[3] == e)
}

fn vit(c: &mut Cursor) -> Result<()> {
    let p = "image_encoder";
    let e = c.conv("Conv", &format!("{p}.patch_embed.proj"), true)?[0];
    let pos = c.next_use("image_encoder.pos_embed")?;
    match pos.shape.as_slice() {
        [1, g, w, d] if g == w && *d == e => c.push(format!("{p}.pos_embed"), pos.shape.clone(), pos.values.clone()),
        _ => bail!("cannot map {} onto image_encoder.pos_embed [1, g, g, {e}]", pos.describe()),
    }
    let mut i = 0;
    while c.next_is_norm(e) {
        let b = format!("{p}.blocks.{i}");
        c.norm(&format!("{b}.norm1"), e)?;
        c.linear(&format!("{b}.attn.qkv"), Some(e))?;
        rel_pos(c, &format!("{b}.attn.rel_pos_h"))?;
        rel_pos(c, &format!("{b}.attn.rel_pos_w"))?;
        c.linear(&format!("{b}.attn.proj"), Some(e))?;
        c.norm(&format!("{b}.norm2"), e)?;
        let (_, hidden) = c.linear(&format!("{b}.mlp.lin1"), Some(e))?;
        c.linear(&format!("{b}.mlp.lin2"), Some(hidden))?;
        i += 1;
    }
    if i == 0 {
        bail!("a ViT patch embedding and position table but no transformer block follows");
    }
    neck(c, e)
}

/// SAM's neck: bias-free 1x1 conv, LayerNorm2d, bias-free 3x3 conv, LayerNorm2d.
fn neck(c: &mut Cursor, dim: usize) -> Result<()> {
    let p = "image_encoder.neck";
    let k = c.conv("Conv", &format!("{p}.0"), false)?;
    if k[1] != dim {
        bail!("image_encoder.neck.0: kernel {k:?} does not read the encoder's {dim} channels");
    }
    c.norm(&format!("{p}.1"), k[0])?;
    c.conv("Conv", &format!("{p}.2"), false)?;
    c.norm(&format!("{p}.3"), k[0])
}

/// `rel_pos_h`/`rel_pos_w` `[2S - 1, C]`, or the exporter's folded gather `[S, S, C]` with
/// `R[i, j] = rel_pos[i - j + S - 1]`, inverted (and checked to be such a gather).
fn rel_pos(c: &mut Cursor, name: &str) -> Result<()> {
    let u = c.next_use(name)?;
    match u.shape.as_slice() {
        [_, _] => c.push(name.to_string(), u.shape.clone(), u.values.clone()),
        [s, s2, ch] if s == s2 => {
            let (s, ch) = (*s, *ch);
            let at = |i: usize, j: usize| &u.values[(i * s + j) * ch..(i * s + j + 1) * ch];
            let mut table = vec![0f32; (2 * s - 1) * ch];
            for i in 0..s {
                for j in 0..s {
                    let row = &mut table[(i + s - 1 - j) * ch..(i + s - j) * ch];
                    if i == 0 || j == s - 1 {
                        row.copy_from_slice(at(i, j));
                    } else if row != at(i, j) {
                        bail!("{} is not a relative-position gather for {name}", u.describe());
                    }
                }
            }
            c.push(name.to_string(), vec![2 * s - 1, ch], table);
        }
        _ => bail!("cannot map {} onto {name} [2S-1, C]", u.describe()),
    }
    Ok(())
}

fn tiny_vit(c: &mut Cursor) -> Result<()> {
    let p = "image_encoder";
    c.conv_bn(&format!("{p}.patch_embed.seq.0"))?;
    let mut dim = c.conv_bn(&format!("{p}.patch_embed.seq.2"))?[0];
    let mut stage = 0;
    loop {
        let mut j = 0;
        loop {
            let b = format!("{p}.layers.{stage}.blocks.{j}");
            if is_mbconv(c, dim) {
                for conv in ["conv1", "conv2", "conv3"] {
                    c.conv_bn(&format!("{b}.{conv}"))?;
                }
            } else if c.next_is_norm(dim) {
                tiny_vit_attention_block(c, &b, dim)?;
            } else {
                break;
            }
            j += 1;
        }
        if j == 0 {
            let u = c.peek().map(ParamUse::describe).unwrap_or_else(|| "the end of the graph".into());
            bail!("TinyViT stage {stage} has no block: found {u}");
        }
        // A downsample's first conv carries a (folded) bias or a BatchNorm; the neck's does not.
        let next_is_downsample = c.peek().is_some_and(|u| u.op == "Conv" && u.input == 1)
            && c.peek_at(1).is_some_and(|u| (u.op == "Conv" && u.input == 2) || u.op == "BatchNormalization");
        if !next_is_downsample {
            break;
        }
        let d = format!("{p}.layers.{stage}.downsample");
        c.conv_bn(&format!("{d}.conv1"))?;
        c.conv_bn(&format!("{d}.conv2"))?;
        dim = c.conv_bn(&format!("{d}.conv3"))?[0];
        stage += 1;
    }
    neck(c, dim)
}

/// MBConv: three Conv2d_BN whose last projects back to the block's input width (a
/// downsample's three convolutions end at a new width).
fn is_mbconv(c: &Cursor, dim: usize) -> bool {
    let kernels: Vec<&ParamUse> = (0..).map_while(|k| c.peek_at(k)).filter(|u| u.op == "Conv" && u.input == 1).take(3).collect();
    c.peek().is_some_and(|u| u.op == "Conv" && u.input == 1)
        && kernels.len() == 3
        && kernels[0].shape.get(1) == Some(&dim)
        && kernels[2].shape.first() == Some(&dim)
}

fn tiny_vit_attention_block(c: &mut Cursor, b: &str, dim: usize) -> Result<()> {
    c.norm(&format!("{b}.attn.norm"), dim)?;
    c.linear(&format!("{b}.attn.qkv"), Some(dim))?;
    let name = format!("{b}.attn.attention_biases");
    let u = c.next_use(&name)?;
    match u.shape.as_slice() {
        [_, _] => c.push(name, u.shape.clone(), u.values.clone()),
        [heads, n, n2] if n == n2 => {
            let window = (1..=*n).find(|w| w * w >= *n).unwrap_or(0);
            if window * window != *n {
                bail!("{} : {n} window points is not a square window for {name}", u.describe());
            }
            let index = AttentionBiasIndex::new(window);
            let mut biases = vec![f32::NAN; heads * index.num_offsets];
            for h in 0..*heads {
                for (ij, &o) in index.idxs.iter().enumerate() {
                    let v = u.values[h * n * n + ij];
                    let slot = &mut biases[h * index.num_offsets + o];
                    if slot.is_nan() {
                        *slot = v;
                    } else if *slot != v {
                        bail!("{} is not TinyViT's attention-bias gather for {name}", u.describe());
                    }
                }
            }
            c.push(name, vec![*heads, index.num_offsets], biases);
        }
        _ => bail!("cannot map {} onto {name} [heads, offsets]", u.describe()),
    }
    c.linear(&format!("{b}.attn.proj"), None)?;
    c.conv_bn(&format!("{b}.local_conv"))?;
    c.norm(&format!("{b}.mlp.norm"), dim)?;
    let (_, hidden) = c.linear(&format!("{b}.mlp.fc1"), Some(dim))?;
    c.linear(&format!("{b}.mlp.fc2"), Some(hidden))?;
    Ok(())
}

/// Placeholder prefix for an attention read before its role is known.
const PENDING: &str = "\u{0}";

fn attention(c: &mut Cursor, prefix: &str, dim: usize) -> Result<()> {
    c.linear(&format!("{prefix}.q_proj"), Some(dim))?;
    c.linear(&format!("{prefix}.k_proj"), Some(dim))?;
    c.linear(&format!("{prefix}.v_proj"), Some(dim))?;
    c.linear(&format!("{prefix}.out_proj"), None)?;
    Ok(())
}

fn rename_pending(c: &mut Cursor, from: usize, attn: &str, norm: &str) {
    for (name, _, _) in &mut c.out[from..] {
        if let Some(rest) = name.strip_prefix(&format!("{PENDING}n.")) {
            *name = format!("{norm}.{rest}");
        } else if let Some(rest) = name.strip_prefix(&format!("{PENDING}.")) {
            *name = format!("{attn}.{rest}");
        }
    }
}

/// The official decoder export; returns whether it is the single-mask variant.
fn decoder(c: &mut Cursor) -> Result<bool> {
    let pe = "prompt_encoder";
    let g = c.next_use("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")?;
    let d = 2 * g.shape[1];
    // SAM multiplies `coords @ G` by 2π; onnxruntime fuses that factor into the product.
    let two_pi = std::f32::consts::TAU;
    if !((g.scale - 1.0).abs() < 1e-6 || (g.scale - two_pi).abs() < 1e-5 * two_pi) {
        bail!("{} scales the positional encoding's product by {}: SAM's is 1 or 2π", g.describe(), g.scale);
    }
    c.push(format!("{pe}.pe_layer.positional_encoding_gaussian_matrix"), g.shape.clone(), g.values.clone());
    c.raw(&format!("{pe}.not_a_point_embed.weight"), &[1, d], "the prompt encoder's not_a_point_embed")?;
    for i in 0..4 {
        c.raw(&format!("{pe}.point_embeddings.{i}.weight"), &[1, d], "one of the prompt encoder's 4 point embeddings")?;
    }
    let k = c.conv("Conv", &format!("{pe}.mask_downscaling.0"), true)?;
    c.norm(&format!("{pe}.mask_downscaling.1"), k[0])?;
    let k = c.conv("Conv", &format!("{pe}.mask_downscaling.3"), true)?;
    c.norm(&format!("{pe}.mask_downscaling.4"), k[0])?;
    c.conv("Conv", &format!("{pe}.mask_downscaling.6"), true)?;
    c.raw(&format!("{pe}.no_mask_embed.weight"), &[1, d], "the prompt encoder's no_mask_embed")?;

    // Up to the first transformer linear: the output tokens (iou_token then mask_tokens, folded
    // into one constant or not) and constants derived from others (the dense-PE grid).
    let mut token_rows: Vec<f32> = Vec::new();
    while !c.next_is_linear() {
        let u = c.next_use("the mask decoder's iou_token / mask_tokens")?;
        let derived_grid = u.shape.len() == 3 && u.shape[2] == 2 && u.shape[0] == u.shape[1];
        let dense_pe = u.shape.len() >= 3 && u.shape[u.shape.len() - 3] == d && u.shape[u.shape.len() - 1] == u.shape[u.shape.len() - 2];
        if derived_grid || dense_pe {
            continue;
        }
        if u.shape.last() != Some(&d) {
            bail!("cannot map {} onto the mask decoder's tokens [.., {d}]", u.describe());
        }
        token_rows.extend_from_slice(&u.values);
    }
    let rows = token_rows.len() / d;
    if rows < 2 {
        bail!("the decoder export holds {rows} output token(s) of width {d}: SAM has the IoU token and at least one mask token");
    }
    let md = "mask_decoder";
    c.push(format!("{md}.iou_token.weight"), vec![1, d], token_rows[..d].to_vec());
    c.push(format!("{md}.mask_tokens.weight"), vec![rows - 1, d], token_rows[d..].to_vec());

    let t = format!("{md}.transformer");
    let mut layer = 0;
    loop {
        let mark = c.out.len();
        attention(c, PENDING, d)?;
        c.norm(&format!("{PENDING}n"), d)?;
        if c.peek().is_some_and(|u| u.op == "ConvTranspose") {
            rename_pending(c, mark, &format!("{t}.final_attn_token_to_image"), &format!("{t}.norm_final_attn"));
            break;
        }
        let l = format!("{t}.layers.{layer}");
        rename_pending(c, mark, &format!("{l}.self_attn"), &format!("{l}.norm1"));
        attention(c, &format!("{l}.cross_attn_token_to_image"), d)?;
        c.norm(&format!("{l}.norm2"), d)?;
        let (_, hidden) = c.linear(&format!("{l}.mlp.lin1"), Some(d))?;
        c.linear(&format!("{l}.mlp.lin2"), Some(hidden))?;
        c.norm(&format!("{l}.norm3"), d)?;
        attention(c, &format!("{l}.cross_attn_image_to_token"), d)?;
        c.norm(&format!("{l}.norm4"), d)?;
        layer += 1;
    }
    let k = c.conv("ConvTranspose", &format!("{md}.output_upscaling.0"), true)?;
    c.norm(&format!("{md}.output_upscaling.1"), k[1])?;
    c.conv("ConvTranspose", &format!("{md}.output_upscaling.3"), true)?;
    for i in 0..rows - 1 {
        for j in 0..3 {
            c.linear(&format!("{md}.output_hypernetworks_mlps.{i}.layers.{j}"), None)?;
        }
    }
    let mut j = 0;
    while c.next_is_linear() {
        c.linear(&format!("{md}.iou_prediction_head.layers.{j}"), None)?;
        j += 1;
    }
    if j == 0 {
        bail!("the decoder export has no IoU prediction head after its hypernetwork MLPs");
    }
    Ok(single_mask_reweight(c, rows - 1))
}

/// `SamOnnxModel(return_single_mask=True)` ends with `score_reweight` `[[1000, 0, …]]` (one
/// per mask token), added to the IoU predictions as `(num_points - 2.5) * score_reweight` to
/// pick the single-mask output when the prompt has more than two points, the best of the
/// others otherwise. An export with a fixed point count folds the product (`[[2500, 0, …]]` for
/// 5 points). Consumed when present.
fn single_mask_reweight(c: &mut Cursor, mask_tokens: usize) -> bool {
    let is_reweight = c.peek().is_some_and(|u| u.numel() == mask_tokens && u.values[0] != 0.0 && u.values[0] % 500.0 == 0.0 && u.values[1..].iter().all(|&v| v == 0.0));
    if is_reweight {
        c.skip();
    }
    is_reweight
}
