//! The adapters the daemon can serve: every valid `MSAMLORA` file in the adapter directories
//! (the first is the writable install target, e.g. `/var/lib/minisam/adapters`; later ones are
//! read-only package directories such as `/usr/share/minisam/adapters`), and safe installation.
//!
//! Files are recognised by content (the reader validates magic, version, checksums and shapes),
//! not by extension; installs are written as `<name>.lora`. A file that fails validation is
//! skipped with a log line, never served.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use minisam_models::adapter::AdapterFile;

use crate::error::{quoted, Error, Result};

/// Extension of installed adapters (the format's own, see models/FORMAT.md).
pub const EXTENSION: &str = "lora";
/// Largest adapter accepted by `InstallAdapter`: rank-64 factors of every ViT-H linear are
/// ~200 MiB; anything larger is a mistake or an attack on the disk.
pub const MAX_ADAPTER_BYTES: u64 = 256 << 20;
/// Prefix of in-progress install files; they are never served and are removed at scan time.
const TEMP_PREFIX: &str = ".install-";

/// One adapter the daemon knows about.
pub struct AdapterEntry {
    pub name: String,
    pub modality: String,
    pub sha256: String,
    pub base_model_sha256: String,
    pub val_dice: Option<f32>,
    pub path: PathBuf,
    pub file: AdapterFile,
}

impl AdapterEntry {
    fn from_file(path: PathBuf, file: AdapterFile) -> Self {
        let m = file.manifest();
        AdapterEntry {
            name: m.name.clone(),
            modality: m.modality.clone(),
            sha256: file.sha256_hex().to_string(),
            base_model_sha256: m.base_model_sha256.clone(),
            val_dice: m.val_dice,
            path,
            file,
        }
    }

    pub fn fits(&self, model_sha256: &str) -> bool {
        self.base_model_sha256 == model_sha256
    }
}

pub struct Registry {
    dirs: Vec<PathBuf>,
    model_sha256: String,
    entries: Vec<Arc<AdapterEntry>>,
}

