//! Packed-format tests: round trip, dtype rules, and hostile files (each a clean `Error::Format`).

use std::path::{Path, PathBuf};

use sha2::Digest;

use super::writer::encode_head;
use super::*;
use crate::store::{StoredTensor, TensorData, WeightStore};
use crate::{Error, Result};

/// A few tensors covering every dtype rule.
struct Mem(Vec<StoredTensor>);

impl WeightStore for Mem {
    fn get(&self, name: &str) -> Result<StoredTensor> {
        self.0.iter().find(|t| t.name == name).cloned().ok_or_else(|| Error::MissingTensor(name.into()))
    }
    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|t| t.name == name)
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|t| t.name.clone()).collect()
    }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2).collect()
}

fn store() -> Mem {
    let t = |name: &str, shape: &[usize], v: Vec<f32>| StoredTensor { name: name.into(), shape: shape.to_vec(), data: TensorData::F32(v.into()) };
    Mem(vec![
        t("enc.blocks.0.attn.qkv.weight", &[96, 64], values(96 * 64, 1)),
        t("enc.blocks.0.attn.qkv.bias", &[96], values(96, 2)),
        t("enc.conv.weight", &[8, 1, 3, 3], values(72, 3)),
        t("enc.pos_embed", &[1, 4, 4, 8], values(128, 4)),
        t("mask_decoder.iou_token.weight", &[1, 64], values(64, 5)),
        t("mask_decoder.head.weight", &[32, 64], values(32 * 64, 6)),
        t("enc.huge.bias", &[3], vec![1.0e6, -2.0, 0.5]),
    ])
}

