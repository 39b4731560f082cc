//! Which images of a protocol data tree (`<root>/<set>/{images,masks}`) a training command reads:
//! some sets, the first N images of each, one side of the train/test split. `train` and `distill`
//! share it, so both read the same images for the same flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::eval::protocol::{self, SetDir};
use crate::eval::split::Split;
use crate::eval::volume_sets::Slicing;

#[derive(Clone, Debug)]
pub struct Selection {
    pub root: PathBuf,
    /// Set names; empty = every set under `root`.
    pub sets: Vec<String>,
    /// First N images of each set (in protocol order), before the split.
    pub limit: Option<usize>,
    pub split: Split,
    /// Share of each set's images in the test split.
    pub test_share: f64,
    /// How NIfTI volume sets are sliced (PNG sets ignore it).
    pub slicing: Slicing,
}

impl Selection {
    /// Every selected image as (set, file name), in protocol order. Unknown set names are an error
    /// naming the sets that exist.
    pub fn images(&self) -> Result<Vec<(SetDir, String)>> {
        let all = protocol::list_sets_with(&self.root, self.slicing)?;
        for s in &self.sets {
            if !all.iter().any(|d| &d.name == s) {
                let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
                bail!("no set {s} under {} (sets: {})", self.root.display(), names.join(", "));
            }
        }
        let mut out = Vec::new();
        for set in all.into_iter().filter(|d| self.sets.is_empty() || self.sets.contains(&d.name)) {
            let files = protocol::list_images(&set)?;
            let n = self.limit.unwrap_or(files.len()).min(files.len());
            for file in files.into_iter().take(n).filter(|f| self.split.keeps(&set.name, set.split_key(f), self.test_share)) {
                out.push((set.clone(), file));
            }
        }
        Ok(out)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}
