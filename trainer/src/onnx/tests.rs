//! Mapping tests on the committed tiny SAM exports (tests/fixtures/tiny_sam_onnx, made from the
//! committed tiny_sam.pth by gen_onnx_fixtures.py) and, when generated, LiteMedSAM's.

use std::path::{Path, PathBuf};

use minisam_models::import::Checkpoint;
use minisam_models::store::WeightStore;

use super::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn tiny(file: &str) -> PathBuf {
    repo().join("tests/fixtures/tiny_sam_onnx").join(file)
}

/// Where .ci/run (or a developer) puts the exports too large to commit.
pub(crate) fn generated(file: &str) -> Option<PathBuf> {
    let p = repo().join("target/onnx-fixtures").join(file);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} absent (python3 tests/fixtures/gen_onnx_fixtures.py --help says how to make it; .ci/run does when torch is installed)", p.display());
        None
    }
}

/// Every tensor of `a` is in `b` with the same shape and values within `tol` (relative to the
/// tensor's largest magnitude), and the name sets are equal.
fn assert_same_tensors(a: &dyn WeightStore, b: &dyn WeightStore, tol: f32) {
    assert_eq!(a.names(), b.names(), "tensor names differ");
    for name in a.names() {
        let (x, y) = (a.get(&name).unwrap(), b.get(&name).unwrap());
        assert_eq!(x.shape, y.shape, "{name}");
        let (x, y) = (x.to_f32(), y.to_f32());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale, "{name}: max difference {worst} (scale {scale})");
    }
}

#[test]
fn tiny_sam_exports_map_onto_the_checkpoint_they_came_from() {
    let onnx = import(&[tiny("encoder.onnx"), tiny("decoder.onnx")]).unwrap();
    let pth = Checkpoint::open(&repo().join("tests/fixtures/tiny_sam/tiny_sam.pth")).unwrap();
    assert_eq!(onnx.checkpoint.config(), pth.config());
    // Transposes and reshapes are exact: bit-identical tensors.
    assert_same_tensors(&onnx.checkpoint, &pth, 0.0);
    assert_eq!(onnx.summary.len(), 2);
    assert!(onnx.summary[0].contains("SAM ViT image encoder"), "{:?}", onnx.summary);
    assert!(onnx.summary[1].contains("prompt encoder + mask decoder"), "{:?}", onnx.summary);
    assert_eq!(onnx.source_file, "encoder.onnx+decoder.onnx");
    assert_eq!(onnx.source_sha256.len(), 64);
}

#[test]
fn order_of_files_does_not_matter_but_completeness_does() {
    let swapped = import(&[tiny("decoder.onnx"), tiny("encoder.onnx")]).unwrap();
    let pth = Checkpoint::open(&repo().join("tests/fixtures/tiny_sam/tiny_sam.pth")).unwrap();
    assert_same_tensors(&swapped.checkpoint, &pth, 0.0);

    let err = format!("{:#}", import(&[tiny("decoder.onnx")]).err().unwrap());
    assert!(err.contains("0 image encoder(s) and 1 decoder(s)"), "{err}");
    let err = format!("{:#}", import(&[tiny("encoder.onnx"), tiny("encoder.onnx")]).err().unwrap());
    assert!(err.contains("already given by an earlier file"), "{err}");
}

#[test]
fn a_graph_that_is_not_sam_names_the_first_unmapped_tensor() {
    let uses = graph::read_uses(&tiny("encoder.onnx")).unwrap();
    // Drop the first block's qkv bias: the stream then offers the relative-position table where
    // the bias must be.
    let at = uses.iter().position(|u| u.op == "Add" && u.shape == [192]).unwrap();
    let mut broken = uses.clone();
    let removed = broken.remove(at);
    let err = format!("{:#}", map::map_graph(&broken).err().unwrap());
    assert!(err.contains("image_encoder.blocks.0.attn.qkv.bias"), "{err}");
    assert!(err.contains(&broken[at].tensor), "{err} should name {}", broken[at].tensor);
    assert_ne!(removed.tensor, broken[at].tensor);

    // Trailing parameters no SAM layer reads.
    let mut extra = uses.clone();
    extra.push(graph::ParamUse { tensor: "stray".into(), node: "/head/MatMul".into(), op: "MatMul".into(), input: 1, trans_b: false, shape: vec![3, 3], values: vec![0.0; 9] });
    let err = format!("{:#}", map::map_graph(&extra).err().unwrap());
    assert!(err.contains("`stray`") && err.contains("/head/MatMul"), "{err}");

    // A file that is not ONNX at all.
    let dir = std::env::temp_dir().join(format!("minisam-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"\xff\xff\xff not protobuf").unwrap();
    assert!(import(&[junk]).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_export_without_constant_folding_maps_the_same() {
    // Unfolded, the exporter keeps W [out, in] and feeds MatMul through Transpose, the norms
    // through Unsqueeze, no_mask_embed through Reshape, and concatenates the tokens at run time.
    let unfolded = import(&[tiny("encoder.onnx"), tiny("decoder_unfolded.onnx")]).unwrap();
    let pth = Checkpoint::open(&repo().join("tests/fixtures/tiny_sam/tiny_sam.pth")).unwrap();
    assert_same_tensors(&unfolded.checkpoint, &pth, 0.0);
    let uses = graph::read_uses(&tiny("decoder_unfolded.onnx")).unwrap();
    assert!(uses.iter().any(|u| u.op == "MatMul" && u.input == 1), "Transpose must lead to its MatMul");
}

#[test]
fn combined_export_maps_like_the_two_files() {
    let Some(sam) = generated("tiny_sam/sam.onnx") else { return };
    let one = import(&[sam]).unwrap();
    let two = import(&[tiny("encoder.onnx"), tiny("decoder.onnx")]).unwrap();
    assert_same_tensors(&one.checkpoint, &two.checkpoint, 0.0);
}

#[test]
fn litemedsam_exports_map_onto_the_release_checkpoint() {
    let (Some(enc), Some(dec)) = (generated("litemedsam/encoder.onnx"), generated("litemedsam/decoder.onnx")) else { return };
    let pth = repo().join("../shared/weights/lite_medsam.pth");
    if !pth.exists() {
        eprintln!("SKIP: {} absent", pth.display());
        return;
    }
    let onnx = import(&[enc, dec]).unwrap();
    let reference = Checkpoint::open(&pth).unwrap();
    assert_eq!(onnx.checkpoint.config(), reference.config());
    assert!(onnx.summary[0].contains("TinyViT"), "{:?}", onnx.summary);
    // torch folds the BatchNorms in f32, our importer in f64: equal to f32 rounding.
    assert_same_tensors(&onnx.checkpoint, &reference, 1e-5);
}
