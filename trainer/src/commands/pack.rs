//! `minisam pack`: checkpoint in, packed NF4 model out, with the source's name and SHA-256
//! recorded as provenance so a packed file can always be traced back to its weights.

use anyhow::{bail, Context, Result};
use minisam_models::format::{self, PackReport, Provenance};
use minisam_models::import::Checkpoint;

use crate::cli::PackArgs;

pub fn run(args: &PackArgs) -> Result<()> {
    if args.checkpoint == args.output {
        bail!(
            "the output {} is the input checkpoint: choose another -o path",
            args.output.display()
        );
    }
    let ckpt = Checkpoint::open(&args.checkpoint)
        .with_context(|| format!("cannot import {} (expected a .pth/.pt zip or a .safetensors file of a SAM-family model)", args.checkpoint.display()))?;
    let file_name = args
        .checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let provenance = Provenance::new(file_name, ckpt.sha256());
    let report = format::pack(
        &ckpt,
        ckpt.config(),
        provenance,
        &args.keep_fp16,
        &args.output,
    )
    .with_context(|| {
        format!(
            "packing {} into {}",
            args.checkpoint.display(),
            args.output.display()
        )
    })?;
    println!(
        "packed {} (sha256 {}) -> {}",
        args.checkpoint.display(),
        ckpt.sha256(),
        args.output.display()
    );
    print!("{}", render_report(&report));
    Ok(())
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
    fn unreadable_checkpoint_is_an_error() {
        let dir = std::env::temp_dir().join(format!("minisam-test-{}-pack", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = dir.join("garbage.pth");
        std::fs::write(&ck, b"not a checkpoint").unwrap();
        let args = PackArgs {
            checkpoint: ck.clone(),
            output: dir.join("out.msam"),
            keep_fp16: vec![],
        };
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(err.contains("cannot import"), "{err}");
        assert!(!dir.join("out.msam").exists());
        assert!(run(&PackArgs {
            checkpoint: ck.clone(),
            output: ck,
            keep_fp16: vec![]
        })
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
