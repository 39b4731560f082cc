//! `minisam onnx-check`: the ONNX exports run by tract against the weights mapped out of them
//! run by our engine (f32), on the same input, as a table; fails above `--max-rel-err`.
//! Needs the `onnx` feature (tract); without it, says how to rebuild.

use anyhow::{bail, Result};

use crate::cli::OnnxCheckArgs;

/// What a build without tract says when asked for ONNX.
pub const REBUILD_HINT: &str = "ONNX support is not in this build: rebuild with `cargo build --release -p minisam --features onnx` (tract takes a few minutes to compile)";

#[cfg(not(feature = "onnx"))]
pub fn run(_args: &OnnxCheckArgs) -> Result<()> {
    bail!("{REBUILD_HINT}")
}

#[cfg(feature = "onnx")]
pub fn run(args: &OnnxCheckArgs) -> Result<()> {
    use crate::onnx::{self, check};
    use anyhow::Context;

    let imported = onnx::import(&args.files)?;
    for line in &imported.summary {
        println!("{line}");
    }
    let config = imported.checkpoint.config();
    let inputs = match (&args.image, args.prompt) {
        (Some(image), Some(prompt)) => check::CheckInputs::from_image(image, prompt, config)?,
        (Some(_), None) => bail!("--image needs --box X0,Y0,X1,Y1 in the image's pixels"),
        (None, prompt) => {
            let mut synthetic = check::CheckInputs::synthetic(config.image_size);
            if let Some(p) = prompt {
                synthetic.prompt = p;
            }
            synthetic
        }
    };
    let threads = args.threads.get();
    let results = check::cross_check(&imported, &args.files, &inputs, threads).context("cross-check")?;
    print!("{}", check::render(&results));
    let worst = results.iter().fold(0f64, |m, r| m.max(r.rel_err));
    if worst > args.max_rel_err || worst.is_nan() {
        bail!("largest relative error {worst:.3e} exceeds --max-rel-err {:.1e}", args.max_rel_err);
    }
    println!("ok: largest relative error {worst:.3e} (threads: {threads})");
    Ok(())
}
