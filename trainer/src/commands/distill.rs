//! `minisam distill`: turns `DistillArgs` into `distill::DistillOptions`, runs it (progress on
//! stderr) and prints the summary.

use anyhow::Result;

use crate::cli::DistillArgs;
use crate::distill::{self, DistillOptions, StudentSpec};

pub fn run(args: &DistillArgs) -> Result<()> {
    let opts = DistillOptions {
        teacher: args.teacher.clone(),
        data: args.data.selection(),
        student: StudentSpec { embed_dim: args.student_dim, depth: args.student_depth, num_heads: args.student_heads, window_size: args.student_window },
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr,
        weight_decay: args.weight_decay,
        mask_kl_weight: args.mask_kl,
        mask_kl_boxes: args.mask_kl_boxes,
        seed: args.seed,
        embedding_cache: args.embedding_cache.clone(),
        output: args.output.clone(),
        loss_csv: args.loss_csv.clone(),
        threads: args.threads.get(),
        backend: args.backend.frozen()?,
    };
    let r = distill::run_with_progress(&opts, &mut std::io::stderr(), crate::progress::Mode::for_stderr())?;
    println!(
        "wrote {}: student encoder {} parameters ({:.1}% of the teacher's {}), {} steps at {:.2} s/step, loss {:.4} (first epoch) -> {:.4} (last)",
        opts.output.display(),
        r.student_params,
        100.0 * r.student_params as f64 / r.teacher_encoder_params.max(1) as f64,
        r.teacher_encoder_params,
        r.steps,
        r.mean_step_s,
        r.first_epoch_loss,
        r.last_epoch_loss
    );
    if opts.mask_kl_weight > 0.0 {
        println!("mask KL to the teacher: {:.4} (first epoch) -> {:.4} (last)", r.first_epoch_mask_kl, r.last_epoch_mask_kl);
    }
    Ok(())
}
