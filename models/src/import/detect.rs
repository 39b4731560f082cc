//! Infers a [`ModelConfig`] from canonical tensor names and shapes — never from a file name.
//!
//! ViT SAM: embed dim and patch from `patch_embed.proj.weight`, image size from the `pos_embed`
//! grid × patch, depth from the block count, heads from `embed / rel_pos_h.cols` (which gives
//! the official 768→12, 1024→16, 1280→16), global blocks are those whose `rel_pos_h` spans
//! `2·grid − 1` rows, the window from the others' rows.
//! TinyViT: widths, depths, heads (`attention_biases` rows) and windows (`sqrt` of its columns)
//! per stage; stage 0 is convolutional, so its heads/window are not in the file and are set to
//! MobileSAM's (2, 7), which the network ignores. The input size is not in a TinyViT checkpoint
//! either: a 1×1 patch embedding is LiteMedSAM's 256-pixel model, anything else MobileSAM's 1024.
//! Decoder: depth, MLP width, downsample rate, mask tokens and IoU head from shapes; the head
//! count (8) is not recoverable from shapes and is SAM's.

use std::collections::BTreeMap;

use crate::config::{DecoderConfig, EncoderConfig, ModelConfig, Preprocess, TinyVitConfig, VitConfig};
use crate::{Error, Result};

/// Canonical name → shape.
pub type Shapes = BTreeMap<String, Vec<usize>>;

fn shape<'a>(s: &'a Shapes, name: &str) -> Result<&'a [usize]> {
    s.get(name).map(Vec::as_slice).ok_or_else(|| Error::MissingTensor(name.to_string()))
}

fn dim(s: &Shapes, name: &str, axis: usize, rank: usize) -> Result<usize> {
    let sh = shape(s, name)?;
    if sh.len() != rank || sh[axis] == 0 {
        return Err(Error::Shape(format!("{name}: unexpected shape {sh:?} (rank {rank} expected)")));
    }
    Ok(sh[axis])
}

/// How many consecutive `{prefix}.{i}.{suffix}` exist from i = 0.
fn count(s: &Shapes, prefix: &str, suffix: &str) -> usize {
    (0..).take_while(|i| s.contains_key(&format!("{prefix}.{i}.{suffix}"))).count()
}

fn ratio(num: usize, den: usize, what: &str) -> Result<usize> {
    if den == 0 || num % den != 0 {
        return Err(Error::Shape(format!("{what}: {num} is not a multiple of {den}")));
    }
    Ok(num / den)
}

pub fn detect(s: &Shapes) -> Result<ModelConfig> {
    let (encoder, image_size, embedding_size, preprocess) = if s.contains_key("image_encoder.patch_embed.proj.weight") {
        let (vit, image_size) = detect_vit(s)?;
        let grid = image_size / vit.patch_size;
        (EncoderConfig::Vit(vit), image_size, grid, Preprocess::Sam)
    } else if s.contains_key("image_encoder.layers.0.blocks.0.conv1.c.weight") {
        let tiny = detect_tiny_vit(s)?;
        let lite = tiny.patch_embed_kernel == 1;
        let (size, pre) = if lite { (256, Preprocess::LiteMedSam) } else { (1024, Preprocess::Sam) };
        (EncoderConfig::TinyVit(tiny), size, 64, pre)
    } else {
        return Err(Error::Import("no known image encoder (neither ViT `patch_embed.proj` nor TinyViT `layers.0`)".into()));
    };
    let prompt_embed_dim = dim(s, "mask_decoder.iou_token.weight", 1, 2)?;
    let mask_in_chans = dim(s, "prompt_encoder.mask_downscaling.3.weight", 0, 4)?;
    Ok(ModelConfig { encoder, image_size, prompt_embed_dim, embedding_size, mask_in_chans, decoder: detect_decoder(s, prompt_embed_dim)?, preprocess })
}

