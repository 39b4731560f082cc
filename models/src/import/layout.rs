//! The canonical tensor list of a ViT SAM (`segment_anything`'s `sam_vit_{b,l,h}` state dict),
//! in the order `torch.save` writes it. Shared by the checkpoint generator and the tests so a
//! synthetic checkpoint has exactly the official names and shapes.

use crate::config::VitConfig;

/// Prompt-encoder/decoder channel width and mask-prompt hidden channels of every SAM.
const PROMPT_DIM: usize = 256;
const MASK_IN_CHANS: usize = 16;

/// (name, shape) of every parameter of a ViT SAM with `cfg` at `image_size` input, with the
/// official prompt encoder and mask decoder (2 two-way layers, MLP 2048, 3 + 1 mask tokens).
pub fn sam_vit_tensors(cfg: &VitConfig, image_size: usize) -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: &[usize]| t.push((name, shape.to_vec()));
    let e = cfg.embed_dim;
    let grid = image_size / cfg.patch_size.max(1);
    let head_dim = e / cfg.num_heads.max(1);
    let p = "image_encoder";
    add(format!("{p}.pos_embed"), &[1, grid, grid, e]);
    add(format!("{p}.patch_embed.proj.weight"), &[e, 3, cfg.patch_size, cfg.patch_size]);
    add(format!("{p}.patch_embed.proj.bias"), &[e]);
    for i in 0..cfg.depth {
        let b = format!("{p}.blocks.{i}");
        let span = if cfg.global_attn_indexes.contains(&i) { grid } else { cfg.window_size };
        add(format!("{b}.norm1.weight"), &[e]);
        add(format!("{b}.norm1.bias"), &[e]);
        add(format!("{b}.attn.rel_pos_h"), &[2 * span - 1, head_dim]);
        add(format!("{b}.attn.rel_pos_w"), &[2 * span - 1, head_dim]);
        add(format!("{b}.attn.qkv.weight"), &[3 * e, e]);
        add(format!("{b}.attn.qkv.bias"), &[3 * e]);
        add(format!("{b}.attn.proj.weight"), &[e, e]);
        add(format!("{b}.attn.proj.bias"), &[e]);
        add(format!("{b}.norm2.weight"), &[e]);
        add(format!("{b}.norm2.bias"), &[e]);
        add(format!("{b}.mlp.lin1.weight"), &[e * cfg.mlp_ratio, e]);
        add(format!("{b}.mlp.lin1.bias"), &[e * cfg.mlp_ratio]);
        add(format!("{b}.mlp.lin2.weight"), &[e, e * cfg.mlp_ratio]);
        add(format!("{b}.mlp.lin2.bias"), &[e]);
    }
    let o = cfg.out_chans;
    add(format!("{p}.neck.0.weight"), &[o, e, 1, 1]);
    add(format!("{p}.neck.1.weight"), &[o]);
    add(format!("{p}.neck.1.bias"), &[o]);
    add(format!("{p}.neck.2.weight"), &[o, o, 3, 3]);
    add(format!("{p}.neck.3.weight"), &[o]);
    add(format!("{p}.neck.3.bias"), &[o]);
    t.extend(prompt_encoder_and_mask_decoder());
    t
}

