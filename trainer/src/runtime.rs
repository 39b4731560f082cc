//! Small facts about the running process the commands need: where the bundled model is, how much
//! memory the run peaked at, and the `--adapter` file shared by `segment` and `eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minisam_models::adapter::AdapterFile;
use minisam_models::backend::Backend;
use minisam_models::sam::Segmenter;

/// The model shipped in the repository.
pub const BUNDLED_MODEL: &str = "models/litemedsam-nf4.msam";

/// `explicit` if given; else `$MINISAM_MODEL`; else `./models/litemedsam-nf4.msam`; else the
/// workspace's `models/litemedsam-nf4.msam` next to this crate's sources.
pub fn resolve_model(explicit: Option<&Path>, env: Option<&str>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        let p = PathBuf::from(e);
        if !p.is_file() {
            bail!("MINISAM_MODEL={e} is not a file: fix the variable or pass --model FILE");
        }
        return Ok(p);
    }
    let candidates = [
        PathBuf::from(BUNDLED_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(BUNDLED_MODEL),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "no model given and the bundled {BUNDLED_MODEL} was not found (looked in {} and {}): pass --model FILE or set MINISAM_MODEL",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// Opens and fully validates the `--adapter` file, if any. Commands call this before the (slow)
/// model load, so a damaged file costs nothing; whether it fits the model is [`bind_adapter`]'s.
pub fn open_adapter(path: Option<&Path>) -> Result<Option<AdapterFile>> {
    path.map(|p| {
        AdapterFile::open(p).with_context(|| format!("cannot use adapter {}", p.display()))
    })
    .transpose()
}

/// Opens (again: it is small) and binds the `--adapter` file to the loaded model; returns the
/// line to print about it. A mismatched adapter is an error naming both hashes, never ignored.
pub fn bind_adapter<B: Backend>(
    segmenter: &mut Segmenter<B>,
    path: Option<&Path>,
) -> Result<Option<String>> {
    let Some(adapter) = open_adapter(path)? else {
        return Ok(None);
    };
    let p = path.unwrap_or(Path::new(""));
    segmenter
        .set_adapter(Some(&adapter))
        .with_context(|| format!("cannot use adapter {} with this model", p.display()))?;
    Ok(Some(format!("adapter: {} ({})", p.display(), describe_adapter(&adapter))))
}

/// One line: name, modality, rank/alpha, layers, validation Dice, hash prefix.
pub fn describe_adapter(a: &AdapterFile) -> String {
    let m = a.manifest();
    let dice = m
        .val_dice
        .map_or("no validation Dice".to_string(), |d| format!("val Dice {d:.4}"));
    format!(
        "{}, modality {}, rank {}, alpha {}, {} layers, {dice}, sha256 {}",
        m.name,
        m.modality,
        m.rank,
        m.alpha,
        m.tensors.len(),
        &a.sha256_hex()[..12]
    )
}

/// Writes `text` to stdout; a closed pipe (`minisam inspect m | head`) ends the output quietly
/// instead of panicking as `println!` would.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// Peak resident set size in KiB (`VmHWM` of /proc/self/status); `None` where unavailable.
pub fn peak_rss_kib() -> Option<u64> {
    parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_model_wins_and_bad_env_is_an_error() {
        assert_eq!(
            resolve_model(Some(Path::new("x.msam")), Some("/nope")).unwrap(),
            PathBuf::from("x.msam")
        );
        let err = format!(
            "{:#}",
            resolve_model(None, Some("/nonexistent/m.msam")).unwrap_err()
        );
        assert!(err.contains("MINISAM_MODEL"), "{err}");
        let f =
            std::env::temp_dir().join(format!("minisam-test-{}-model.msam", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(resolve_model(None, f.to_str()).unwrap(), f);
        std::fs::remove_file(&f).unwrap();
    }

    /// A scratch directory for one test.
    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisam-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tiny_sam_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_sam/tiny_sam.pth")
    }

    /// Writes a random adapter for the tiny SAM fixture whose base hash is `base`.
    fn adapter_for_tiny_sam(dir: &Path, base: Option<&str>) -> (PathBuf, String) {
        use minisam_models::cpu::CpuBackend;
        use minisam_models::load::ModelFile;
        let file = ModelFile::open(&tiny_sam_path()).unwrap();
        let s = Segmenter::load(CpuBackend::new(1).unwrap(), file.store(), file.config()).unwrap();
        let base = base.unwrap_or(file.sha256_hex());
        let targets = minisam_models::adapter::default_targets();
        let a = minisam_models::adapter::synth::random_adapter(
            s.linear_shapes(),
            &targets,
            base,
            2,
            4.0,
            9,
        )
        .unwrap();
        let path = dir.join("us.lora");
        std::fs::write(&path, a.bytes()).unwrap();
        (path, a.sha256_hex().to_string())
    }

    /// `minisam segment` as a user types it, on the tiny SAM fixture and the bundled frame.
    fn segment(args: &[&str]) -> Result<()> {
        use clap::Parser;
        let image = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/samples/us-hc18-000_HC.png");
        let model = tiny_sam_path();
        let mut argv = vec![
            "minisam".to_string(),
            "segment".into(),
            image.display().to_string(),
            "--box".into(),
            "330,288,489,467".into(),
            "--model".into(),
            model.display().to_string(),
            "--threads".into(),
            "2".into(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Segment(a) => crate::commands::segment::run(&a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn segment_refuses_an_adapter_for_another_model_naming_both_hashes() {
        let dir = scratch("adapter-mismatch");
        let other = "ab".repeat(32);
        let (adapter, _) = adapter_for_tiny_sam(&dir, Some(&other));
        let out = dir.join("mask.png");
        let err = format!(
            "{:#}",
            segment(&["--adapter", adapter.to_str().unwrap(), "-o", out.to_str().unwrap()])
                .unwrap_err()
        );
        let model_sha = minisam_models::load::ModelFile::open(&tiny_sam_path())
            .unwrap()
            .sha256_hex()
            .to_string();
        assert!(
            err.contains("cannot use adapter")
                && err.contains("trained for base model")
                && err.contains(&other)
                && err.contains(&model_sha),
            "{err}"
        );
        assert!(!out.exists(), "no mask may be written with a refused adapter");

        // A damaged file is refused before the model is even loaded.
        let mut bytes = std::fs::read(&adapter).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&adapter, &bytes).unwrap();
        let err = format!(
            "{:#}",
            segment(&["--adapter", adapter.to_str().unwrap(), "-o", out.to_str().unwrap()])
                .unwrap_err()
        );
        assert!(err.contains("cannot use adapter") && err.contains("adapter rejected"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn segment_with_a_matching_adapter_writes_a_mask() {
        let dir = scratch("adapter-match");
        let (adapter, sha) = adapter_for_tiny_sam(&dir, None);
        let out = dir.join("mask.png");
        segment(&["--adapter", adapter.to_str().unwrap(), "-o", out.to_str().unwrap()]).unwrap();
        assert!(std::fs::metadata(&out).unwrap().len() > 0);

        use minisam_models::cpu::CpuBackend;
        use minisam_models::load::ModelFile;
        let file = ModelFile::open(&tiny_sam_path()).unwrap();
        let mut s =
            Segmenter::load(CpuBackend::new(1).unwrap(), file.store(), file.config()).unwrap();
        let line = bind_adapter(&mut s, Some(&adapter)).unwrap().unwrap();
        assert!(line.contains("random-9") && line.contains("modality US") && line.contains(&sha[..12]), "{line}");
        assert_eq!(s.adapter_sha256(), Some(sha.as_str()));
        assert_eq!(bind_adapter(&mut s, None).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peak_rss_is_read_from_proc_status() {
        assert_eq!(
            parse_vm_hwm("Name:\tx\nVmHWM:\t  12345 kB\nVmRSS:\t1 kB\n"),
            Some(12345)
        );
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_kib().unwrap() > 0);
        }
    }
}
