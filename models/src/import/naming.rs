//! Tensor names: the Hugging Face `transformers` SAM naming mapped onto the canonical
//! `segment_anything` naming, and back.
//!
//! `convert_sam_to_hf.py` renames by substring (`image_encoder`→`vision_encoder`, `blocks`→
//! `layers`, `.norm`→`.layer_norm`, `neck.0`→`neck.conv1`, `output_upscaling.0`→`upscale_conv1`,
//! three-layer MLPs `layers.{0,1,2}`→`proj_in`/`layers.0`/`proj_out`, …) and duplicates the
//! prompt encoder's Gaussian matrix as `shared_image_embedding.positional_embedding`. qkv is not
//! split. [`canonical_to_hf`] reproduces that renaming; [`hf_to_canonical`] inverts it by path
//! segment, returning `None` for the duplicate.

/// True when the names look like the Hugging Face export.
pub fn is_hf(names: &[String]) -> bool {
    names.iter().any(|n| n.starts_with("vision_encoder.") || n.starts_with("shared_image_embedding."))
}

/// `segment_anything` → `transformers` name.
pub fn canonical_to_hf(name: &str) -> String {
    const RULES: &[(&str, &str)] = &[
        ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
        ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
        ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
        ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
        ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
        ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
        ("mask_downscaling.0", "mask_embed.conv1"),
        ("mask_downscaling.1", "mask_embed.layer_norm1"),
        ("mask_downscaling.3", "mask_embed.conv2"),
        ("mask_downscaling.4", "mask_embed.layer_norm2"),
        ("mask_downscaling.6", "mask_embed.conv3"),
        ("point_embeddings", "point_embed"),
        ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
        ("image_encoder", "vision_encoder"),
        ("neck.0", "neck.conv1"),
        ("neck.1", "neck.layer_norm1"),
        ("neck.2", "neck.conv2"),
        ("neck.3", "neck.layer_norm2"),
        ("patch_embed.proj", "patch_embed.projection"),
        (".norm", ".layer_norm"),
        ("blocks", "layers"),
    ];
    let mut n = name.to_string();
    for (from, to) in RULES {
        if n.contains(from) {
            n = n.replace(from, to);
        }
    }
    if let Some(rest) = n.strip_prefix("mask_decoder.output_hypernetworks_mlps.") {
        let mut parts: Vec<&str> = rest.split('.').collect();
        if parts.len() >= 3 && parts[1] == "layers" {
            let renamed = match parts[2] {
                "0" => Some("proj_in"),
                "1" => Some("layers.0"),
                "2" => Some("proj_out"),
                _ => None,
            };
            if let Some(r) = renamed {
                parts.splice(1..3, [r]);
                n = format!("mask_decoder.output_hypernetworks_mlps.{}", parts.join("."));
            }
        }
    }
    n
}

/// The extra copy `transformers` keeps of the prompt encoder's Gaussian matrix.
pub const HF_SHARED_EMBEDDING: &str = "shared_image_embedding.positional_embedding";

