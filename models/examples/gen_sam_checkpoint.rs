//! Writes a random-weight SAM checkpoint with exactly the tensor names, shapes and dtype (f32)
//! of the official `sam_vit_{b,l,h}` release (or of `facebook/sam-vit-*` in Hugging Face naming),
//! so import, packing and the networks can be exercised without the multi-hundred-MB downloads.
//!
//! ```text
//! cargo run -p minisam-models --example gen_sam_checkpoint -- \
//!     --variant vit_b|vit_l|vit_h|tiny --naming official|hf --format pth|safetensors -o FILE [--seed N]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use minisam_models::config::VitConfig;
use minisam_models::import::{layout, synth, write_pth, write_safetensors};

struct Args {
    variant: String,
    naming: String,
    format: String,
    out: PathBuf,
    seed: u64,
}

const USAGE: &str = "usage: gen_sam_checkpoint --variant vit_b|vit_l|vit_h|tiny --naming official|hf --format pth|safetensors -o FILE [--seed N]";

fn parse() -> Result<Args, String> {
    let mut a = Args { variant: String::new(), naming: "official".into(), format: "pth".into(), out: PathBuf::new(), seed: 0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--variant" => a.variant = value()?,
            "--naming" => a.naming = value()?,
            "--format" => a.format = value()?,
            "-o" | "--out" => a.out = PathBuf::from(value()?),
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.out.as_os_str().is_empty() || a.variant.is_empty() {
        return Err("--variant and -o are required".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<usize, String> {
    let (cfg, image_size) = match a.variant.as_str() {
        "vit_b" => (VitConfig::sam_b(), 1024),
        "vit_l" => (VitConfig::sam_l(), 1024),
        "vit_h" => (VitConfig::sam_h(), 1024),
        "tiny" => layout::tiny_vit(),
        other => return Err(format!("unknown variant {other}")),
    };
    let tensors = synth::random_sam_vit(&cfg, image_size, a.seed);
    let tensors = match a.naming.as_str() {
        "official" => tensors,
        "hf" => synth::to_hf_naming(tensors),
        other => return Err(format!("unknown naming {other}")),
    };
    let root = a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "archive".into());
    match a.format.as_str() {
        "pth" => write_pth(&a.out, &root, &tensors),
        "safetensors" => write_safetensors(&a.out, &tensors),
        other => return Err(format!("unknown format {other}")),
    }
    .map_err(|e| e.to_string())?;
    Ok(tensors.len())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(n) => {
            println!("wrote {} ({n} tensors, {} {} naming, seed {})", args.out.display(), args.variant, args.naming, args.seed);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
