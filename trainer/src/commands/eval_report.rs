//! `minisam eval --report DIR`: what the command knows about its run, handed to the HTML page
//! (`eval::html`), and the worst targets kept while it ran (`eval::worst`).

use std::collections::HashMap;

use anyhow::Result;

use crate::cli::EvalArgs;
use crate::eval::html::{self, WorstTarget};
use crate::eval::report::Reference;
use crate::eval::split::Split;
use crate::eval::worst::WorstTargets;
use crate::eval::{self, Outcome, Scored};

/// Keeps each set's worst targets with their overlays while the evaluation runs; keeps nothing
/// (and draws nothing) without `--report`.
pub struct Worst(WorstTargets<WorstTarget>);

impl Worst {
    pub fn new(args: &EvalArgs) -> Self {
        Worst(WorstTargets::new(if args.report.is_some() {
            html::WORST_PER_SET
        } else {
            0
        }))
    }

    pub fn observe(&mut self, s: &Scored) -> Result<()> {
        self.0.offer(s.set, s.dice, || html::worst_target(s))
    }
}

/// Writes the page when `--report` was given and says where.
pub fn write(
    args: &EvalArgs,
    model_description: &str,
    outcome: &Outcome,
    names: &HashMap<(String, u16), String>,
    reference: Option<&Reference>,
    worst: Worst,
) -> Result<()> {
    let Some(dir) = &args.report else {
        return Ok(());
    };
    let worst: HashMap<String, Vec<WorstTarget>> = worst
        .0
        .into_worst_first()
        .into_iter()
        .map(|(set, kept)| (set, kept.into_iter().map(|(_, t)| t).collect()))
        .collect();
    let mut facts = vec![
        (
            "model",
            format!("{} ({model_description})", args.model.display()),
        ),
        ("data", args.data.display().to_string()),
        ("prompt", args.prompt.name().to_string()),
        ("images", images_line(args)),
        ("targets", outcome.rows.len().to_string()),
        (
            "median time",
            format!(
                "encode {:.1} ms, decode {:.1} ms",
                eval::median(&outcome.encode_ms),
                eval::median(&outcome.decode_ms)
            ),
        ),
        ("per-target CSV", args.out.display().to_string()),
    ];
    if let Some(a) = &args.adapter {
        facts.insert(1, ("adapter", a.display().to_string()));
    }
    let page = html::Report {
        facts,
        rows: &outcome.rows,
        names,
        reference,
        worst: &worst,
    };
    let index = html::write(dir, &page)?;
    println!("report: {}", index.display());
    Ok(())
}

/// Which images were scored: all, or the first N per set, or one side of the split.
fn images_line(args: &EvalArgs) -> String {
    let which = match args.limit {
        Some(n) => format!("first {n} per set"),
        None => "all".to_string(),
    };
    match args.split.split {
        Split::All => which,
        side => format!(
            "{which}, {side:?} side of the split (test share {})",
            args.split.test_share
        )
        .to_lowercase(),
    }
}
