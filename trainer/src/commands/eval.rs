//! `minisam eval`: wires the protocol runner (`crate::eval`) to a real model, writes the CSV and
//! prints the summary beside the reference numbers when the model is one the reference covers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minisam_models::backend::Backend;
use minisam_models::cuda::SelectedBackend;
use minisam_models::adapter::AdapterFile;
use minisam_models::image::{Mask, RgbImage};
use minisam_models::pipeline::Geometry;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::{ImageEmbedding, Segmenter};

use super::cuda::BackendExtras;
use super::eval_report;
use crate::cli::EvalArgs;
use crate::eval::protocol::{self, JitterBoxes, PromptKind};
use crate::eval::split::Split;
use crate::eval::report::{self, Reference};
use crate::embedding_cache::EmbeddingCache;
use crate::eval::{self, BoxSegmenter, EvalOptions};
use crate::runtime;

/// The protocol's model step: single output (multimask off), one box per target; the encoder's
/// output optionally read from (and written to) an embedding cache.
struct ProtocolModel<'a, B: Backend> {
    segmenter: &'a Segmenter<B>,
    cache: Option<EmbeddingCache>,
}

impl<B: BackendExtras> BoxSegmenter for ProtocolModel<'_, B> {
    type Embedding = ImageEmbedding<B>;
    fn encode(&self, image: &RgbImage) -> Result<Self::Embedding> {
        let s = self.segmenter;
        let Some(cache) = &self.cache else {
            let emb = s.encode(image)?;
            // Queued GPU work must finish inside the encode timing, not the decode's.
            s.backend().sync()?;
            return Ok(emb);
        };
        let b = s.backend();
        let cached = cache.embedding(s, image)?;
        let geometry = Geometry::new(image.height, image.width, s.config().image_size);
        Ok(ImageEmbedding { embedding: b.from_host(&cached.shape, &cached.values)?, geometry })
    }
    fn segment(&self, emb: &Self::Embedding, b: BoxPrompt) -> Result<Mask> {
        let seg = self.segmenter.decode(emb, &Prompts::with_box(b), false)?;
        seg.masks
            .into_iter()
            .next()
            .context("the decoder returned no mask")
    }
}

/// The embedding cache for `segmenter` in `dir`: keyed by the model file's hash and, when the
/// bound adapter changes the image encoder, by the adapter's hash too.
fn open_cache<B: Backend>(dir: &Path, segmenter: &Segmenter<B>, adapter: Option<&AdapterFile>) -> Result<EmbeddingCache> {
    let Some(model) = segmenter.model_sha256() else {
        bail!("--embedding-cache needs a packed model (its entries are keyed by the model file's hash)");
    };
    let encoder_variant = match adapter {
        Some(a) if a.factors().iter().any(|f| f.name.starts_with("image_encoder.")) => a.sha256_hex(),
        _ => "",
    };
    EmbeddingCache::open(dir, model, encoder_variant)
}

fn jitter_file(args: &EvalArgs) -> Result<Option<PathBuf>> {
    if args.prompt != PromptKind::BoxJitter {
        return Ok(None);
    }
    match (&args.jitter_boxes, protocol::default_jitter_path(&args.data)) {
        (Some(p), _) => Ok(Some(p.clone())),
        (None, Some(p)) => Ok(Some(p)),
        (None, None) => bail!(
            "--prompt box-jitter needs the reference boxes: {} does not exist, pass --jitter-boxes FILE",
            args.data.join("../reference/boxes-jitter.json").display()
        ),
    }
}

/// The reference column for this model and prompt, from `<data>/../reference/SUMMARY.md`, for
/// the tree named like the data folder or its parent (`shared/data` is tree `shared`).
fn reference(data: &Path, family: Option<&str>, prompt: PromptKind) -> Option<Reference> {
    let family = family?;
    let md = std::fs::read_to_string(data.join("..").join("reference").join("SUMMARY.md")).ok()?;
    let abs = data.canonicalize().ok()?;
    let column = format!("{family} {}", prompt.name());
    let trees = [abs.file_name(), abs.parent().and_then(Path::file_name)];
    let found = trees
        .into_iter()
        .flatten()
        .find_map(|tree| Reference::parse(&md, &tree.to_string_lossy(), &column));
    found
}

