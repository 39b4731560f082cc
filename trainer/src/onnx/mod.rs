//! ONNX interoperability (cargo feature `onnx`, which brings in tract): SAM-family ONNX exports
//! imported into our canonical checkpoint so the packer can quantise them, and run by tract as
//! an independent reference for our engine.
//!
//! - [`graph`]: an ONNX file as the ordered stream of its float-constant uses;
//! - [`cursor`], [`map`]: that stream read as SAM layers (by op, position and shape — never by
//!   initializer names, which exporters rewrite), producing canonical tensors;
//! - [`check`]: tract and our CPU engine on the same inputs, compared.

pub mod check;
pub mod cursor;
pub mod graph;
pub mod map;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use minisam_models::import::Checkpoint;
use sha2::{Digest, Sha256};

/// Checkpoint imported from one or more ONNX files, with what each held.
pub struct Imported {
    pub checkpoint: Checkpoint,
    /// `file: encoder kind / decoder` lines.
    pub summary: Vec<String>,
    /// File names joined by `+`, for the provenance.
    pub source_file: String,
    /// Hex SHA-256 of the files' bytes concatenated in the order given (one file: its SHA-256).
    pub source_sha256: String,
}

/// Reads every file, maps each graph, and joins them into one checkpoint: exactly one image
/// encoder and one decoder overall, no tensor given twice.
pub fn import(paths: &[PathBuf]) -> Result<Imported> {
    if paths.is_empty() {
        bail!("no ONNX file given");
    }
    let mut tensors = Vec::new();
    let mut names = BTreeSet::new();
    let mut summary = Vec::new();
    let mut hasher = Sha256::new();
    let (mut encoders, mut decoders) = (0, 0);
    for path in paths {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        hasher.update(&bytes);
        let uses = graph::read_uses(path)?;
        let (mapped, sections) = map::map_graph(&uses).with_context(|| format!("{} is not a supported SAM export", path.display()))?;
        for (name, _, _) in &mapped {
            if !names.insert(name.clone()) {
                bail!("{}: {name} was already given by an earlier file", path.display());
            }
        }
        encoders += usize::from(sections.encoder.is_some());
        decoders += usize::from(sections.decoder);
        let mut held = Vec::new();
        held.extend(sections.encoder.map(|e| format!("{e} image encoder")));
        if sections.decoder {
            held.push("prompt encoder + mask decoder".to_string());
        }
        summary.push(format!("{}: {} ({} tensors)", path.display(), held.join(", "), mapped.len()));
        tensors.extend(mapped);
    }
    if encoders != 1 || decoders != 1 {
        bail!(
            "the files hold {encoders} image encoder(s) and {decoders} decoder(s); a model needs exactly one of each (e.g. `minisam pack encoder.onnx decoder.onnx -o model.msam`)"
        );
    }
    let checkpoint = Checkpoint::from_tensors(tensors).context("the mapped tensors do not form a SAM-family model")?;
    let source_file = paths.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().join("+");
    let source_sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Imported { checkpoint, summary, source_file, source_sha256 })
}

#[cfg(test)]
mod tests;