fn config() -> ModelConfig {
    let (cfg, size) = crate::import::layout::tiny_vit();
    crate::import::detect::detect(&crate::import::layout::sam_vit_tensors(&cfg, size).into_iter().collect()).unwrap()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minisam-format-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn packed(name: &str, keep: &[String]) -> (PathBuf, PackReport) {
    let path = temp(name);
    let report = pack(&store(), &config(), Provenance::new("src.pth", "ab".repeat(32)), keep, &path).unwrap();
    (path, report)
}

#[test]
fn round_trip_keeps_values_config_and_provenance() {
    let (path, report) = packed("rt.msam", &[]);
    let m = PackedModel::open(&path).unwrap();
    assert_eq!(m.config(), &config());
    assert_eq!(m.provenance().source_file, "src.pth");
    assert_eq!(m.provenance().packer_version, env!("CARGO_PKG_VERSION"));
    // NF4: the two matrices; fp16: bias, pos_embed, token and the depthwise kernel (9 weights per
    // channel: its 64-blocks would straddle channels); f32: the bias too large for fp16.
    assert_eq!((report.tensors, report.nf4_tensors, report.f16_tensors, report.f32_tensors), (7, 2, 4, 1));
    let dtype_of = |name: &str| m.tensors().into_iter().find(|t| t.name == name).map(|t| t.dtype);
    assert_eq!(dtype_of("enc.conv.weight"), Some(Dtype::F16));
    assert_eq!(dtype_of("mask_decoder.head.weight"), Some(Dtype::Nf4));
    assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(m.names(), store().names());
    let file = std::fs::read(&path).unwrap();
    assert_eq!(m.file_sha256(), crate::import::hex(&sha2::Sha256::digest(&file)));
    assert_eq!(m.sha256_hex(), m.file_sha256());
    assert_eq!(crate::store::WeightStore::model_sha256(&m), Some(m.sha256_hex()));
    for src in store().0 {
        let got = m.get(&src.name).unwrap();
        assert_eq!(got.shape, src.shape);
        let (want, have) = (src.to_f32(), got.to_f32());
        match (&got.data, is_quantised_by_default(&src.name, &src.shape)) {
            (TensorData::Nf4(_), true) => {
                for (block_w, block_h) in want.chunks(64).zip(have.chunks(64)) {
                    let absmax = block_w.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (w, h) in block_w.iter().zip(block_h) {
                        assert!((w - h).abs() <= 0.2 * absmax + 1e-6, "{}: {w} vs {h}", src.name);
                    }
                }
            }
            (TensorData::F16(_), false) => {
                let rounded: Vec<f32> = want.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
                assert_eq!(have, rounded, "{}", src.name);
            }
            (TensorData::F32(_), false) => assert_eq!(have, want),
            (d, q) => panic!("{}: stored as {d:?}, quantised by default: {q}", src.name),
        }
    }
    let info = m.tensors();
    assert_eq!(info[0].dtype, Dtype::Nf4);
    // Codes, one scale code per block, one (offset, step) record for the single group.
    assert_eq!(info[0].bytes, (96 * 64 / 2 + 96 + 8) as u64);
}

#[test]
fn keep_fp16_patterns_are_honoured() {
    let (path, report) = packed("keep.msam", &["mask_decoder.*".to_string(), "*conv.weight".to_string()]);
    let m = PackedModel::open(&path).unwrap();
    assert_eq!(report.nf4_tensors, 1);
    assert!(matches!(m.get("mask_decoder.head.weight").unwrap().data, TensorData::F16(_)));
    assert!(matches!(m.get("enc.conv.weight").unwrap().data, TensorData::F16(_)));
    assert!(matches!(m.get("enc.blocks.0.attn.qkv.weight").unwrap().data, TensorData::Nf4(_)));
    assert_eq!(m.provenance().keep_fp16.len(), 2);
}

#[test]
fn glob_patterns() {
    assert!(glob_match("mask_decoder.*", "mask_decoder.a.b"));
    assert!(glob_match("*.attn.*.weight", "x.attn.qkv.weight"));
    assert!(!glob_match("*.attn.*.weight", "x.attn.qkv.bias"));
    assert!(glob_match("a", "a") && !glob_match("a", "ab") && glob_match("*", ""));
}

#[test]
fn non_finite_weights_are_refused_by_name() {
    let mut s = store();
    s.0[2].data = TensorData::F32(vec![f32::NAN; 72].into());
    let e = pack(&s, &config(), Provenance::new("x", "y"), &[], &temp("nan.msam")).unwrap_err();
    assert!(e.to_string().contains("enc.conv.weight"), "{e}");
}

fn expect_format(bytes: &[u8], what: &str) -> String {
    let path = temp(&format!("bad-{}.msam", what.replace(' ', "_")));
    std::fs::write(&path, bytes).unwrap();
    match PackedModel::open(&path) {
        Err(Error::Format(m)) => m,
        Err(e) => panic!("{what}: wrong error kind {e}"),
        Ok(_) => panic!("{what}: corrupt file accepted"),
    }
}

#[test]
fn truncations_and_flipped_bytes_are_format_errors() {
    let (path, _) = packed("corrupt.msam", &[]);
    let good = std::fs::read(&path).unwrap();
    for cut in (0..good.len()).step_by(37).chain([good.len() - 1]) {
        expect_format(&good[..cut], &format!("cut {cut}"));
    }
    // Every byte of the header and manifest, then a sample of the data section (incl. padding).
    for at in (0..200.min(good.len())).chain((200..good.len()).step_by(53)) {
        let mut b = good.clone();
        b[at] ^= 0x5a;
        expect_format(&b, &format!("flip {at}"));
    }
}

#[test]
fn wrong_magic_and_future_version_say_so() {
    let (path, _) = packed("magic.msam", &[]);
    let good = std::fs::read(&path).unwrap();
    let mut b = good.clone();
    b[..8].copy_from_slice(b"GGUFxxxx");
    assert!(expect_format(&b, "magic").contains("magic"));
    let mut b = good.clone();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(expect_format(&b, "version").contains("version 2"));
}

/// Rewrites the manifest (with a valid CRC) over the original data section.
fn with_manifest(edit: impl Fn(&mut Manifest)) -> Vec<u8> {
    let (path, _) = packed("craft.msam", &[]);
    let good = std::fs::read(&path).unwrap();
    let m_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let mut manifest: Manifest = postcard::from_bytes(&good[HEADER_LEN..HEADER_LEN + m_len]).unwrap();
    let data_start = align_up((HEADER_LEN + m_len) as u64).unwrap() as usize;
    edit(&mut manifest);
    let (mut head, _) = encode_head(&manifest).unwrap();
    head.extend_from_slice(&good[data_start..]);
    head
}

/// A named change to a good manifest.
type Edit = (&'static str, Box<dyn Fn(&mut Manifest)>);

#[test]
fn hand_crafted_bad_manifests_are_format_errors() {
    let cases: Vec<Edit> = vec![
        ("overlap", Box::new(|m| m.tensors[1].arrays[0].offset = m.tensors[0].arrays[0].offset)),
        ("out of range", Box::new(|m| m.tensors[1].arrays[0].offset = m.data_len)),
        ("huge offset", Box::new(|m| m.tensors[1].arrays[0].offset = u64::MAX - 63)),
        ("misaligned", Box::new(|m| m.tensors[1].arrays[0].offset += 4)),
        ("wrong size", Box::new(|m| m.tensors[1].shape = vec![97])),
        ("huge shape", Box::new(|m| m.tensors[1].shape = vec![u64::MAX, 3])),
        ("wrong dtype", Box::new(|m| m.tensors[1].dtype = Dtype::Nf4)),
        ("duplicate", Box::new(|m| m.tensors[1].name = m.tensors[0].name.clone())),
        ("data length", Box::new(|m| m.data_len += 64)),
    ];
    for (what, edit) in cases {
        expect_format(&with_manifest(edit), what);
    }
    // The unmodified manifest still opens: the helper itself is sound.
    let path = temp("craft-ok.msam");
    std::fs::write(&path, with_manifest(|_| {})).unwrap();
    PackedModel::open(&path).unwrap();
}

#[test]
fn real_lite_medsam_packs_and_reopens() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/weights/lite_medsam.pth"));
    if !src.exists() {
        eprintln!("SKIP: {} not found", src.display());
        return;
    }
    let ck = crate::import::Checkpoint::open(src).unwrap();
    let path = temp("lite.msam");
    let report = pack(&ck, ck.config(), Provenance::new("lite_medsam.pth", ck.sha256()), &[], &path).unwrap();
    // 4.13 bits per NF4 weight: the file is far smaller than the f32 source.
    assert!(report.file_bytes * 4 < report.source_f32_bytes, "{report:?}");
    let m = PackedModel::open(&path).unwrap();
    assert_eq!(m.config(), ck.config());
    assert_eq!(m.provenance().source_sha256, ck.sha256());
    assert_eq!(m.names().len(), ck.names().len());
    let name = "image_encoder.layers.1.blocks.0.attn.attention_biases";
    let want: Vec<f32> = ck.get(name).unwrap().to_f32().iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_eq!(m.get(name).unwrap().to_f32(), want);
    assert!(matches!(m.get("image_encoder.layers.1.blocks.0.attn.qkv.weight").unwrap().data, TensorData::Nf4(_)));
}

#[test]
fn tiny_vit_encoders_and_every_decoder_attention_stay_fp16_by_default() {
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("litemedsam-nf4.msam");
    let lite_medsam = PackedModel::open(&bundled).expect("the bundled model is committed").config().clone();
    assert_eq!(default_keep_fp16(&lite_medsam), ["image_encoder.*", "mask_decoder.transformer.*attn*"]);
    let vit_b = crate::config::ModelConfig { encoder: EncoderConfig::Vit(crate::config::VitConfig::sam_b()), ..lite_medsam };
    assert_eq!(default_keep_fp16(&vit_b), ["mask_decoder.transformer.*attn*"]);
    // The bundled model was packed with these defaults: its decoder attention is fp16, its MLPs NF4.
    let m = PackedModel::open(&bundled).unwrap();
    for (name, fp16) in [
        ("mask_decoder.transformer.layers.0.self_attn.q_proj.weight", true),
        ("mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight", true),
        ("mask_decoder.transformer.final_attn_token_to_image.v_proj.weight", true),
        ("mask_decoder.transformer.layers.0.mlp.lin1.weight", false),
        ("mask_decoder.output_hypernetworks_mlps.0.layers.0.weight", false),
    ] {
        let data = &m.get(name).unwrap().data;
        assert_eq!(matches!(data, TensorData::Nf4(_)), !fp16, "{name}");
    }
}

#[test]
fn pack_reports_every_tensor_then_the_write() {
    let mut steps = Vec::new();
    let path = temp("progress.msam");
    let report = pack_with_progress(&store(), &config(), Provenance::new("x", "y"), &[], &path, &mut |step| {
        steps.push(match step {
            PackStep::Encoded { done, total, name } => format!("{done}/{total} {name}"),
            PackStep::Writing { bytes } => format!("write {bytes}"),
        })
    })
    .unwrap();
    let n = store().0.len();
    assert_eq!(steps.len(), n + 1, "{steps:?}");
    assert_eq!(steps[0], format!("1/{n} enc.blocks.0.attn.qkv.weight"));
    assert!(steps[n - 1].starts_with(&format!("{n}/{n} ")), "{steps:?}");
    assert_eq!(steps[n], format!("write {}", report.file_bytes));
}
