//! ONNX interoperability (cargo feature `onnx`, which brings in tract): SAM-family ONNX exports
//! imported into our canonical checkpoint so the packer can quantise them, and run by tract as
//! an independent reference for our engine.
//!
//! - [`graph`]: an ONNX file as the ordered stream of its float-constant uses;
//! - [`cursor`], [`map`]: that stream read as SAM layers (by op, position and shape — never by
//!   initializer names, which exporters rewrite), producing canonical tensors;
//! - [`check`]: tract and our CPU engine on the same inputs, compared.

pub mod check;
pub mod contrib;
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
    /// Every file read, in order: each model given, then the external-data files it uses.
    pub files: Vec<graph::ReadFile>,
    /// Some weights were stored as fp16 (converted to f32 on import).
    pub fp16: bool,
    /// The decoder returns one mask (`SamOnnxModel(return_single_mask=True)`).
    pub single_mask: bool,
    /// For the provenance: every file read with its own SHA-256 ([`source_description`]).
    pub source_file: String,
    /// Hex SHA-256 of every file's bytes concatenated in the order of `files` (one file: its
    /// SHA-256).
    pub source_sha256: String,
}

/// `name (sha256 …) + name.data (external data of name, sha256 …) + …`, with `fp16 weights read
/// as f32` on the models that held fp16 weights: what `minisam inspect` shows as the source.
pub fn source_description(files: &[graph::ReadFile], fp16_models: &[String]) -> String {
    let entries: Vec<String> = files
        .iter()
        .map(|f| {
            let name = graph::file_name(&f.path);
            let mut notes = Vec::new();
            if let Some(model) = &f.external_data_of {
                notes.push(format!("external data of {model}"));
            } else if fp16_models.contains(&name) {
                notes.push("fp16 weights read as f32".to_string());
            }
            notes.push(format!("sha256 {}", f.sha256));
            format!("{name} ({})", notes.join(", "))
        })
        .collect();
    entries.join(" + ")
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
    let mut files = Vec::new();
    let mut fp16_models = Vec::new();
    let (mut encoders, mut decoders, mut single_mask) = (0, 0, false);
    for path in paths {
        let model = graph::read_model(path, &mut hasher)?;
        let (mapped, sections) = map::map_graph(&model.uses).with_context(|| format!("{} is not a supported SAM export (written by {})", path.display(), model.tool))?;
        for (name, _, _) in &mapped {
            if !names.insert(name.clone()) {
                bail!("{}: {name} was already given by an earlier file", path.display());
            }
        }
        encoders += usize::from(sections.encoder.is_some());
        decoders += usize::from(sections.decoder);
        single_mask |= sections.single_mask;
        let mut held = Vec::new();
        held.extend(sections.encoder.map(|e| format!("{e} image encoder")));
        if sections.decoder {
            held.push(format!("prompt encoder + mask decoder{}", if sections.single_mask { " (single-mask output)" } else { "" }));
        }
        let mut notes = vec![format!("{} tensors", mapped.len())];
        if model.fp16 {
            notes.push("fp16 weights read as f32".into());
            fp16_models.push(graph::file_name(path));
        }
        if model.files.len() > 1 {
            notes.push(format!("weights in {}", model.files[1..].iter().map(|f| graph::file_name(&f.path)).collect::<Vec<_>>().join(", ")));
        }
        summary.push(format!("{}: {} ({})", path.display(), held.join(", "), notes.join("; ")));
        tensors.extend(mapped);
        files.extend(model.files);
    }
    if encoders != 1 || decoders != 1 {
        bail!(
            "the files hold {encoders} image encoder(s) and {decoders} decoder(s); a model needs exactly one of each (e.g. `minisam pack encoder.onnx decoder.onnx -o model.msam`)"
        );
    }
    let checkpoint = Checkpoint::from_tensors(tensors).context("the mapped tensors do not form a SAM-family model")?;
    let source_file = source_description(&files, &fp16_models);
    let source_sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Imported { checkpoint, summary, files, fp16: !fp16_models.is_empty(), single_mask, source_file, source_sha256 })
}

#[cfg(test)]
mod tests;
