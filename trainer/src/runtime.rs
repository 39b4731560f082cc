//! Small facts about the running process the commands need: where the bundled model is, how much
//! memory the run peaked at, and the refusal of adapters until the trainer lands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

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

/// LoRA adapters arrive with the trainer; until then asking for one is an error, never ignored.
pub fn refuse_adapter(adapter: Option<&Path>) -> Result<()> {
    match adapter {
        None => Ok(()),
        Some(a) => bail!(
            "adapters are not supported by this build yet (asked for {}): run without --adapter",
            a.display()
        ),
    }
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

    #[test]
    fn adapters_are_refused_with_a_clear_message() {
        assert!(refuse_adapter(None).is_ok());
        let err = refuse_adapter(Some(Path::new("a.lora")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adapters are not supported by this build yet"),
            "{err}"
        );
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
