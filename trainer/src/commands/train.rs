//! `minisam train`: parses nothing itself; turns `TrainArgs` into `train::TrainOptions`, runs
//! the loop (progress on stderr) and prints what was written.

use anyhow::Result;

use crate::cli::TrainArgs;
use crate::train::{self, augment::AugmentOptions, TrainOptions};

/// The options of a run from its arguments.
pub fn options(args: &TrainArgs) -> Result<TrainOptions> {
    Ok(TrainOptions {
        model: args.model.clone(),
        data: args.data.selection(),
        output: args.output.clone(),
        name: args.name.clone(),
        modality: args.modality.clone(),
        rank: args.rank,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f32),
        targets: if args.targets.is_empty() { minisam_models::adapter::default_targets() } else { args.targets.clone() },
        lr: args.lr,
        weight_decay: args.weight_decay,
        epochs: args.epochs,
        accum: args.accum,
        max_steps: args.max_steps,
        val_fraction: args.val_fraction,
        patience: args.patience,
        seed: args.seed,
        augment: AugmentOptions { hflip: !args.no_flips, vflip: !args.no_flips, intensity: !args.no_intensity, jitter: args.jitter },
        embedding_cache: args.embedding_cache.clone(),
        checkpoint: args.checkpoint.clone(),
        resume: args.resume,
        threads: args.threads.get(),
        backend: args.backend.frozen()?,
    })
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let opts = options(args)?;
    let report = train::run_with_progress(&opts, &mut std::io::stderr(), crate::progress::Mode::for_stderr())?;
    println!(
        "wrote {} (sha256 {}): {} trainable parameters ({:.2}% of {}), {} steps at {:.1} s/step, val Dice {}",
        opts.output.display(),
        report.adapter_sha256,
        report.trainable,
        100.0 * report.trainable as f64 / report.base.max(1) as f64,
        report.base,
        report.steps,
        report.mean_step_s,
        report.val_dice.map_or("-".into(), |d| format!("{d:.4}"))
    );
    Ok(())
}