/// `transformers` → `segment_anything` name; `None` for [`HF_SHARED_EMBEDDING`] (a duplicate).
pub fn hf_to_canonical(name: &str) -> Option<String> {
    if name == HF_SHARED_EMBEDDING {
        return None;
    }
    let mut parts: Vec<String> = name.split('.').map(str::to_string).collect();
    let replace_pair = |parts: &mut Vec<String>, at: usize, with: &[&str]| {
        parts.splice(at..at + 2, with.iter().map(|s| s.to_string()));
    };
    match parts[0].as_str() {
        "vision_encoder" => {
            parts[0] = "image_encoder".into();
            let in_layers = parts.get(1).map(String::as_str) == Some("layers");
            for i in 1..parts.len() {
                let p = parts[i].as_str();
                let new = match (parts[i - 1].as_str(), p) {
                    ("image_encoder", "layers") => "blocks",
                    (_, "layer_norm1") if in_layers => "norm1",
                    (_, "layer_norm2") if in_layers => "norm2",
                    ("patch_embed", "projection") => "proj",
                    ("neck", "conv1") => "0",
                    ("neck", "layer_norm1") => "1",
                    ("neck", "conv2") => "2",
                    ("neck", "layer_norm2") => "3",
                    _ => continue,
                };
                parts[i] = new.into();
            }
        }
        "prompt_encoder" if parts.len() >= 2 => match parts[1].as_str() {
            "shared_embedding" => return Some("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix".into()),
            "point_embed" => parts[1] = "point_embeddings".into(),
            "mask_embed" if parts.len() >= 3 => {
                let idx = match parts[2].as_str() {
                    "conv1" => "0",
                    "layer_norm1" => "1",
                    "conv2" => "3",
                    "layer_norm2" => "4",
                    "conv3" => "6",
                    _ => return Some(name.to_string()),
                };
                replace_pair(&mut parts, 1, &["mask_downscaling", idx]);
            }
            _ => {}
        },
        "mask_decoder" if parts.len() >= 2 => {
            let upscale = match parts[1].as_str() {
                "upscale_conv1" => Some("0"),
                "upscale_layer_norm" => Some("1"),
                "upscale_conv2" => Some("3"),
                _ => None,
            };
            if let Some(idx) = upscale {
                parts[1] = idx.into();
                parts.insert(1, "output_upscaling".into());
            } else if parts[1] == "transformer" {
                for p in parts.iter_mut().skip(2) {
                    if let Some(rest) = p.strip_prefix("layer_norm") {
                        *p = format!("norm{rest}");
                    }
                }
            } else {
                // Three-layer MLPs: iou_prediction_head.X, output_hypernetworks_mlps.N.X
                let at = if parts[1] == "iou_prediction_head" { 2 } else if parts[1] == "output_hypernetworks_mlps" { 3 } else { 0 };
                if at > 0 && parts.len() > at {
                    match parts[at].as_str() {
                        "proj_in" => parts.splice(at..at + 1, ["layers".to_string(), "0".to_string()]).for_each(drop),
                        "proj_out" => parts.splice(at..at + 1, ["layers".to_string(), "2".to_string()]).for_each(drop),
                        "layers" if parts.get(at + 1).map(String::as_str) == Some("0") => parts[at + 1] = "1".into(),
                        _ => {}
                    }
                }
            }
        }
        _ => {}
    }
    Some(parts.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_renames() {
        let cases = [
            ("image_encoder.blocks.3.norm1.weight", "vision_encoder.layers.3.layer_norm1.weight"),
            ("image_encoder.blocks.3.attn.qkv.weight", "vision_encoder.layers.3.attn.qkv.weight"),
            ("image_encoder.blocks.3.mlp.lin2.bias", "vision_encoder.layers.3.mlp.lin2.bias"),
            ("image_encoder.patch_embed.proj.weight", "vision_encoder.patch_embed.projection.weight"),
            ("image_encoder.neck.3.bias", "vision_encoder.neck.layer_norm2.bias"),
            ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.shared_embedding.positional_embedding"),
            ("prompt_encoder.mask_downscaling.4.weight", "prompt_encoder.mask_embed.layer_norm2.weight"),
            ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embed.2.weight"),
            ("mask_decoder.transformer.layers.1.norm4.bias", "mask_decoder.transformer.layers.1.layer_norm4.bias"),
            ("mask_decoder.transformer.norm_final_attn.weight", "mask_decoder.transformer.layer_norm_final_attn.weight"),
            ("mask_decoder.output_upscaling.1.weight", "mask_decoder.upscale_layer_norm.weight"),
            ("mask_decoder.output_hypernetworks_mlps.2.layers.1.weight", "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"),
            ("mask_decoder.output_hypernetworks_mlps.0.layers.2.bias", "mask_decoder.output_hypernetworks_mlps.0.proj_out.bias"),
            ("mask_decoder.iou_prediction_head.layers.0.weight", "mask_decoder.iou_prediction_head.proj_in.weight"),
        ];
        for (canonical, hf) in cases {
            assert_eq!(canonical_to_hf(canonical), hf);
            assert_eq!(hf_to_canonical(hf).as_deref(), Some(canonical));
        }
        assert_eq!(hf_to_canonical(HF_SHARED_EMBEDDING), None);
    }

    #[test]
    fn every_vit_sam_name_round_trips() {
        let cfg = crate::config::VitConfig::sam_b();
        let names = super::super::layout::sam_vit_tensors(&cfg, 1024);
        assert!(names.len() > 200);
        for (n, _) in names {
            assert_eq!(hf_to_canonical(&canonical_to_hf(&n)).as_deref(), Some(n.as_str()), "{n}");
        }
    }
}
