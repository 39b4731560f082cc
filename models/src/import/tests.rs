//! Import tests: the real checkpoints in `shared/weights` (skipped when absent), round trips
//! through both writers, Hugging Face naming, and hostile inputs.

use std::path::{Path, PathBuf};

use super::*;
use crate::config::{EncoderConfig, Preprocess};

fn weights_dir() -> Option<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/weights"));
    if dir.is_dir() {
        Some(dir.to_path_buf())
    } else {
        eprintln!("SKIP: {} not found", dir.display());
        None
    }
}

/// The tiny ViT SAM with deterministic pseudo-random values.
fn tiny_tensors(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (cfg, size) = layout::tiny_vit();
    let mut state = seed;
    layout::sam_vit_tensors(&cfg, size)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            (name, shape, values)
        })
        .collect()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minisam-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn assert_same(c: &Checkpoint, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    assert_eq!(c.names().len(), tensors.len());
    for (name, shape, values) in tensors {
        let t = c.get(name).unwrap();
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(&t.to_f32(), values, "{name}");
    }
}

#[test]
fn lite_medsam_is_read_folded_and_detected() {
    let Some(dir) = weights_dir() else { return };
    let bytes = std::fs::read(dir.join("lite_medsam.pth")).unwrap();
    let raw = pth::read(&bytes).unwrap();
    // 435 state-dict entries, 27 of them `num_batches_tracked` scalars dropped at read.
    assert_eq!(raw.len(), 435 - 27);
    assert_eq!(raw["image_encoder.layers.1.blocks.0.attn.attention_biases"].0, [4, 49]);
    assert_eq!(raw["image_encoder.patch_embed.seq.0.c.weight"].0, [32, 3, 1, 1]);
    let c = Checkpoint::open(&dir.join("lite_medsam.pth")).unwrap();
    assert_eq!(c.sha256().len(), 64);
    assert!(!c.names().iter().any(|n| n.contains(".bn.")));
    assert_eq!(c.get("image_encoder.patch_embed.seq.0.c.bias").unwrap().shape, [32]);
    // 27 BNs of 4 tensors become 27 biases.
    assert_eq!(c.names().len(), 435 - 27 - 27 * 3);
    let cfg = c.config();
    assert_eq!((cfg.image_size, cfg.preprocess, cfg.embedding_size), (256, Preprocess::LiteMedSam, 64));
    match &cfg.encoder {
        EncoderConfig::TinyVit(t) => {
            assert_eq!(t.embed_dims, [64, 128, 160, 320]);
            assert_eq!(t.depths, [2, 2, 6, 2]);
            assert_eq!(t.num_heads[1..], [4, 5, 10]);
            assert_eq!(t.window_sizes[1..], [7, 14, 7]);
            assert_eq!(t.patch_embed_kernel, 1);
        }
        other => panic!("detected {other:?}"),
    }
    assert_eq!(cfg.decoder, crate::config::DecoderConfig::default());
}

#[test]
fn mobile_sam_is_read_and_detected() {
    let Some(dir) = weights_dir() else { return };
    let c = Checkpoint::open(&dir.join("mobile_sam.pt")).unwrap();
    let cfg = c.config();
    assert_eq!((cfg.image_size, cfg.preprocess), (1024, Preprocess::Sam));
    assert!(matches!(&cfg.encoder, EncoderConfig::TinyVit(t) if t.patch_embed_kernel == 3 && t.embed_dims == [64, 128, 160, 320]));
    assert!(!c.contains("image_encoder.head.weight"));
    assert_eq!(c.get("image_encoder.patch_embed.seq.0.c.weight").unwrap().shape, [32, 3, 3, 3]);
}

