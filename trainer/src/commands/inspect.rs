//! `minisam inspect`: everything a packed file says about itself (header, architecture,
//! provenance, tensor table with checksums), for audits and bug reports. Opening the file
//! validates every range and CRC, so a file that prints is a file that loads. Given a LoRA
//! adapter file (`MSAMLORA`), it prints the adapter's manifest and factor table instead.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use minisam_models::adapter::{self, AdapterFile};
use minisam_models::format::{self, PackedModel, TensorInfo};

use crate::cli::InspectArgs;

/// The fixed header fields (the reader has already checked them when this is printed).
fn header(path: &Path) -> Result<(u32, u32, u32)> {
    let mut h = [0u8; format::HEADER_LEN];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut h))
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    Ok((u32_at(8), u32_at(12), u32_at(16)))
}

/// Whether `path` starts with the adapter magic (decided by content, as for models).
fn is_adapter(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(n == magic.len() && &magic == adapter::MAGIC)
}

pub fn run(args: &InspectArgs) -> Result<()> {
    if is_adapter(&args.file)? {
        let a = AdapterFile::open(&args.file)
            .with_context(|| format!("{} is not a valid adapter file", args.file.display()))?;
        let (version, manifest_len, manifest_crc) = header(&args.file)?;
        if args.json {
            let mut v = adapter_json(&a);
            v["file"] = args.file.display().to_string().into();
            v["header"] = header_json("MSAMLORA", version, manifest_len, manifest_crc);
            return crate::runtime::emit(&format!("{v}\n"));
        }
        let mut text = format!("file: {}\n", args.file.display());
        text += &format!("header: magic MSAMLORA, version {version}, manifest {manifest_len} bytes, manifest crc32 {manifest_crc:08x}\n");
        text += &render_adapter(&a);
        return crate::runtime::emit(&text);
    }
    if args.cost {
        return crate::runtime::emit(&super::cost_report::run(args)?);
    }
    let model = PackedModel::open(&args.file)
        .with_context(|| format!("{} is not a valid packed model (to inspect a checkpoint, pack it first with `minisam pack`)", args.file.display()))?;
    let (version, manifest_len, manifest_crc) = header(&args.file)?;
    let p = model.provenance();
    if args.json {
        let tensors = model.tensors();
        let v = serde_json::json!({
            "kind": "model",
            "file": args.file.display().to_string(),
            "header": header_json("MSAMPACK", version, manifest_len, manifest_crc),
            "sha256": model.file_sha256(),
            "config": model.config(),
            "provenance": p,
            "tensors": tensors.iter().map(|t| serde_json::json!({
                "name": t.name, "shape": t.shape, "dtype": format!("{:?}", t.dtype), "bytes": t.bytes, "crc32": format!("{:08x}", t.crc32),
            })).collect::<Vec<_>>(),
            "total": {
                "tensors": tensors.len(),
                "parameters": tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum::<u64>(),
                "bytes": tensors.iter().map(|t| t.bytes).sum::<u64>(),
            },
        });
        return crate::runtime::emit(&format!("{v}\n"));
    }
    let mut text = format!("file: {}\n", args.file.display());
    text += &format!("header: magic MSAMPACK, version {version}, manifest {manifest_len} bytes, manifest crc32 {manifest_crc:08x}\n");
    text += &format!("sha256: {}\n", model.file_sha256());
    text += &format!("config: {:#?}\n", model.config());
    text += &format!(
        "provenance: source {} (sha256 {}), packer {}, keep_fp16 {:?}\n",
        p.source_file, p.source_sha256, p.packer_version, p.keep_fp16
    );
    text += &render_tensors(&model.tensors());
    crate::runtime::emit(&text)
}

/// The fixed header as JSON (`header` key of `inspect --json`).
fn header_json(magic: &str, version: u32, manifest_bytes: u32, manifest_crc32: u32) -> serde_json::Value {
    serde_json::json!({ "magic": magic, "version": version, "manifest_bytes": manifest_bytes, "manifest_crc32": format!("{manifest_crc32:08x}") })
}

/// An adapter's identity, manifest fields and factor table as JSON (`inspect --json`).
pub fn adapter_json(a: &AdapterFile) -> serde_json::Value {
    let m = a.manifest();
    let bytes: u64 = m.tensors.iter().map(|t| t.a.len + t.b.len).sum();
    serde_json::json!({
        "kind": "adapter",
        "sha256": a.sha256_hex(),
        "name": m.name,
        "modality": m.modality,
        "base_model_sha256": m.base_model_sha256,
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale(),
        "targets": m.targets,
        "training_set_sha256": m.training_set_sha256,
        "created": m.created,
        "val_dice": m.val_dice,
        "trainer_version": m.trainer_version,
        "layers": m.tensors.iter().map(|t| serde_json::json!({
            "name": t.name, "in_features": t.in_features, "out_features": t.out_features, "bytes": t.a.len + t.b.len, "crc32": format!("{:08x}", t.crc32),
        })).collect::<Vec<_>>(),
        "total": { "layers": m.tensors.len(), "parameters": bytes / 4, "bytes": bytes },
    })
}