/// The prompt encoder and mask decoder, identical in every SAM variant (and in MobileSAM and
/// LiteMedSAM).
pub fn prompt_encoder_and_mask_decoder() -> Vec<(String, Vec<usize>)> {
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: &[usize]| t.push((name, shape.to_vec()));
    let d = PROMPT_DIM;
    let m = MASK_IN_CHANS;
    let p = "prompt_encoder";
    add(format!("{p}.pe_layer.positional_encoding_gaussian_matrix"), &[2, d / 2]);
    for i in 0..4 {
        add(format!("{p}.point_embeddings.{i}.weight"), &[1, d]);
    }
    add(format!("{p}.not_a_point_embed.weight"), &[1, d]);
    for (idx, shape) in [("0", vec![m / 4, 1, 2, 2]), ("3", vec![m, m / 4, 2, 2]), ("6", vec![d, m, 1, 1])] {
        add(format!("{p}.mask_downscaling.{idx}.weight"), &shape);
        add(format!("{p}.mask_downscaling.{idx}.bias"), &[shape[0]]);
        if idx != "6" {
            let norm = if idx == "0" { "1" } else { "4" };
            add(format!("{p}.mask_downscaling.{norm}.weight"), &[shape[0]]);
            add(format!("{p}.mask_downscaling.{norm}.bias"), &[shape[0]]);
        }
    }
    add(format!("{p}.no_mask_embed.weight"), &[1, d]);

    let p = "mask_decoder";
    let attention = |add: &mut dyn FnMut(String, &[usize]), prefix: String, inner: usize| {
        for proj in ["q_proj", "k_proj", "v_proj"] {
            add(format!("{prefix}.{proj}.weight"), &[inner, d]);
            add(format!("{prefix}.{proj}.bias"), &[inner]);
        }
        add(format!("{prefix}.out_proj.weight"), &[d, inner]);
        add(format!("{prefix}.out_proj.bias"), &[d]);
    };
    for l in 0..2 {
        let b = format!("{p}.transformer.layers.{l}");
        attention(&mut add, format!("{b}.self_attn"), d);
        add(format!("{b}.norm1.weight"), &[d]);
        add(format!("{b}.norm1.bias"), &[d]);
        attention(&mut add, format!("{b}.cross_attn_token_to_image"), d / 2);
        add(format!("{b}.norm2.weight"), &[d]);
        add(format!("{b}.norm2.bias"), &[d]);
        add(format!("{b}.mlp.lin1.weight"), &[2048, d]);
        add(format!("{b}.mlp.lin1.bias"), &[2048]);
        add(format!("{b}.mlp.lin2.weight"), &[d, 2048]);
        add(format!("{b}.mlp.lin2.bias"), &[d]);
        for n in ["norm3", "norm4"] {
            add(format!("{b}.{n}.weight"), &[d]);
            add(format!("{b}.{n}.bias"), &[d]);
        }
        attention(&mut add, format!("{b}.cross_attn_image_to_token"), d / 2);
    }
    attention(&mut add, format!("{p}.transformer.final_attn_token_to_image"), d / 2);
    add(format!("{p}.transformer.norm_final_attn.weight"), &[d]);
    add(format!("{p}.transformer.norm_final_attn.bias"), &[d]);
    add(format!("{p}.iou_token.weight"), &[1, d]);
    add(format!("{p}.mask_tokens.weight"), &[4, d]);
    add(format!("{p}.output_upscaling.0.weight"), &[d, d / 4, 2, 2]);
    add(format!("{p}.output_upscaling.0.bias"), &[d / 4]);
    add(format!("{p}.output_upscaling.1.weight"), &[d / 4]);
    add(format!("{p}.output_upscaling.1.bias"), &[d / 4]);
    add(format!("{p}.output_upscaling.3.weight"), &[d / 4, d / 8, 2, 2]);
    add(format!("{p}.output_upscaling.3.bias"), &[d / 8]);
    let mlp = |add: &mut dyn FnMut(String, &[usize]), prefix: String, out: usize| {
        for (i, rows) in [d, d, out].into_iter().enumerate() {
            add(format!("{prefix}.layers.{i}.weight"), &[rows, d]);
            add(format!("{prefix}.layers.{i}.bias"), &[rows]);
        }
    };
    for i in 0..4 {
        mlp(&mut add, format!("{p}.output_hypernetworks_mlps.{i}"), d / 8);
    }
    mlp(&mut add, format!("{p}.iou_prediction_head"), 4);
    t
}

/// A small ViT SAM for fast tests: embed 64, depth 2, 4 heads, window 4, block 1 global;
/// at 128 input the grid is 8×8.
pub fn tiny_vit() -> (VitConfig, usize) {
    (
        VitConfig { patch_size: 16, embed_dim: 64, depth: 2, num_heads: 4, mlp_ratio: 4, window_size: 4, global_attn_indexes: vec![1], out_chans: 256 },
        128,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_b_has_the_official_tensor_count_and_shapes() {
        let t = sam_vit_tensors(&VitConfig::sam_b(), 1024);
        // sam_vit_b_01ec64.pth: 16 tensors per block, 3 + 6 encoder extras, 17 prompt, 120 decoder.
        let decoder = t.iter().filter(|(n, _)| n.starts_with("mask_decoder.")).count();
        let prompt = t.iter().filter(|(n, _)| n.starts_with("prompt_encoder.")).count();
        assert_eq!(prompt, 17);
        assert_eq!(decoder, 120);
        assert_eq!(t.len(), 12 * 14 + 9 + 17 + 120);
        let get = |n: &str| t.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone()).unwrap();
        assert_eq!(get("image_encoder.pos_embed"), [1, 64, 64, 768]);
        assert_eq!(get("image_encoder.blocks.2.attn.rel_pos_h"), [127, 64]);
        assert_eq!(get("image_encoder.blocks.0.attn.rel_pos_w"), [27, 64]);
        assert_eq!(get("mask_decoder.transformer.final_attn_token_to_image.out_proj.weight"), [256, 128]);
    }
}
