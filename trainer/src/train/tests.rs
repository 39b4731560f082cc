//! End to end on the committed tiny SAM checkpoint and a synthetic data tree: a short run writes
//! a valid adapter bound to the base's hash, the same seed gives the same factors, a resumed run
//! continues where the checkpoint stopped, and the loss moves the factors.

use std::path::{Path, PathBuf};

use minisam_models::adapter::AdapterFile;
use minisam_models::image::Mask;

use super::augment::AugmentOptions;
use super::*;
use crate::image_io::{write_mask, MaskValue};

fn tiny_sam() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth")
}

/// `<dir>/set/{images,masks}` with three 40x30 images, each with one bright disc labelled 1.
fn synthetic_tree(dir: &Path) {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(dir.join("set").join(sub)).unwrap();
    }
    for (i, (cx, cy)) in [(12.0f32, 10.0f32), (25.0, 18.0), (18.0, 15.0)].into_iter().enumerate() {
        let (w, h) = (40usize, 30usize);
        let inside: Vec<u8> = (0..w * h).map(|p| u8::from((((p % w) as f32 - cx).powi(2) + ((p / w) as f32 - cy).powi(2)).sqrt() < 6.0)).collect();
        let file = format!("{i:03}.png");
        let f = std::fs::File::create(dir.join("set/images").join(&file)).unwrap();
        let mut enc = png::Encoder::new(f, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let grey: Vec<u8> = inside.iter().enumerate().map(|(p, &m)| 40 + 150 * m + (p % 7) as u8).collect();
        enc.write_header().unwrap().write_image_data(&grey).unwrap();
        write_mask(&dir.join("set/masks").join(&file), &Mask { width: w, height: h, data: inside }, MaskValue::One).unwrap();
    }
}

fn options(dir: &Path, output: &str) -> TrainOptions {
    TrainOptions {
        model: tiny_sam(),
        data: crate::selection::Selection { root: dir.to_path_buf(), sets: vec![], limit: None, split: crate::eval::split::Split::All, test_share: 0.5, slicing: Default::default() },
        output: dir.join(output),
        name: "tiny-test".into(),
        modality: "US".into(),
        rank: 2,
        alpha: 4.0,
        targets: minisam_models::adapter::default_targets(),
        lr: 1e-2,
        weight_decay: 0.01,
        epochs: 2,
        accum: 1,
        max_steps: Some(2),
        val_fraction: 0.34,
        patience: 3,
        seed: 5,
        augment: AugmentOptions { hflip: true, vflip: true, intensity: true, jitter: 0.1 },
        checkpoint: None,
        resume: false,
        threads: 2,
        embedding_cache: None,
        backend: crate::frozen::FrozenBackend::cpu(),
    }
}