/// An adapter's identity, manifest fields and factor table.
pub fn render_adapter(a: &AdapterFile) -> String {
    let m = a.manifest();
    let mut out = format!("sha256: {}\n", a.sha256_hex());
    out += &format!("name: {}\nmodality: {}\n", m.name, m.modality);
    out += &format!("base model sha256: {}\n", m.base_model_sha256);
    out += &format!("rank: {}, alpha: {} (scale {})\n", m.rank, m.alpha, m.scale());
    out += &format!("targets: {}\n", m.targets.join(" "));
    out += &format!("training set sha256: {}\n", m.training_set_sha256);
    out += &format!("created: {}\n", m.created);
    out += &format!(
        "validation Dice: {}\n",
        m.val_dice.map_or("not measured".to_string(), |d| format!("{d:.4}"))
    );
    out += &format!("trainer: {}\n", m.trainer_version);
    out += &format!("{:<64} {:>6} {:>6} {:>10} {:>8}\n", "layer", "in", "out", "bytes", "crc32");
    let mut total = 0u64;
    for t in &m.tensors {
        let bytes = t.a.len + t.b.len;
        total += bytes;
        out += &format!(
            "{:<64} {:>6} {:>6} {:>10} {:08x}\n",
            t.name, t.in_features, t.out_features, bytes, t.crc32
        );
    }
    out += &format!(
        "total: {} layers, {} parameters, {total} bytes\n",
        m.tensors.len(),
        total / 4
    );
    out
}

pub fn render_tensors(tensors: &[TensorInfo]) -> String {
    let mut out = format!(
        "{:<64} {:<20} {:<5} {:>12} {:>8}\n",
        "tensor", "shape", "dtype", "bytes", "crc32"
    );
    let (mut total, mut params) = (0u64, 0u64);
    for t in tensors {
        let shape = format!("{:?}", t.shape);
        out.push_str(&format!(
            "{:<64} {:<20} {:<5} {:>12} {:08x}\n",
            t.name,
            shape,
            format!("{:?}", t.dtype),
            t.bytes,
            t.crc32
        ));
        total += t.bytes;
        params += t.shape.iter().product::<usize>() as u64;
    }
    out.push_str(&format!(
        "total: {} tensors, {params} parameters, {total} bytes ({:.2} MiB)\n",
        tensors.len(),
        total as f64 / 1048576.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use minisam_models::format::Dtype;

    #[test]
    fn table_lists_tensors_and_totals() {
        let t = vec![
            TensorInfo {
                name: "a.weight".into(),
                shape: vec![2, 3],
                dtype: Dtype::Nf4,
                bytes: 10,
                crc32: 0xdead,
            },
            TensorInfo {
                name: "a.bias".into(),
                shape: vec![2],
                dtype: Dtype::F16,
                bytes: 4,
                crc32: 1,
            },
        ];
        let s = render_tensors(&t);
        assert!(
            s.lines().any(|l| l.starts_with("a.weight")
                && l.contains("[2, 3]")
                && l.contains("Nf4")
                && l.ends_with("0000dead")),
            "{s}"
        );
        assert!(
            s.contains("total: 2 tensors, 8 parameters, 14 bytes"),
            "{s}"
        );
    }

    #[test]
    fn an_adapter_file_shows_its_manifest() {
        use minisam_models::adapter::{synth, LinearShape};
        let layers = [LinearShape {
            name: "image_encoder.blocks.0.attn.qkv".into(),
            in_features: 8,
            out_features: 24,
        }];
        let base = "cd".repeat(32);
        let a = synth::random_adapter(&layers, &adapter::default_targets(), &base, 2, 4.0, 3)
            .unwrap();
        let s = render_adapter(&a);
        for want in [
            format!("sha256: {}", a.sha256_hex()),
            "name: random-3".into(),
            "modality: US".into(),
            format!("base model sha256: {base}"),
            "rank: 2, alpha: 4 (scale 2)".into(),
            "targets: *.attn.qkv *.attn.proj".into(),
            "validation Dice: not measured".into(),
            "total: 1 layers, 64 parameters, 256 bytes".into(),
        ] {
            assert!(s.contains(&want), "missing {want:?} in:\n{s}");
        }
        assert!(s.lines().any(|l| l.starts_with("image_encoder.blocks.0.attn.qkv") && l.contains(" 8 ") && l.contains(" 24 ")), "{s}");

        let f = std::env::temp_dir()
            .join(format!("minisam-test-{}-inspect.lora", std::process::id()));
        std::fs::write(&f, a.bytes()).unwrap();
        run(&InspectArgs { file: f.clone(), json: false, cost: false, peak_tflops: None, peak_gbs: None }).unwrap();
        let v = adapter_json(&a);
        assert_eq!((v["kind"].as_str(), v["name"].as_str(), v["rank"].as_u64()), (Some("adapter"), Some("random-3"), Some(2)));
        assert_eq!(v["layers"][0]["out_features"], 24);
        assert_eq!(v["total"]["parameters"], 64);
        let mut damaged = a.bytes().to_vec();
        damaged[30] ^= 4;
        std::fs::write(&f, &damaged).unwrap();
        let err = format!("{:#}", run(&InspectArgs { file: f.clone(), json: false, cost: false, peak_tflops: None, peak_gbs: None }).unwrap_err());
        assert!(err.contains("not a valid adapter file"), "{err}");
        std::fs::remove_file(&f).unwrap();
    }

    #[test]
    fn a_non_packed_file_is_an_error() {
        let f =
            std::env::temp_dir().join(format!("minisam-test-{}-inspect.msam", std::process::id()));
        std::fs::write(&f, b"MSAMPACK but truncated").unwrap();
        let err = format!("{:#}", run(&InspectArgs { file: f.clone(), json: true, cost: false, peak_tflops: None, peak_gbs: None }).unwrap_err());
        assert!(err.contains("not a valid packed model"), "{err}");
        std::fs::remove_file(&f).unwrap();
    }
}
