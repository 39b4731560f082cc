//! Golden parity with the PyTorch LiteMedSAM reference (shared/reference/litemedsam): for the first
//! three images of every set, the preprocessed encoder input, the 256x256 low-res logits and the
//! final mask must match what the official inference code produced.
//!
//! Needs `../shared` (real weights, data and golden files); without it every test prints
//! `SKIP: <reason>` and returns.

use std::path::{Path, PathBuf};

use minisam::image_io;
use minisam_models::cpu::CpuBackend;
use minisam_models::load::ModelFile;
use minisam_models::npy;
use minisam_models::pipeline::{self, Geometry};
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if dir.join("reference/litemedsam").is_dir() && dir.join("weights/lite_medsam.pth").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIP: {} has no reference/litemedsam or weights/lite_medsam.pth", dir.display());
        None
    }
}

/// One golden target: its image, box and the reference's outputs.
struct Case {
    name: String,
    image: PathBuf,
    input_npy: PathBuf,
    logits_npy: PathBuf,
    mask_png: PathBuf,
    box_xyxy: [f32; 4],
}

fn cases(shared: &Path) -> Vec<Case> {
    let root = shared.join("reference/litemedsam");
    let mut out = Vec::new();
    let mut sets: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    sets.sort();
    for set in sets {
        let mut jsons: Vec<_> = std::fs::read_dir(&set)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        jsons.sort();
        for json in jsons {
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
            let stem = json.file_stem().unwrap().to_string_lossy().to_string(); // e.g. 000_HC_label1
            let image_stem = stem.rsplit_once("_label").unwrap().0.to_string();
            let b: Vec<f32> = meta["box_xyxy"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            out.push(Case {
                name: format!("{}/{stem}", set.file_name().unwrap().to_string_lossy()),
                image: shared.join("data").join(meta["image"].as_str().unwrap()),
                input_npy: set.join(format!("{image_stem}_input256_ch0.npy")),
                logits_npy: set.join(format!("{stem}_lowres_logits.npy")),
                mask_png: set.join(format!("{stem}_mask.png")),
                box_xyxy: [b[0], b[1], b[2], b[3]],
            });
        }
    }
    out
}

fn iou(a: &[u8], b: &[u8]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x != 0 && **y != 0).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x != 0 || **y != 0).count();
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

#[test]
fn preprocessing_matches_the_reference_input() {
    let Some(shared) = shared_dir() else { return };
    let mut worst = 0.0f32;
    for case in cases(&shared) {
        let image = image_io::read_rgb(&case.image).unwrap();
        let geometry = Geometry::new(image.height, image.width, 256);
        let input = pipeline::preprocess(minisam_models::config::Preprocess::LiteMedSam, &image, &geometry).unwrap();
        let golden = npy::read(&case.input_npy).unwrap();
        assert_eq!(golden.shape, vec![256, 256], "{}", case.name);
        let err = input[..256 * 256].iter().zip(&golden.data).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{:40} input max |err| {err:.2e}", case.name);
        worst = worst.max(err);
    }
    assert!(worst <= 1e-6, "preprocessed input differs from the reference by {worst}");
}

#[test]
fn f32_checkpoint_matches_reference_logits_and_masks() {
    let Some(shared) = shared_dir() else { return };
    let model = ModelFile::open(&shared.join("weights/lite_medsam.pth")).unwrap();
    let segmenter = Segmenter::load(CpuBackend::new(0).unwrap(), model.store(), model.config()).unwrap();
    let (mut worst_logit, mut worst_iou) = (0.0f32, 1.0f64);
    for case in cases(&shared) {
        let image = image_io::read_rgb(&case.image).unwrap();
        // The reference's own input, so that this test measures the networks alone.
        let golden_input = npy::read(&case.input_npy).unwrap().data;
        let input: Vec<f32> = golden_input.iter().cycle().take(3 * 256 * 256).copied().collect();
        let geometry = Geometry::new(image.height, image.width, 256);
        let emb = segmenter.encode_preprocessed(&input, geometry).unwrap();
        let [x0, y0, x1, y1] = case.box_xyxy;
        let seg = segmenter.decode(&emb, &Prompts::with_box(BoxPrompt { x0, y0, x1, y1 }), false).unwrap();

        let golden_logits = npy::read(&case.logits_npy).unwrap().data;
        let err = seg.low_res_logits.iter().zip(&golden_logits).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let golden_mask = image_io::read_labels(&case.mask_png).unwrap();
        let mask_iou = iou(&seg.masks[0].data, &golden_mask.labels.iter().map(|&v| v as u8).collect::<Vec<_>>());
        println!("{:40} logits max |err| {err:.2e}  mask IoU {mask_iou:.5}", case.name);
        worst_logit = worst_logit.max(err);
        worst_iou = worst_iou.min(mask_iou);
    }
    println!("worst logit error {worst_logit:.2e}, worst mask IoU {worst_iou:.5}");
    assert!(worst_logit <= 1e-3, "low-res logits differ from the reference by up to {worst_logit}");
    assert!(worst_iou >= 0.99, "a mask has IoU {worst_iou} < 0.99 with the reference");
}