#[test]
fn short_runs_write_valid_reproducible_resumable_adapters() {
    let dir = std::env::temp_dir().join(format!("minisam-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    synthetic_tree(&dir);
    let mut log = Vec::new();

    let a = options(&dir, "a.msal");
    let report = run(&a, &mut log).unwrap();
    let text = String::from_utf8_lossy(&log).to_string();
    assert!(text.contains("trainable parameters") && text.contains("step 2/2") && text.contains("val Dice"), "{text}");
    assert_eq!(report.steps, 2);
    assert!(report.trainable > 0 && (report.trainable as f64) < MAX_TRAINABLE_SHARE * report.base as f64);
    let file_a = AdapterFile::open(&a.output).unwrap();
    let m = file_a.manifest();
    assert_eq!(m.base_model_sha256, minisam_models::load::ModelFile::open(&tiny_sam()).unwrap().sha256_hex());
    assert_eq!((m.rank, m.alpha, m.name.as_str()), (2, 4.0, "tiny-test"));
    assert!(m.val_dice.is_some_and(|d| (0.0..=1.0).contains(&d)));
    // Trained: B moved away from its zero initialisation.
    assert!(file_a.factors().iter().any(|f| f.b.iter().any(|&v| v != 0.0)));

    let mut b = options(&dir, "b.msal");
    b.checkpoint = Some(dir.join("b_state.json"));
    run(&b, &mut Vec::new()).unwrap();
    assert_eq!(AdapterFile::open(&b.output).unwrap().factors(), file_a.factors(), "same seed, same factors");

    // One step, checkpoint, then resume to two: the same factors as the uninterrupted run.
    let mut c = options(&dir, "c.msal");
    c.checkpoint = Some(dir.join("state.json"));
    c.max_steps = Some(1);
    run(&c, &mut Vec::new()).unwrap();
    c.max_steps = Some(2);
    c.resume = true;
    let mut log = Vec::new();
    run(&c, &mut log).unwrap();
    assert!(String::from_utf8_lossy(&log).contains("resumed from"), "{}", String::from_utf8_lossy(&log));
    // The interrupted run validated once more than the uninterrupted one, which can change which
    // factors count as best; the factors and optimizer state after the last step must agree.
    let fingerprint = c.fingerprint(m.base_model_sha256.as_str(), &m.training_set_sha256);
    let resumed = checkpoint::TrainState::load(&dir.join("state.json"), &fingerprint).unwrap();
    let straight = checkpoint::TrainState::load(&dir.join("b_state.json"), &fingerprint).unwrap();
    assert_eq!((resumed.step, straight.step), (2, 2));
    assert_eq!(resumed.params, straight.params, "resuming continues exactly");
    assert_eq!(resumed.optimizer.m, straight.optimizer.m);

    let mut bad = options(&dir, "bad.msal");
    bad.targets = vec!["no.such.layer".into()];
    assert!(run(&bad, &mut Vec::new()).unwrap_err().to_string().contains("match none"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Decoder-only targets leave the image encoder frozen: each distinct image is encoded once, a
/// disk cache and the in-memory one train the same factors, and a second run reuses the disk
/// entries instead of adding any.
#[test]
fn a_frozen_encoder_is_run_once_per_image_and_cached_runs_agree() {
    let dir = std::env::temp_dir().join(format!("minisam-train-frozen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    synthetic_tree(&dir);
    let decoder_only = |output: &str, cache: Option<PathBuf>| {
        let mut o = options(&dir, output);
        o.targets = vec!["mask_decoder.*".into()];
        o.embedding_cache = cache;
        o
    };
    let count_entries = |d: &Path| walk(d).iter().filter(|p| p.extension().is_some_and(|e| e == "emb")).count();

    let mut log = Vec::new();
    run(&decoder_only("mem.msal", None), &mut log).unwrap();
    let text = String::from_utf8_lossy(&log).to_string();
    assert!(text.contains("image encoder frozen"), "{text}");
    let mem = AdapterFile::open(&dir.join("mem.msal")).unwrap();
    assert!(mem.factors().iter().all(|f| f.name.starts_with("mask_decoder.")));
    assert!(mem.factors().iter().any(|f| f.b.iter().any(|&v| v != 0.0)), "decoder factors trained");

    let cache = dir.join("cache");
    run(&decoder_only("disk1.msal", Some(cache.clone())), &mut Vec::new()).unwrap();
    let entries = count_entries(&cache);
    // Three images, each as is and (possibly) mirrored: at most six distinct encoder inputs.
    assert!((3..=6).contains(&entries), "{entries} cache entries for 3 images");
    run(&decoder_only("disk2.msal", Some(cache.clone())), &mut Vec::new()).unwrap();
    assert_eq!(count_entries(&cache), entries, "the second run encoded nothing new");
    for name in ["disk1.msal", "disk2.msal"] {
        assert_eq!(AdapterFile::open(&dir.join(name)).unwrap().factors(), mem.factors(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `--backend cuda` for the frozen encoder: on a GPU the run trains (encoder on the GPU, decoder
/// LoRA on the CPU tape) and says where the encoder ran; without one it stops with the reason,
/// naming the flag, instead of training somewhere else.
#[test]
fn a_frozen_encoder_on_cuda_trains_there_or_the_run_says_why_not() {
    use minisam_models::cuda::{BackendChoice, CudaBackend, CudaOptions};
    let dir = std::env::temp_dir().join(format!("minisam-train-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    synthetic_tree(&dir);
    let mut o = options(&dir, "cuda.msal");
    o.targets = vec!["mask_decoder.*".into()];
    o.backend = crate::frozen::FrozenBackend { choice: BackendChoice::Cuda, cuda: CudaOptions::default() };
    let gpu = CudaBackend::new(CudaOptions::default()).map_err(|e| e.to_string());
    let mut log = Vec::new();
    match (run(&o, &mut log), gpu) {
        (Ok(report), Ok(_)) => {
            let text = String::from_utf8_lossy(&log);
            assert!(text.contains("frozen encoder on CUDA"), "{text}");
            assert_eq!(report.steps, 2);
            assert!(AdapterFile::open(&o.output).is_ok());
        }
        (Err(e), Err(why)) => {
            eprintln!("SKIP (training on a GPU not tested): no usable CUDA GPU here ({why})");
            assert!(format!("{e:#}").contains("--backend cuda"), "{e:#}");
            assert!(!o.output.exists(), "nothing written");
        }
        (Ok(_), Err(why)) => panic!("--backend cuda trained although no GPU is usable ({why})"),
        (Err(e), Ok(_)) => panic!("a GPU is usable but training with the encoder on it failed: {e:#}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