/// What a scan found wrong, for the log (a bad file is skipped, not fatal).
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Registry {
    pub fn new(dirs: Vec<PathBuf>, model_sha256: String) -> Self {
        Registry { dirs, model_sha256, entries: Vec::new() }
    }

    pub fn entries(&self) -> &[Arc<AdapterEntry>] {
        &self.entries
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    /// Rereads every directory and replaces the list (see [`scan_dirs`]).
    pub fn scan(&mut self) -> Vec<Rejected> {
        let (entries, rejected) = scan_dirs(&self.dirs);
        self.entries = entries;
        rejected
    }

    /// Replaces the list with the result of a [`scan_dirs`] made without holding the registry.
    pub fn replace(&mut self, entries: Vec<Arc<AdapterEntry>>) {
        self.entries = entries;
    }

    /// The adapter called `key`, else the best adapter for modality `key` (case-insensitive;
    /// highest validation Dice among those that fit the loaded model).
    pub fn resolve(&self, key: &str) -> Result<Arc<AdapterEntry>> {
        if let Some(e) = self.entries.iter().find(|e| e.name == key) {
            return Ok(e.clone());
        }
        let mut best: Option<&Arc<AdapterEntry>> = None;
        for e in self.entries.iter().filter(|e| e.modality.eq_ignore_ascii_case(key) && e.fits(&self.model_sha256)) {
            let better = match best {
                None => true,
                Some(b) => e.val_dice.unwrap_or(-1.0) > b.val_dice.unwrap_or(-1.0),
            };
            if better {
                best = Some(e);
            }
        }
        best.cloned().ok_or_else(|| {
            let known: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
            let key = quoted(key);
            Error::UnknownAdapter(format!("no adapter named {key} and none for modality {key} fits the loaded model; installed: {known:?}"))
        })
    }

    /// Refuses adapters trained against another base model before the engine sees them.
    pub fn check_fits(&self, entry: &AdapterEntry) -> Result<()> {
        check_fits(entry, &self.model_sha256)
    }

    /// What an install needs, to run without holding the registry (validation and the fsyncs
    /// take long enough that other bus calls must not wait on them).
    pub fn install_target(&self) -> Result<InstallTarget> {
        let dir = self.dirs.first().ok_or_else(|| Error::Internal("no adapters directory configured".into()))?.clone();
        Ok(InstallTarget { dir, model_sha256: self.model_sha256.clone() })
    }

    /// Adds (or replaces, by name) an entry written by [`InstallTarget::install`].
    pub fn insert(&mut self, entry: AdapterEntry) -> Arc<AdapterEntry> {
        let entry = Arc::new(entry);
        self.entries.retain(|e| e.name != entry.name);
        self.entries.push(entry.clone());
        self.entries.sort_by(|a, b| a.name.cmp(&b.name));
        entry
    }
}

/// Where installs go and which base model they must fit.
pub struct InstallTarget {
    dir: PathBuf,
    model_sha256: String,
}

impl InstallTarget {
    /// Validates `bytes` completely and, if they form an adapter for the loaded model, writes
    /// them crash-safely into the writable directory as `<name>.lora`: a temp file written and
    /// fsynced, renamed over the final name, then the directory fsynced. A crash at any point
    /// leaves either the old file or the new one, never a part of one (temp files are hidden
    /// and removed by the next scan).
    pub fn install(&self, bytes: Vec<u8>) -> Result<AdapterEntry> {
        let file = AdapterFile::from_bytes(bytes).map_err(|e| Error::AdapterRejected(e.to_string()))?;
        let name = file.manifest().name.clone();
        if !safe_file_stem(&name) {
            return Err(Error::AdapterRejected(format!("adapter name {name:?} cannot be a file name")));
        }
        let final_path = self.dir.join(format!("{name}.{EXTENSION}"));
        let entry = AdapterEntry::from_file(final_path.clone(), file);
        check_fits(&entry, &self.model_sha256)?;
        write_atomically(&self.dir, &final_path, entry.file.bytes())
            .map_err(|e| Error::Internal(format!("installing into {}: {e}", self.dir.display())))?;
        Ok(entry)
    }
}

/// Reads every directory. Earlier directories win on a name clash (the writable one overrides
/// packaged defaults). Leftover install temp files in the writable directory (an install killed
/// half-way) are removed. Symbolic links are not followed (an adapter directory is a list of
/// files the daemon owns or was packaged with; a link could point it at any readable file) and
/// files larger than [`MAX_ADAPTER_BYTES`] are refused before they are read.
pub fn scan_dirs(dirs: &[PathBuf]) -> (Vec<Arc<AdapterEntry>>, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut found: Vec<Arc<AdapterEntry>> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let listing = match fs::read_dir(dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                rejected.push(Rejected { path: dir.clone(), reason: format!("cannot list: {e}") });
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if file_name.starts_with(TEMP_PREFIX) {
                if i == 0 {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if file_name.starts_with('.') {
                continue;
            }
            // lstat: the link itself, not what it points at.
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    rejected.push(Rejected { path, reason: format!("cannot stat: {e}") });
                    continue;
                }
            };
            if meta.file_type().is_symlink() {
                rejected.push(Rejected { path, reason: "a symbolic link; adapter directories hold the files themselves".into() });
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            if meta.len() > MAX_ADAPTER_BYTES {
                rejected.push(Rejected { path, reason: format!("{} bytes; adapters are at most {MAX_ADAPTER_BYTES} bytes", meta.len()) });
                continue;
            }
            match AdapterFile::open(&path) {
                Ok(file) => {
                    let entry = AdapterEntry::from_file(path, file);
                    if found.iter().any(|e| e.name == entry.name) {
                        continue;
                    }
                    found.push(Arc::new(entry));
                }
                Err(e) => rejected.push(Rejected { path, reason: e.to_string() }),
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, rejected)
}

fn check_fits(entry: &AdapterEntry, model_sha256: &str) -> Result<()> {
    if entry.fits(model_sha256) {
        Ok(())
    } else {
        Err(Error::AdapterRejected(format!(
            "adapter {:?} was trained for base model {}, the loaded model is {model_sha256}",
            entry.name, entry.base_model_sha256
        )))
    }
}

/// Manifest names are already restricted by the format; this re-checks the property the
/// installer relies on (no path separators, not hidden) so a reader change cannot break it.
fn safe_file_stem(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn write_atomically(dir: &Path, final_path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = File::options().write(true).create_new(true).open(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&temp, final_path)?;
        // The rename is durable only once the directory entry is on disk.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_follow_no_links_and_read_no_oversized_file() {
        let dir = std::env::temp_dir().join(format!("minisamd-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd.lora")).unwrap();
        // Sparse: a size above the limit costs no disk, and must be refused before any read.
        File::create(dir.join("huge.lora")).unwrap().set_len(MAX_ADAPTER_BYTES + 1).unwrap();
        fs::write(dir.join("junk.lora"), b"not an adapter").unwrap();
        let (entries, rejected) = scan_dirs(std::slice::from_ref(&dir));
        assert!(entries.is_empty());
        let reason = |name: &str| rejected.iter().find(|r| r.path.ends_with(name)).map(|r| r.reason.clone()).unwrap_or_default();
        assert!(reason("passwd.lora").contains("symbolic link"), "{}", reason("passwd.lora"));
        assert!(reason("huge.lora").contains("at most"), "{}", reason("huge.lora"));
        assert!(!reason("junk.lora").is_empty());
        fs::remove_dir_all(&dir).ok();
    }
}
