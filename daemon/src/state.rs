//! What must survive a restart: the active (default) adapter. A crash, a watchdog kill or an OOM
//! restart must not silently switch the cart from the adapter a field engineer activated back to
//! the base model.
//!
//! The file is `active-adapter.json` in the state directory (`--state-dir`, else the first path of
//! systemd's `$STATE_DIRECTORY`, i.e. `StateDirectory=minisam` → `/var/lib/minisam`; without
//! either, nothing is persisted and start-up says so). It is replaced atomically (temp file,
//! fsync, rename, directory fsync), so a kill at any moment leaves the old choice or the new one.
//!
//! Precedence at start, decided so that both a crash and a deliberate reconfiguration behave as
//! a user expects: the file records the `--adapter` flag that was in force when it was written.
//! If the flag is still the same, the persisted choice wins (it is the newer decision: someone
//! called `ActivateAdapter` after start). If the flag changed (someone edited
//! `/etc/default/minisamd` and restarted), the flag wins.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "active-adapter.json";
/// A state file is a few hundred bytes; anything larger is not ours.
const MAX_STATE_BYTES: u64 = 64 << 10;

/// The persisted choice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAdapter {
    /// Empty for the base model.
    pub name: String,
    /// Empty for the base model; the adapter is restored by content hash, not by name, so a file
    /// replaced under the same name is not silently served instead.
    pub sha256: String,
    /// The `--adapter` flag in force when this was written (see the module docs).
    pub adapter_flag: Option<String>,
}

/// Where the state lives; `None` disables persistence.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `--state-dir`, else the first entry of `$STATE_DIRECTORY` (colon-separated when the unit
    /// lists several), else none.
    pub fn locate(flag: Option<&Path>) -> Option<StateFile> {
        let dir = match flag {
            Some(d) => d.to_path_buf(),
            None => {
                let env = std::env::var_os("STATE_DIRECTORY")?;
                let first = env.to_str()?.split(':').next()?.to_string();
                if first.is_empty() {
                    return None;
                }
                PathBuf::from(first)
            }
        };
        Some(StateFile { path: dir.join(FILE_NAME) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted choice; `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<ActiveAdapter>, String> {
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot stat {}: {e}", self.path.display())),
        };
        if meta.len() > MAX_STATE_BYTES {
            return Err(format!("{} is {} bytes, not a state file", self.path.display(), meta.len()));
        }
        let text = fs::read_to_string(&self.path).map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| format!("{} is damaged ({e})", self.path.display()))
    }

    /// Replaces the persisted choice atomically.
    pub fn store(&self, active: &ActiveAdapter) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let temp = dir.join(format!(".{FILE_NAME}.{}", std::process::id()));
        let result = (|| {
            let mut f = File::options().write(true).create(true).truncate(true).open(&temp)?;
            f.write_all(serde_json::to_string_pretty(active).map_err(std::io::Error::other)?.as_bytes())?;
            f.sync_all()?;
            drop(f);
            fs::rename(&temp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// What start-up should activate, given the flag and the persisted state.
#[derive(Debug, PartialEq, Eq)]
pub enum StartChoice {
    /// The `--adapter` flag (or the base model when it is absent): no state, or the flag changed.
    Flag,
    /// The persisted adapter (by SHA-256; empty = base model).
    Restore(ActiveAdapter),
}

pub fn start_choice(flag: Option<&str>, persisted: Option<ActiveAdapter>) -> StartChoice {
    match persisted {
        Some(p) if p.adapter_flag.as_deref() == flag => StartChoice::Restore(p),
        _ => StartChoice::Flag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("minisamd-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = temp_dir("rt");
        let s = StateFile::locate(Some(&dir)).unwrap();
        assert_eq!(s.load().unwrap(), None);
        let a = ActiveAdapter { name: "us".into(), sha256: "ab".repeat(32), adapter_flag: None };
        s.store(&a).unwrap();
        assert_eq!(s.load().unwrap(), Some(a.clone()));
        let b = ActiveAdapter { name: String::new(), sha256: String::new(), adapter_flag: Some("CT".into()) };
        s.store(&b).unwrap();
        assert_eq!(s.load().unwrap(), Some(b));
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
        assert!(leftovers.is_empty(), "temp files left behind");
        fs::write(s.path(), "{not json").unwrap();
        assert!(s.load().unwrap_err().contains("damaged"));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_state_wins_unless_the_flag_changed() {
        let p = |flag: Option<&str>| ActiveAdapter { name: "us".into(), sha256: "x".into(), adapter_flag: flag.map(String::from) };
        assert_eq!(start_choice(None, None), StartChoice::Flag);
        assert_eq!(start_choice(None, Some(p(None))), StartChoice::Restore(p(None)));
        assert_eq!(start_choice(Some("US"), Some(p(Some("US")))), StartChoice::Restore(p(Some("US"))));
        assert_eq!(start_choice(Some("CT"), Some(p(Some("US")))), StartChoice::Flag, "the flag was edited: it wins");
        assert_eq!(start_choice(None, Some(p(Some("US")))), StartChoice::Flag, "the flag was removed: it wins");
    }
}
