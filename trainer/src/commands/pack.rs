//! `minisam pack`: checkpoint (or ONNX exports) in, packed NF4 model out, with the source's
//! name and SHA-256 recorded as provenance so a packed file can always be traced back to its
//! weights.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use minisam_models::format::{self, PackReport, PackStep, Provenance};
use minisam_models::import::Checkpoint;

use crate::cli::PackArgs;
use crate::progress::{self, Progress};

pub fn run(args: &PackArgs) -> Result<()> {
    if let Some(same) = args.inputs.iter().find(|p| **p == args.output) {
        bail!(
            "the output {} is an input: choose another -o path",
            same.display()
        );
    }
    let onnx = args.inputs.iter().any(|p| is_onnx(p));
    let (ckpt, source_file, source_sha256) = if onnx || args.inputs.len() > 1 {
        import_onnx(&args.inputs)?
    } else {
        let path = &args.inputs[0];
        let ckpt = Checkpoint::open(path).with_context(|| {
            format!("cannot import {} (expected a .pth/.pt zip, a .safetensors file or an ONNX export of a SAM-family model)", path.display())
        })?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sha = ckpt.sha256().to_string();
        (ckpt, file_name, sha)
    };
    let shown = args
        .inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let provenance = Provenance::new(source_file, source_sha256.clone());
    let keep_fp16 = keep_fp16_patterns(ckpt.config(), args);
    let report = pack_showing_progress(&ckpt, provenance, &keep_fp16, &args.output)
        .with_context(|| format!("packing {shown} into {}", args.output.display()))?;
    println!(
        "packed {shown} (sha256 {source_sha256}) -> {}",
        args.output.display()
    );
    print!("{}", render_report(&report));
    Ok(())
}

/// Packs with a bar on a terminal (plain lines every 5 s otherwise, on stderr so stdout stays
/// the report): quantising ViT-H takes minutes.
fn pack_showing_progress(ckpt: &Checkpoint, provenance: Provenance, keep_fp16: &[String], out: &Path) -> Result<PackReport> {
    let mut progress: Option<Progress> = None;
    let report = format::pack_with_progress(ckpt, ckpt.config(), provenance, keep_fp16, out, &mut |step| {
        let mut log = std::io::stderr();
        // A line that cannot be written (closed stderr) must not stop the pack.
        match step {
            PackStep::Encoded { done, total, name } => {
                let p = progress.get_or_insert_with(|| {
                    Progress::new(progress::Mode::for_stderr(), "pack", total as u64, Duration::from_secs(5))
                });
                let _ = p.step(&mut log, done as u64, &format!("tensor {done}/{total} {name}"));
            }
            PackStep::Writing { bytes } => {
                if let Some(p) = &progress {
                    let _ = p.println(&mut log, &format!("writing {:.1} MiB", mib(bytes)));
                }
            }
        }
    });
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(report?)
}

/// The architecture's default fp16 list (unless `--all-nf4`) followed by the user's patterns;
/// the result is what the provenance records, so a packed file says how it was made.
fn keep_fp16_patterns(config: &minisam_models::config::ModelConfig, args: &PackArgs) -> Vec<String> {
    let mut keep = if args.all_nf4 { Vec::new() } else { format::default_keep_fp16(config) };
    keep.extend(args.keep_fp16.iter().filter(|p| !keep.contains(p)).cloned().collect::<Vec<_>>());
    keep
}

/// An ONNX model by extension, or by content: a protobuf `ModelProto` starts with field 1
/// (`ir_version`, tag byte 0x08), which neither a zip (`PK`) nor a safetensors header (a
/// little-endian length) does in practice.
fn is_onnx(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        return true;
    }
    let mut first = [0u8; 1];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut first))
        .is_ok_and(|()| first[0] == 0x08)
}

#[cfg(feature = "onnx")]
fn import_onnx(inputs: &[PathBuf]) -> Result<(Checkpoint, String, String)> {
    let imported = crate::onnx::import(inputs)?;
    for line in &imported.summary {
        println!("{line}");
    }
    Ok((
        imported.checkpoint,
        imported.source_file,
        imported.source_sha256,
    ))
}

