//! The `minisam` binary on the committed NIfTI mini-trees with the bundled NF4 LiteMedSAM:
//! `segment --json` on a volume's slice, `eval --json` on the MSD and KiTS layouts (progress as
//! plain lines, since stderr is a pipe here), `train` on a KiTS tree, `inspect --json`. Every
//! JSON output is parsed and its documented keys checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled model and the corpus, or `None` (the test says why and returns).
fn inputs() -> Option<(PathBuf, PathBuf)> {
    let model = root().join("models/litemedsam-nf4.msam");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nifti");
    if !model.is_file() || !corpus.join("expected.json").is_file() {
        println!("SKIP: needs models/litemedsam-nf4.msam and trainer/tests/data/nifti");
        return None;
    }
    Some((model, corpus))
}

fn minisam(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_minisam"))
        .args(args)
        .env("MINISAM_PROGRESS", "plain")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "minisam {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{text}"))
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("minisam-cli-nifti-{}-{name}", std::process::id()))
}

#[test]
fn segment_json_on_a_volume_slice() {
    let Some((model, corpus)) = inputs() else {
        return;
    };
    let volume = corpus.join("msd/Task99_Mini/imagesTr/mini_001.nii.gz");
    let mask = temp("mask.png");
    let out = minisam(&[
        "segment",
        volume.to_str().unwrap(),
        "--slice",
        "z:2",
        "--box",
        "6,5,17,10",
        "--model",
        model.to_str().unwrap(),
        "-o",
        mask.to_str().unwrap(),
        "--threads",
        "2",
        "--backend",
        "cpu",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(
        (
            v["width"].as_u64(),
            v["height"].as_u64(),
            v["slice"].as_str()
        ),
        (Some(24), Some(20), Some("z:2"))
    );
    assert_eq!(v["mask"].as_str(), mask.to_str());
    assert_eq!(
        (
            v["ious"].as_array().unwrap().len(),
            v["kept"].as_u64(),
            v["backend"].as_str()
        ),
        (1, Some(0), Some("cpu"))
    );
    let written = minisam::image_io::read_labels(&mask).unwrap();
    let inside = written.labels.iter().filter(|&&l| l != 0).count() as u64;
    assert_eq!(
        v["mask_pixels"].as_u64(),
        Some(inside),
        "mask_pixels counts the written mask"
    );
    for key in ["iou", "encode_ms", "decode_ms"] {
        assert!(
            v[key].as_f64().is_some_and(f64::is_finite),
            "{key}: {}",
            v[key]
        );
    }
    std::fs::remove_file(&mask).unwrap();
}

#[test]
fn eval_json_on_msd_and_kits_trees_with_plain_progress() {
    let Some((model, corpus)) = inputs() else {
        return;
    };
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus.join("expected.json")).unwrap()).unwrap();
    for (tree, set) in [("msd/Task99_Mini", "Task99_Mini"), ("kits", "kits")] {
        let csv = temp(&format!("{set}.csv"));
        let out = minisam(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            corpus.join(tree).to_str().unwrap(),
            "--out",
            csv.to_str().unwrap(),
            "--threads",
            "2",
            "--backend",
            "cpu",
            "--json",
            "--limit",
            "3",
        ]);
        let v = json(&out);
        // --limit 3: the first three labelled slices (of the first volume here).
        let slices = &expected["trees"][tree].as_array().unwrap()[..3];
        let targets: usize = slices
            .iter()
            .map(|s| s["targets"].as_array().unwrap().len())
            .sum();
        assert_eq!(v["sets"][0]["set"].as_str(), Some(set));
        assert_eq!(
            v["all_targets"]["targets"].as_u64(),
            Some(targets as u64),
            "{tree}"
        );
        let results = v["results"].as_array().unwrap();
        assert_eq!(
            results[0]["image"], slices[0]["image"],
            "{tree}: images are named <volume>@<axis><index>"
        );
        assert!(results
            .iter()
            .all(|r| r["dice"].as_f64().is_some_and(|d| (0.0..=1.0).contains(&d))));
        // stderr is not a terminal: one plain line per slice, with elapsed time and ETA.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with('[')).collect();
        assert_eq!(lines.len(), slices.len(), "{stderr}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("(elapsed ") && l.contains(", ETA ") && !l.contains('\u{1b}')),
            "{stderr}"
        );
        let csv_text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(
            csv_text.lines().count(),
            targets + 1,
            "the CSV is written with --json too"
        );
        std::fs::remove_file(&csv).unwrap();
    }
}

#[test]
fn train_reads_a_kits_tree() {
    let Some((model, corpus)) = inputs() else {
        return;
    };
    let adapter = temp("kits.lora");
    let out = minisam(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        corpus.join("kits").to_str().unwrap(),
        "--target",
        "mask_decoder.output_hypernetworks_mlps.0.*",
        "--name",
        "kits-test",
        "--modality",
        "CT",
        "--window",
        "abdomen",
        "--max-steps",
        "2",
        "--accum",
        "1",
        "--epochs",
        "1",
        "--val-fraction",
        "0.5",
        "--threads",
        "2",
        "--backend",
        "cpu",
        "-o",
        adapter.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step 2/2"), "{stderr}");
    let inspect = minisam(&["inspect", adapter.to_str().unwrap(), "--json"]);
    let v = json(&inspect);
    assert_eq!(
        (
            v["kind"].as_str(),
            v["name"].as_str(),
            v["modality"].as_str()
        ),
        (Some("adapter"), Some("kits-test"), Some("CT"))
    );
    assert!(
        v["val_dice"].as_f64().is_some(),
        "validation ran on the held-out case"
    );
    std::fs::remove_file(&adapter).unwrap();
}

#[test]
fn inspect_json_on_the_bundled_model() {
    let Some((model, _)) = inputs() else { return };
    let v = json(&minisam(&["inspect", model.to_str().unwrap(), "--json"]));
    assert_eq!(
        (v["kind"].as_str(), v["header"]["magic"].as_str()),
        (Some("model"), Some("MSAMPACK"))
    );
    assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(v["total"]["tensors"].as_u64(), Some(tensors.len() as u64));
    let bytes: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["total"]["bytes"].as_u64(), Some(bytes));
    assert!(
        v["config"].is_object() && v["provenance"]["source_file"].is_string(),
        "{}",
        v["provenance"]
    );
}