pub fn run(args: &EvalArgs) -> Result<()> {
    // Validated now, before the slow model load; bound (and checked against the model) after it.
    runtime::open_adapter(args.adapter.as_deref())?;
    let jitter = match jitter_file(args)? {
        Some(p) => {
            let j = JitterBoxes::load(&p)?;
            eprintln!("jitter boxes: {} from {}", j.len(), p.display());
            Some(j)
        }
        None => None,
    };
    let opts = EvalOptions {
        data: &args.data,
        prompt: args.prompt,
        jitter: jitter.as_ref(),
        limit: args.limit.map(|n| n as usize),
        split: args.split.split,
        test_share: args.split.test_share,
    };
    let plan = eval::plan(&opts)?;
    eprintln!(
        "{} sets, {} images, {} targets, prompt {}, split {:?} (test share {})",
        plan.sets.len(),
        plan.images.len(),
        plan.target_count(),
        args.prompt.name(),
        args.split.split,
        args.split.test_share
    );

    let threads = args.threads.get();
    match args.backend.select(threads)? {
        SelectedBackend::Cpu(b) => run_on(args, &plan, b),
        SelectedBackend::Cuda(b) => run_on(args, &plan, *b),
    }
}

/// The rest of `run` on whichever backend was selected.
fn run_on<B: BackendExtras>(args: &EvalArgs, plan: &eval::Plan, backend: B) -> Result<()> {
    let threads = args.threads.get();
    let mut loaded = super::model::load(&args.model, backend)?;
    eprintln!(
        "model: {} ({}), loaded in {:.0} ms, {threads} threads",
        args.model.display(),
        loaded.description,
        loaded.load_ms
    );
    if let Some(line) = runtime::bind_adapter(&mut loaded.segmenter, args.adapter.as_deref())? {
        eprintln!("{line}");
    }
    let cache = match &args.embedding_cache {
        Some(dir) => {
            let adapter = runtime::open_adapter(args.adapter.as_deref())?;
            Some(open_cache(dir, &loaded.segmenter, adapter.as_ref())?)
        }
        None => None,
    };
    let model = ProtocolModel { segmenter: &loaded.segmenter, cache };
    let mut worst = eval_report::Worst::new(args);
    let outcome = eval::execute_observed(&model, plan, |line| {
        eprintln!("{line}")
    }, |scored| worst.observe(scored))?;

    report::write_csv_file(&args.out, &outcome.rows)?;
    let summary = report::summarize(&outcome.rows);
    let family = super::model::family(loaded.segmenter.config());
    // The reference is for the whole tree: beside a --limit or --split run it would mislead.
    let reference = if args.limit.is_none() && args.split.split == Split::All {
        reference(&args.data, family, args.prompt)
    } else {
        None
    };
    let names: HashMap<(String, u16), String> = plan.names.clone();
    print!("{}", report::render(&summary, &names, reference.as_ref()));
    println!(
        "\n{} targets written to {}; median encode {:.1} ms, decode {:.1} ms",
        outcome.rows.len(),
        args.out.display(),
        eval::median(&outcome.encode_ms),
        eval::median(&outcome.decode_ms)
    );
    eval_report::write(args, &loaded.description, &outcome, &names, reference.as_ref(), worst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> EvalArgs {
        let mut v = vec!["minisam", "eval", "--model", "m.msam"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Eval(e) => e,
            _ => unreachable!("parsed eval"),
        }
    }

    #[test]
    fn jitter_file_is_explicit_then_default_else_an_error() {
        let root =
            std::env::temp_dir().join(format!("minisam-test-{}-jitterfile", std::process::id()));
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let d = data.to_str().unwrap();
        assert_eq!(jitter_file(&args(&["--data", d])).unwrap(), None);
        assert_eq!(
            jitter_file(&args(&[
                "--data",
                d,
                "--prompt",
                "box-jitter",
                "--jitter-boxes",
                "j.json"
            ]))
            .unwrap(),
            Some(PathBuf::from("j.json"))
        );
        let err = format!(
            "{:#}",
            jitter_file(&args(&["--data", d, "--prompt", "box-jitter"])).unwrap_err()
        );
        assert!(err.contains("--jitter-boxes"), "{err}");
        std::fs::create_dir_all(root.join("reference")).unwrap();
        std::fs::write(root.join("reference/boxes-jitter.json"), "[]").unwrap();
        let found = jitter_file(&args(&["--data", d, "--prompt", "box-jitter"]))
            .unwrap()
            .unwrap();
        assert!(found.ends_with("reference/boxes-jitter.json"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reference_column_follows_tree_family_and_prompt() {
        let root =
            std::env::temp_dir().join(format!("minisam-test-{}-reftree", std::process::id()));
        let data = root.join("shared").join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(root.join("shared/reference")).unwrap();
        let md = "## Tree `shared`\n\n| dataset | n | litemedsam box | litemedsam box-jitter |\n|---|---|---|---|\n| s | 3 | 0.5 | 0.25 |\n";
        std::fs::write(root.join("shared/reference/SUMMARY.md"), md).unwrap();
        let r = reference(&data, Some("litemedsam"), PromptKind::BoxJitter).unwrap();
        assert_eq!(r.per_set.get("s"), Some(&0.25));
        assert!(reference(&data, Some("mobilesam"), PromptKind::Box).is_none());
        assert!(reference(&data, None, PromptKind::Box).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