fn detect_vit(s: &Shapes) -> Result<(VitConfig, usize)> {
    let p = "image_encoder";
    let embed_dim = dim(s, &format!("{p}.patch_embed.proj.weight"), 0, 4)?;
    let patch_size = dim(s, &format!("{p}.patch_embed.proj.weight"), 2, 4)?;
    let grid = dim(s, &format!("{p}.pos_embed"), 1, 4)?;
    let depth = count(s, &format!("{p}.blocks"), "norm1.weight");
    if depth == 0 {
        return Err(Error::MissingTensor(format!("{p}.blocks.0.norm1.weight")));
    }
    let head_dim = dim(s, &format!("{p}.blocks.0.attn.rel_pos_h"), 1, 2)?;
    let num_heads = ratio(embed_dim, head_dim, "ViT heads (embed / rel_pos_h columns)")?;
    // The official table (ViT-B/L/H); other widths (test models) rely on the shapes alone.
    let official = match embed_dim {
        768 => Some(12),
        1024 | 1280 => Some(16),
        _ => None,
    };
    if official.is_some_and(|h| h != num_heads) {
        return Err(Error::Shape(format!("ViT of width {embed_dim} with rel_pos head dim {head_dim}: {num_heads} heads, official SAM has {official:?}")));
    }
    let mut global_attn_indexes = Vec::new();
    let mut window_size = 0;
    for i in 0..depth {
        let rows = dim(s, &format!("{p}.blocks.{i}.attn.rel_pos_h"), 0, 2)?;
        // Checked: `grid` is a shape from the file, as large as a zero-sized tensor allows.
        if grid.checked_mul(2).map(|g| g - 1) == Some(rows) {
            global_attn_indexes.push(i);
        } else if rows % 2 == 1 && (window_size == 0 || window_size == rows.div_ceil(2)) {
            window_size = rows.div_ceil(2);
        } else {
            return Err(Error::Shape(format!("{p}.blocks.{i}.attn.rel_pos_h: {rows} rows fit neither the global grid nor the window")));
        }
    }
    let mlp_ratio = ratio(dim(s, &format!("{p}.blocks.0.mlp.lin1.weight"), 0, 2)?, embed_dim, "ViT MLP ratio")?;
    let out_chans = dim(s, &format!("{p}.neck.0.weight"), 0, 4)?;
    let cfg = VitConfig { patch_size, embed_dim, depth, num_heads, mlp_ratio, window_size, global_attn_indexes, out_chans };
    let image_size = grid.checked_mul(patch_size).ok_or_else(|| Error::Shape("ViT image size overflows".into()))?;
    Ok((cfg, image_size))
}

fn detect_tiny_vit(s: &Shapes) -> Result<TinyVitConfig> {
    let p = "image_encoder.layers";
    let stages = (0..).take_while(|i| s.contains_key(&format!("{p}.{i}.blocks.0.conv1.c.weight")) || s.contains_key(&format!("{p}.{i}.blocks.0.attn.qkv.weight"))).count();
    let (mut embed_dims, mut depths, mut num_heads, mut window_sizes) = (vec![], vec![], vec![], vec![]);
    let (mut mlp_ratio, mut mbconv_expand_ratio, mut local_conv_size) = (4, 4, 3);
    for i in 0..stages {
        if i == 0 {
            let d = dim(s, &format!("{p}.0.blocks.0.conv3.c.weight"), 0, 4)?;
            depths.push(count(s, &format!("{p}.0.blocks"), "conv1.c.weight"));
            mbconv_expand_ratio = ratio(dim(s, &format!("{p}.0.blocks.0.conv1.c.weight"), 0, 4)?, d, "MBConv expansion")?;
            embed_dims.push(d);
            num_heads.push(2);
            window_sizes.push(7);
            continue;
        }
        let b = format!("{p}.{i}.blocks.0");
        let d = dim(s, &format!("{b}.attn.norm.weight"), 0, 1)?;
        let heads = dim(s, &format!("{b}.attn.attention_biases"), 0, 2)?;
        let points = dim(s, &format!("{b}.attn.attention_biases"), 1, 2)?;
        // isqrt, not a search: `points` comes from the file and a linear search up to its root
        // could run for billions of steps (and overflow `w * w` near the top).
        let ws = points.isqrt();
        if ws * ws != points {
            return Err(Error::Shape(format!("{b}.attn.attention_biases: {points} columns is not a square window")));
        }
        embed_dims.push(d);
        depths.push(count(s, &format!("{p}.{i}.blocks"), "attn.qkv.weight"));
        num_heads.push(heads);
        window_sizes.push(ws);
        mlp_ratio = ratio(dim(s, &format!("{b}.mlp.fc1.weight"), 0, 2)?, d, "TinyViT MLP ratio")?;
        local_conv_size = dim(s, &format!("{b}.local_conv.c.weight"), 2, 4)?;
    }
    if stages < 2 {
        return Err(Error::Import(format!("TinyViT with {stages} stages")));
    }
    let patch_embed_kernel = dim(s, "image_encoder.patch_embed.seq.0.c.weight", 2, 4)?;
    let out_chans = dim(s, "image_encoder.neck.0.weight", 0, 4)?;
    Ok(TinyVitConfig { embed_dims, depths, num_heads, window_sizes, mlp_ratio, mbconv_expand_ratio, local_conv_size, patch_embed_kernel, out_chans })
}

