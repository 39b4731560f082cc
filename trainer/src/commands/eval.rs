//! `minisam eval`: wires the protocol runner (`crate::eval`) to a real model, writes the CSV and
//! prints the summary beside the reference numbers when the model is one the reference covers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minisam_models::backend::Backend;
use super::model::{Loaded, LoadedOn};
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
use crate::progress::{self, Progress};
use crate::runtime;
use std::time::Duration;

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
        slicing: args.volumes.slicing(),
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
    match super::model::load_selected(&args.backend, threads, &args.model)? {
        LoadedOn::Cpu(loaded) => run_on(args, &plan, *loaded),
        LoadedOn::Cuda(loaded) => run_on(args, &plan, *loaded),
    }
}

/// The rest of `run` on whichever backend holds the model.
fn run_on<B: BackendExtras>(args: &EvalArgs, plan: &eval::Plan, mut loaded: Loaded<B>) -> Result<()> {
    let threads = args.threads.get();
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
    let images = plan.images.iter().filter(|i| !i.targets.is_empty()).count() as u64;
    let mut progress = Progress::new(progress::Mode::for_stderr(), "eval", images, Duration::ZERO);
    let mut done = 0;
    let mut worst = eval_report::Worst::new(args);
    let outcome = eval::execute_observed(
        &model,
        plan,
        |line| {
            done += 1;
            // A line that cannot be written (closed stderr) must not stop the evaluation.
            let _ = progress.item(&mut std::io::stderr(), done, line);
        },
        |scored| worst.observe(scored),
    )?;
    progress.finish();

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
    if args.json {
        let timings = [eval::median(&outcome.encode_ms), eval::median(&outcome.decode_ms)];
        let v = summary_json(args, &loaded.description, &summary, &names, reference.as_ref(), &outcome.rows, timings);
        return runtime::emit(&format!("{v}\n"));
    }
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

/// `eval --json`: the run's settings, per-set and per-label means (beside the reference when
/// there is one), every target's Dice and the median timings. NaN (an empty group) is null.
fn summary_json(
    args: &EvalArgs,
    description: &str,
    summary: &report::Summary,
    names: &HashMap<(String, u16), String>,
    reference: Option<&Reference>,
    rows: &[report::Row],
    [encode_ms, decode_ms]: [f64; 2],
) -> serde_json::Value {
    let num = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
    serde_json::json!({
        "model": args.model.display().to_string(),
        "model_description": description,
        "data": args.data.display().to_string(),
        "prompt": args.prompt.name(),
        "split": format!("{:?}", args.split.split).to_lowercase(),
        "csv": args.out.display().to_string(),
        "sets": summary.per_set.iter().map(|(set, m)| serde_json::json!({
            "set": set,
            "targets": m.n,
            "mean_dice": num(m.mean),
            "reference": reference.and_then(|r| r.per_set.get(set)).copied(),
        })).collect::<Vec<_>>(),
        "labels": summary.per_label.iter().map(|(set, label, m)| serde_json::json!({
            "set": set,
            "label": label,
            "name": names.get(&(set.clone(), *label)),
            "targets": m.n,
            "mean_dice": num(m.mean),
        })).collect::<Vec<_>>(),
        "all_targets": { "targets": summary.all_targets.n, "mean_dice": num(summary.all_targets.mean) },
        "mean_of_sets": num(summary.all_datasets),
        "median_encode_ms": num(encode_ms),
        "median_decode_ms": num(decode_ms),
        "results": rows.iter().map(|r| serde_json::json!({ "set": r.set, "image": r.image, "label": r.label, "dice": r.dice })).collect::<Vec<_>>(),
    })
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
    fn the_json_summary_has_the_documented_keys() {
        let a = args(&["--data", "d", "--json"]);
        assert!(a.json);
        let rows = vec![
            report::Row { set: "s".into(), image: "a.png".into(), label: 1, dice: 0.5 },
            report::Row { set: "s".into(), image: "a.png".into(), label: 2, dice: 1.0 },
        ];
        let summary = report::summarize(&rows);
        let names = HashMap::from([(("s".to_string(), 1u16), "kidney".to_string())]);
        let text = summary_json(&a, "LiteMedSAM", &summary, &names, None, &rows, [12.5, f64::NAN]).to_string();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["prompt"].as_str(), v["split"].as_str(), v["csv"].as_str()), (Some("box"), Some("all"), Some("results.csv")));
        assert_eq!((v["sets"][0]["set"].as_str(), v["sets"][0]["targets"].as_u64(), v["sets"][0]["mean_dice"].as_f64()), (Some("s"), Some(2), Some(0.75)));
        assert!(v["sets"][0]["reference"].is_null());
        assert_eq!((v["labels"][0]["name"].as_str(), v["labels"][1]["name"].is_null()), (Some("kidney"), true));
        assert_eq!((v["all_targets"]["targets"].as_u64(), v["mean_of_sets"].as_f64()), (Some(2), Some(0.75)));
        assert_eq!((v["median_encode_ms"].as_f64(), v["median_decode_ms"].is_null()), (Some(12.5), true), "NaN is null");
        assert_eq!(v["results"][1]["dice"].as_f64(), Some(1.0));
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