#[cfg(not(feature = "onnx"))]
fn import_onnx(inputs: &[PathBuf]) -> Result<(Checkpoint, String, String)> {
    let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "{} given: several inputs or .onnx files are ONNX exports. {}",
        names.join(", "),
        super::onnx_check::REBUILD_HINT
    )
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn render_report(r: &PackReport) -> String {
    let ratio = if r.file_bytes > 0 {
        r.source_f32_bytes as f64 / r.file_bytes as f64
    } else {
        0.0
    };
    format!(
        "tensors: {} (nf4 {}: {:.2} MiB, fp16 {}: {:.2} MiB, f32 {}: {:.2} MiB)\nfile: {:.2} MiB, f32 source {:.2} MiB, ratio {:.2}x\n",
        r.tensors,
        r.nf4_tensors,
        mib(r.nf4_bytes),
        r.f16_tensors,
        mib(r.f16_bytes),
        r.f32_tensors,
        mib(r.f32_bytes),
        mib(r.file_bytes),
        mib(r.source_f32_bytes),
        ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shows_counts_sizes_and_ratio() {
        let r = PackReport {
            file_bytes: 1 << 20,
            tensors: 3,
            nf4_tensors: 2,
            nf4_bytes: 1 << 19,
            f16_tensors: 1,
            source_f32_bytes: 8 << 20,
            ..Default::default()
        };
        let s = render_report(&r);
        assert!(s.contains("tensors: 3 (nf4 2: 0.50 MiB, fp16 1"), "{s}");
        assert!(s.contains("ratio 8.00x"), "{s}");
    }

    #[test]
    fn onnx_is_recognised_by_extension_or_content() {
        assert!(is_onnx(&tiny_onnx("encoder.onnx")));
        let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        assert!(!is_onnx(&pth));
    }

    #[test]
    fn unreadable_checkpoint_is_an_error() {
        let dir = std::env::temp_dir().join(format!("minisam-test-{}-pack", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = dir.join("garbage.pth");
        std::fs::write(&ck, b"not a checkpoint").unwrap();
        let args = PackArgs {
            inputs: vec![ck.clone()],
            output: dir.join("out.msam"),
            keep_fp16: vec![],
            all_nf4: false,
        };
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(err.contains("cannot import"), "{err}");
        assert!(!dir.join("out.msam").exists());
        assert!(run(&PackArgs {
            inputs: vec![ck.clone()],
            output: ck,
            keep_fp16: vec![],
            all_nf4: false,
        })
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tiny_vit_defaults_come_first_unless_all_nf4() {
        let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/litemedsam-nf4.msam");
        let config = minisam_models::format::PackedModel::open(&bundled).unwrap().config().clone();
        let args = |keep: &[&str], all_nf4| PackArgs {
            inputs: vec![],
            output: PathBuf::new(),
            keep_fp16: keep.iter().map(|s| s.to_string()).collect(),
            all_nf4,
        };
        let defaults = ["image_encoder.*", "mask_decoder.transformer.*attn*"];
        assert_eq!(keep_fp16_patterns(&config, &args(&["mask_decoder.*"], false)), [defaults[0], defaults[1], "mask_decoder.*"]);
        assert_eq!(keep_fp16_patterns(&config, &args(&["image_encoder.*"], false)), defaults);
        assert_eq!(keep_fp16_patterns(&config, &args(&["mask_decoder.*"], true)), ["mask_decoder.*"]);
        assert!(keep_fp16_patterns(&config, &args(&[], true)).is_empty());
    }

    fn tiny_onnx(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny_sam_onnx")
            .join(file)
    }

    #[cfg(not(feature = "onnx"))]
    #[test]
    fn onnx_without_the_feature_says_how_to_rebuild() {
        let dir = std::env::temp_dir().join(format!("minisam-test-{}-pack-onnx", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = PackArgs {
            inputs: vec![tiny_onnx("encoder.onnx"), tiny_onnx("decoder.onnx")],
            output: dir.join("out.msam"),
            keep_fp16: vec![],
            all_nf4: false,
        };
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(err.contains("--features onnx"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// pack-from-onnx and pack-from-pth of the same weights hold the same tensors, bytes and
    /// config; only the provenance differs.
    #[cfg(feature = "onnx")]
    #[test]
    fn packing_onnx_exports_equals_packing_the_checkpoint() {
        use minisam_models::format::PackedModel;
        use minisam_models::store::WeightStore;
        let dir = std::env::temp_dir().join(format!("minisam-test-{}-pack-onnx", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pth = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth");
        let (from_onnx, from_pth) = (dir.join("onnx.msam"), dir.join("pth.msam"));
        run(&PackArgs { inputs: vec![tiny_onnx("encoder.onnx"), tiny_onnx("decoder.onnx")], output: from_onnx.clone(), keep_fp16: vec![], all_nf4: false }).unwrap();
        run(&PackArgs { inputs: vec![pth], output: from_pth.clone(), keep_fp16: vec![], all_nf4: false }).unwrap();
        let (a, b) = (PackedModel::open(&from_onnx).unwrap(), PackedModel::open(&from_pth).unwrap());
        assert_eq!(a.config(), b.config());
        assert_eq!(a.names(), b.names());
        for name in a.names() {
            let (x, y) = (a.get(&name).unwrap(), b.get(&name).unwrap());
            assert_eq!(x.shape, y.shape, "{name}");
            assert_eq!(x.to_f32(), y.to_f32(), "{name}");
        }
        let source = &a.provenance().source_file;
        assert!(source.starts_with("encoder.onnx (sha256 ") && source.contains(" + decoder.onnx (sha256 "), "{source}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