fn detect_decoder(s: &Shapes, d: usize) -> Result<DecoderConfig> {
    let p = "mask_decoder";
    let transformer_depth = count(s, &format!("{p}.transformer.layers"), "norm1.weight");
    if transformer_depth == 0 {
        return Err(Error::MissingTensor(format!("{p}.transformer.layers.0.norm1.weight")));
    }
    let mlp_dim = dim(s, &format!("{p}.transformer.layers.0.mlp.lin1.weight"), 0, 2)?;
    let inner = dim(s, &format!("{p}.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"), 0, 2)?;
    let iou_head_depth = count(s, &format!("{p}.iou_prediction_head.layers"), "weight");
    let tokens = dim(s, &format!("{p}.mask_tokens.weight"), 0, 2)?;
    Ok(DecoderConfig {
        transformer_depth,
        num_heads: 8,
        mlp_dim,
        attention_downsample_rate: ratio(d, inner, "decoder attention downsample")?,
        num_multimask_outputs: tokens - 1,
        iou_head_depth,
        iou_head_hidden_dim: dim(s, &format!("{p}.iou_prediction_head.layers.0.weight"), 0, 2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(list: Vec<(String, Vec<usize>)>) -> Shapes {
        list.into_iter().collect()
    }

    #[test]
    fn official_vit_configs_are_recovered() {
        for cfg in [VitConfig::sam_b(), VitConfig::sam_l(), VitConfig::sam_h(), super::super::layout::tiny_vit().0] {
            let size = if cfg.embed_dim == 64 { 128 } else { 1024 };
            let m = detect(&shapes(super::super::layout::sam_vit_tensors(&cfg, size))).unwrap();
            assert_eq!(m.encoder, EncoderConfig::Vit(cfg.clone()));
            assert_eq!(m.image_size, size);
            assert_eq!(m.decoder, DecoderConfig::default());
            assert_eq!((m.prompt_embed_dim, m.mask_in_chans, m.preprocess), (256, 16, Preprocess::Sam));
        }
    }

    #[test]
    fn file_sized_grid_and_window_are_errors_not_overflows() {
        // Found writing benches/fuzz's safetensors_reader (which reproduces it): a
        // zero-sized tensor can claim any dimension, and `2 * grid - 1` overflowed.
        let (cfg, size) = super::super::layout::tiny_vit();
        let mut s = shapes(super::super::layout::sam_vit_tensors(&cfg, size));
        s.insert("image_encoder.pos_embed".into(), vec![1, 1 << 63, 1, 0]);
        assert!(matches!(detect(&s), Err(Error::Shape(_))));
        // TinyViT's window is the square root of attention_biases' columns: a linear search for
        // it ran ~2^32 steps and then overflowed `w * w`.
        let p = "image_encoder.layers";
        let s = shapes(vec![
            (format!("{p}.0.blocks.0.conv1.c.weight"), vec![4, 1, 1, 1]),
            (format!("{p}.0.blocks.0.conv3.c.weight"), vec![1, 4, 1, 1]),
            (format!("{p}.1.blocks.0.attn.qkv.weight"), vec![3, 1]),
            (format!("{p}.1.blocks.0.attn.norm.weight"), vec![1]),
            (format!("{p}.1.blocks.0.attn.attention_biases"), vec![1, usize::MAX]),
        ]);
        assert!(matches!(detect(&s), Err(Error::Shape(_))));
    }

    #[test]
    fn inconsistent_shapes_are_errors() {
        let (cfg, size) = super::super::layout::tiny_vit();
        let mut s = shapes(super::super::layout::sam_vit_tensors(&cfg, size));
        s.insert("image_encoder.blocks.0.attn.rel_pos_h".into(), vec![6, 16]);
        assert!(matches!(detect(&s), Err(Error::Shape(_))));
        let mut s = shapes(super::super::layout::sam_vit_tensors(&cfg, size));
        s.insert("mask_decoder.iou_token.weight".into(), vec![256]);
        let mut b = shapes(super::super::layout::sam_vit_tensors(&VitConfig::sam_b(), 1024));
        for i in 0..12 {
            let rows = b[&format!("image_encoder.blocks.{i}.attn.rel_pos_h")][0];
            b.insert(format!("image_encoder.blocks.{i}.attn.rel_pos_h"), vec![rows, 96]);
        }
        assert!(matches!(detect(&b), Err(Error::Shape(_))));
        assert!(matches!(detect(&s), Err(Error::Shape(_))));
        s.remove("mask_decoder.iou_token.weight");
        assert!(matches!(detect(&s), Err(Error::MissingTensor(_))));
    }
}