#[test]
fn pth_and_safetensors_round_trip() {
    let tensors = tiny_tensors(1);
    let (pth_path, st_path) = (temp("rt.pth"), temp("rt.safetensors"));
    write_pth(&pth_path, "archive", &tensors).unwrap();
    write_safetensors(&st_path, &tensors).unwrap();
    let a = Checkpoint::open(&pth_path).unwrap();
    let b = Checkpoint::open(&st_path).unwrap();
    assert_same(&a, &tensors);
    assert_same(&b, &tensors);
    let (cfg, size) = layout::tiny_vit();
    assert_eq!(a.config().encoder, EncoderConfig::Vit(cfg));
    assert_eq!(a.config(), b.config());
    assert_eq!(a.config().image_size, size);
    assert_ne!(a.sha256(), b.sha256());
}

#[test]
fn hugging_face_naming_is_mapped_to_canonical() {
    let tensors = tiny_tensors(2);
    let mut hf: Vec<_> = tensors.iter().map(|(n, s, v)| (naming::canonical_to_hf(n), s.clone(), v.clone())).collect();
    let pe = tensors.iter().find(|t| t.0.ends_with("positional_encoding_gaussian_matrix")).unwrap();
    hf.push((naming::HF_SHARED_EMBEDDING.to_string(), pe.1.clone(), pe.2.clone()));
    let path = temp("hf.safetensors");
    write_safetensors(&path, &hf).unwrap();
    assert_same(&Checkpoint::open(&path).unwrap(), &tensors);
}

#[test]
fn state_dict_under_a_model_key_is_found() {
    let tensors = tiny_tensors(3);
    let views: Vec<(String, pickle::TensorRef)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (n, s, _))| {
            let mut stride = vec![1; s.len()];
            for a in (0..s.len().saturating_sub(1)).rev() {
                stride[a] = stride[a + 1] * s[a + 1];
            }
            (n.clone(), pickle::TensorRef { dtype: pickle::StorageDtype::F32, key: i.to_string(), offset: 0, size: s.clone(), stride })
        })
        .collect();
    // Wrap: {"model": <state dict>} — splice the inner pickle's body into an outer dict.
    let inner = pickle::write_state_dict(&views, &Default::default());
    let mut p = vec![0x80, 2, b'}', b'X'];
    p.extend_from_slice(&5u32.to_le_bytes());
    p.extend_from_slice(b"model");
    p.extend_from_slice(&inner[2..inner.len() - 1]);
    p.extend_from_slice(b"s.");
    let mut z = zip::ZipWriter::default();
    z.add("ck/data.pkl", &p).unwrap();
    for (i, (_, _, v)) in tensors.iter().enumerate() {
        z.add(&format!("ck/data/{i}"), &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    }
    let path = temp("wrapped.pth");
    std::fs::write(&path, z.finish()).unwrap();
    assert_same(&Checkpoint::open(&path).unwrap(), &tensors);
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let tensors = tiny_tensors(4);
    let bytes = pth::write("ck", &tensors).unwrap();
    let path = temp("corrupt.pth");
    // Truncations at many offsets.
    for cut in (0..bytes.len()).step_by(bytes.len() / 97 + 1).chain([bytes.len() - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(Checkpoint::open(&path).is_err(), "truncated at {cut} accepted");
    }
    // A bad opcode at the start of the pickle.
    let entries = zip::entries(&bytes).unwrap();
    let pkl_at = entries["ck/data.pkl"].as_ptr() as usize - bytes.as_ptr() as usize;
    let mut bad = bytes.clone();
    bad[pkl_at + 2] = b'I';
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(Checkpoint::open(&path), Err(Error::Import(_))));
    // Wrong shapes: a well-formed file whose tensors do not form a SAM.
    let mut wrong = tensors.clone();
    wrong.iter_mut().find(|t| t.0 == "mask_decoder.iou_token.weight").unwrap().1 = vec![256, 1];
    write_pth(&path, "ck", &wrong).unwrap();
    assert!(Checkpoint::open(&path).is_err());
    // Not a checkpoint at all.
    std::fs::write(&path, b"hello world").unwrap();
    assert!(matches!(Checkpoint::open(&path), Err(Error::Import(_))));
    assert!(matches!(Checkpoint::open(Path::new("/nonexistent/x.pth")), Err(Error::Io { .. })));
}
