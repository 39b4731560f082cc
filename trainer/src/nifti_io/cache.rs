//! The volumes a data tree's slices come from, kept decoded between slices.
//!
//! `eval` and `train` read a volume's labelled slices one by one; decompressing a 100 MB
//! `.nii.gz` once per slice would dominate a run. Volumes stay here, least recently used first
//! out, up to [`BUDGET_BYTES`] of voxels (the last volume read always stays, whatever its size).
//! `eval` walks slices volume by volume, so each volume is decoded once; `train` visits slices in
//! random order, so a tree larger than the budget is decoded again as it is revisited.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::Volume;

/// Decoded voxels kept across slices.
pub const BUDGET_BYTES: usize = 2 << 30;

struct Entry {
    path: PathBuf,
    volume: Arc<Volume>,
    bytes: usize,
}

/// Most recently used last.
static VOLUMES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The first 3D volume of `path`, decoded once while it stays in the cache.
pub fn volume(path: &Path) -> Result<Arc<Volume>> {
    {
        let mut cache = VOLUMES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = cache.iter().position(|e| e.path == path) {
            let entry = cache.remove(at);
            let volume = Arc::clone(&entry.volume);
            cache.push(entry);
            return Ok(volume);
        }
    }
    // Decoded outside the lock: another thread may read another volume meanwhile.
    let volume = Arc::new(super::read_path(path, 0)?);
    let bytes = volume.byte_size();
    let mut cache = VOLUMES.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|e| e.path != path);
    cache.push(Entry {
        path: path.to_path_buf(),
        volume: Arc::clone(&volume),
        bytes,
    });
    while cache.len() > 1 && cache.iter().map(|e| e.bytes).sum::<usize>() > BUDGET_BYTES {
        cache.remove(0);
    }
    Ok(volume)
}
