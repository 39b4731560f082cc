//! `minisam train`: LoRA adapters trained against the frozen NF4 base on the engine's own
//! networks (`minisam_models::autograd`), one modality at a time.
//!
//! Each step: an augmented example (flips, intensity, jittered box from the ground truth),
//! preprocessed exactly as inference does, forward through the recording backend, BCE + Dice on
//! the low-res logits against the resized ground truth, backward into the LoRA factors;
//! gradients are accumulated over `accum` examples, then AdamW updates. After every epoch the
//! validation split is scored with the evaluation protocol's Dice (tight box, single output,
//! inference post-processing); the best factors are kept and training stops after `patience`
//! epochs without improvement. A checkpoint after every update makes the run resumable.

pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;
pub mod rng;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use minisam_models::adapter::{self, AdapterMeta, LinearShape, LoraFactors};
use minisam_models::autograd::{attach_lora, export_lora, SamModel, TapeBackend};
use minisam_models::backend::Backend;
use minisam_models::load::ModelFile;
use minisam_models::image::RgbImage;
use minisam_models::pipeline::{self, Geometry};
use minisam_models::prompt::{BoxPrompt, Prompts};

use crate::embedding_cache::EmbeddingCache;
use crate::frozen::{FrozenBackend, FrozenModel};
use crate::eval::dice::dice;
use crate::progress::{self, fmt_duration, Progress};
use crate::selection::Selection;
use augment::{augment, AugmentOptions};
use checkpoint::TrainState;
use data::Example;
use optim::AdamW;
use rng::Rng;

/// Most trainable parameters an adapter may have (absolute, and as a share of the base).
pub const MAX_TRAINABLE: usize = 5_000_000;
pub const MAX_TRAINABLE_SHARE: f64 = 0.05;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub model: PathBuf,
    /// The images to learn from (`Split::Train` leaves the test split for `eval`).
    pub data: Selection,
    pub output: PathBuf,
    pub name: String,
    pub modality: String,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub lr: f32,
    pub weight_decay: f32,
    pub epochs: usize,
    pub accum: usize,
    pub max_steps: Option<usize>,
    pub val_fraction: f64,
    pub patience: usize,
    pub seed: u64,
    pub augment: AugmentOptions,
    pub checkpoint: Option<PathBuf>,
    pub resume: bool,
    pub threads: usize,
    /// Where a frozen image encoder's outputs are kept across runs (memory only when `None`).
    pub embedding_cache: Option<PathBuf>,
    /// Where a frozen image encoder runs (the trainable part always trains on the CPU tape).
    pub backend: FrozenBackend,
}

/// Names of the image encoder's layers start with this.
const ENCODER_PREFIX: &str = "image_encoder.";

impl TrainOptions {
    /// The augmentation actually applied: with a frozen encoder, only what keeps the number of
    /// distinct encoder inputs per image at two (see `run`).
    fn effective_augment_for(&self, encoder_frozen: bool) -> AugmentOptions {
        if encoder_frozen {
            AugmentOptions { vflip: false, intensity: false, ..self.augment }
        } else {
            self.augment
        }
    }

    /// The settings a resumed run must share with the one that wrote the checkpoint.
    fn fingerprint(&self, base_sha256: &str, train_sha256: &str) -> String {
        format!(
            "base {base_sha256} data {train_sha256} rank {} alpha {} targets {:?} lr {} wd {} accum {} seed {} aug {:?}",
            self.rank, self.alpha, self.targets, self.lr, self.weight_decay, self.accum, self.seed, self.augment
        )
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct TrainReport {
    pub trainable: usize,
    pub base: usize,
    pub steps: usize,
    pub mean_step_s: f64,
    pub val_dice: Option<f64>,
    pub adapter_sha256: String,
}

/// A Kaiming-uniform A (bound `1/sqrt(in)`) and a zero B: the adapter starts as the identity.
fn init_factors(layers: &[LinearShape], rank: usize, seed: u64) -> Vec<LoraFactors> {
    let mut rng = Rng::new(seed, 0x10ba);
    layers
        .iter()
        .map(|l| {
            let bound = 1.0 / (l.in_features.max(1) as f64).sqrt();
            LoraFactors {
                name: l.name.clone(),
                in_features: l.in_features,
                out_features: l.out_features,
                a: (0..rank * l.in_features).map(|_| rng.uniform(-bound, bound) as f32).collect(),
                b: vec![0.0; l.out_features * rank],
            }
        })
        .collect()
}

/// An example's image and target mask (`[h, w]` 0/1).
fn load_example(e: &Example) -> Result<(RgbImage, Vec<u8>, Vec<u16>)> {
    let image = e.source.read_image(&e.file)?;
    let labels = e.source.read_labels(&e.file)?;
    if (labels.width, labels.height) != (image.width, image.height) {
        bail!("{}: mask is {}x{}, image {}x{}", e.source.mask_path(&e.file).display(), labels.width, labels.height, image.width, image.height);
    }
    let mask = labels.labels.iter().map(|&l| u8::from(l == e.label)).collect();
    Ok((image, mask, labels.labels))
}

/// A frozen image encoder: the inference engine (activations in its load-time arena, not on the
/// tape) behind the embedding cache, so each distinct image is encoded once.
struct FrozenEncoder {
    model: FrozenModel,
    cache: EmbeddingCache,
}

/// Forward of one example: mask logits `[1, 1, L, L]` and the geometry. With `frozen`, the image
/// encoder's output comes from it instead of the tape.
fn forward(model: &SamModel<TapeBackend>, tape: &TapeBackend, frozen: Option<&FrozenEncoder>, image: &RgbImage, prompt: BoxPrompt) -> Result<(minisam_models::autograd::TapeTensor, Geometry)> {
    let kind = model.config.preprocess;
    let s = model.config.image_size;
    let geometry = Geometry::new(image.height, image.width, s);
    let prompts = Prompts::with_box(prompt);
    prompts.validate(image.width, image.height)?;
    let emb = match frozen {
        Some(f) => {
            let e = f.model.embedding(&f.cache, image)?;
            tape.from_host(&e.shape, &e.values)?
        }
        None => {
            let input = pipeline::preprocess(kind, image, &geometry)?;
            let x = tape.from_host(&[1, 3, s, s], &input)?;
            model.encode(tape, &x)?
        }
    };
    let logits = model.decode(tape, &emb, &pipeline::transform_prompts(kind, &prompts, &geometry), false)?;
    Ok((logits, geometry))
}

/// Mean protocol Dice over `examples` (tight box, single output), recording off.
fn validate(model: &SamModel<TapeBackend>, tape: &TapeBackend, frozen: Option<&FrozenEncoder>, examples: &[Example]) -> Result<f64> {
    tape.set_recording(false);
    let mut total = 0.0;
    for e in examples {
        let (image, _, labels) = load_example(e)?;
        let [x0, y0, x1, y1] = e.tight.map(|v| v as f32);
        let (logits, geometry) = forward(model, tape, frozen, &image, BoxPrompt { x0, y0, x1, y1 })?;
        let plane = tape.to_host(&logits)?;
        let side = (plane.len() as f64).sqrt() as usize;
        let mask = pipeline::postprocess(model.config.preprocess, &plane, side, &geometry)?;
        total += dice(&mask.data, &labels, e.label)?;
    }
    tape.set_recording(true);
    Ok(total / examples.len().max(1) as f64)
}

fn snapshot(tape: &TapeBackend) -> Result<Vec<(String, Vec<f32>)>> {
    tape.parameters().into_iter().map(|p| Ok((p.name.clone(), tape.param_values(&p.name)?))).collect()
}

fn restore(tape: &TapeBackend, values: &[(String, Vec<f32>)]) -> Result<()> {
    for (name, v) in values {
        tape.set_param_values(name, v)?;
    }
    Ok(())
}

/// Runs training as `opts` says and writes the adapter; progress goes to `log` as lines.
pub fn run(opts: &TrainOptions, log: &mut dyn Write) -> Result<TrainReport> {
    run_with_progress(opts, log, progress::Mode::Plain)
}

/// [`run`] with step progress shown as `mode` says (a bar draws on stderr; other lines still
/// go to `log`, above the bar).
pub fn run_with_progress(opts: &TrainOptions, log: &mut dyn Write, mode: progress::Mode) -> Result<TrainReport> {
    if opts.rank == 0 || opts.accum == 0 || opts.epochs == 0 {
        bail!("--rank, --accum and --epochs must be at least 1");
    }
    let file = ModelFile::open(&opts.model).with_context(|| format!("opening base model {}", opts.model.display()))?;
    let base_sha256 = file.sha256_hex().to_string();
    let tape = TapeBackend::for_lora(opts.threads)?;
    let mut model = SamModel::load(&tape, file.store(), file.config())?;
    let shapes = model.linear_shapes();
    let layers: Vec<LinearShape> = adapter::select_targets(&shapes, &opts.targets).into_iter().cloned().collect();
    if layers.is_empty() {
        bail!("targets {:?} match none of the model's {} linear layers (e.g. {})", opts.targets, shapes.len(), shapes.first().map_or("", |l| l.name.as_str()));
    }
    attach_lora(&tape, &mut model, &init_factors(&layers, opts.rank, opts.seed), opts.rank, opts.alpha)?;

    let trainable: usize = tape.parameters().iter().map(|p| p.numel()).sum();
    let store = file.store();
    let base: usize = store.names().iter().map(|n| store.get(n).map(|t| t.numel())).sum::<minisam_models::Result<usize>>()?;
    let share = trainable as f64 / base.max(1) as f64;
    writeln!(log, "LoRA rank {} alpha {} on {} layers: {trainable} trainable parameters ({:.2}% of the base's {base})", opts.rank, opts.alpha, layers.len(), 100.0 * share)?;
    if trainable > MAX_TRAINABLE || share > MAX_TRAINABLE_SHARE {
        bail!("{trainable} trainable parameters exceed the budget ({MAX_TRAINABLE} and {:.0}% of the base): lower --rank or narrow --target", 100.0 * MAX_TRAINABLE_SHARE);
    }

    let examples = data::collect(&opts.data)?;
    let (train, val) = data::split(examples, opts.val_fraction, opts.seed);
    if train.is_empty() {
        bail!("no training example left after holding out the validation split");
    }
    // A frozen image encoder (no adapted layer in it) gives the same embedding for the same
    // image every epoch: encode each distinct image once. Augmentations that change the encoder's
    // input are then limited to a left-right mirror, so each image has at most two embeddings.
    let encoder_frozen = layers.iter().all(|l| !l.name.starts_with(ENCODER_PREFIX));
    let augment_options = opts.effective_augment_for(encoder_frozen);
    let frozen = if encoder_frozen {
        writeln!(log, "image encoder frozen: each image encoded once (cache {}); vertical flips and intensity changes off", opts.embedding_cache.as_ref().map_or("in memory".to_string(), |d| d.display().to_string()))?;
        let cache = match &opts.embedding_cache {
            Some(dir) => EmbeddingCache::open(dir, &base_sha256, "")?,
            None => EmbeddingCache::in_memory(&base_sha256, ""),
        };
        let model = FrozenModel::load(&file, &opts.backend, opts.threads)?;
        writeln!(log, "frozen encoder on {}", model.describe())?;
        Some(FrozenEncoder { model, cache })
    } else {
        None
    };
    let train_sha256 = data::training_set_sha256(&train)?;
    writeln!(log, "{} training and {} validation targets; training set sha256 {}", train.len(), val.len(), &train_sha256[..16])?;

    let fingerprint = opts.fingerprint(&base_sha256, &train_sha256);
    let mut state = match (&opts.checkpoint, opts.resume) {
        (Some(path), true) if path.exists() => {
            let s = TrainState::load(path, &fingerprint)?;
            restore(&tape, &s.params)?;
            writeln!(log, "resumed from {} at step {} (epoch {})", path.display(), s.step, s.epoch)?;
            s
        }
        _ => TrainState {
            fingerprint,
            step: 0,
            epoch: 0,
            best_val_dice: None,
            evals_since_best: 0,
            params: Vec::new(),
            best_params: None,
            optimizer: AdamW::new(opts.lr, opts.weight_decay),
        },
    };

    let steps_per_epoch = train.len().div_ceil(opts.accum);
    let total_steps = opts.max_steps.unwrap_or(usize::MAX).min(steps_per_epoch * opts.epochs);
    let mut step_times = Vec::new();
    let mut progress = Progress::new(mode, "train", total_steps as u64, Duration::ZERO).without_timing();
    'epochs: while state.epoch < opts.epochs && state.step < total_steps {
        let mut order: Vec<usize> = (0..train.len()).collect();
        Rng::new(opts.seed, 0xe90c + state.epoch as u64).shuffle(&mut order);
        // A resumed run skips the updates of this epoch already done.
        let done_in_epoch = state.step - state.epoch * steps_per_epoch;
        for (chunk_index, chunk) in order.chunks(opts.accum).enumerate().skip(done_in_epoch) {
            let t0 = Instant::now();
            tape.zero_grads();
            let mut loss_sum = 0.0;
            for (k, &i) in chunk.iter().enumerate() {
                let e = &train[i];
                let (image, mask, _) = load_example(e)?;
                let mut rng = Rng::new(opts.seed, ((state.epoch * steps_per_epoch + chunk_index) * opts.accum + k) as u64 + 1);
                let ex = augment(&image, &mask, e.tight, augment_options, &mut rng);
                tape.reset();
                let (logits, geometry) = forward(&model, &tape, frozen.as_ref(), &ex.image, ex.prompt)?;
                let plane = tape.to_host(&logits)?;
                let side = (plane.len() as f64).sqrt() as usize;
                let region = geometry.low_res_region(side);
                let target = loss::target_low_res(&ex.mask, image.height, image.width, region, side);
                let (l, mut grad) = loss::bce_dice(&plane, &target, side, region);
                grad.iter_mut().for_each(|g| *g /= chunk.len() as f32);
                tape.backward(&logits, &grad)?;
                tape.reset();
                loss_sum += l;
            }
            state.optimizer.step(&tape, opts.lr);
            state.step += 1;
            let dt = t0.elapsed().as_secs_f64();
            step_times.push(dt);
            let mean = step_times.iter().sum::<f64>() / step_times.len() as f64;
            let val = state.best_val_dice.map_or("-".into(), |d| format!("{d:.4}"));
            let line = format!(
                "step {}/{total_steps} epoch {} loss {:.4} best val Dice {val} {:.1} s/step ETA {}",
                state.step,
                state.epoch + 1,
                loss_sum / chunk.len() as f64,
                dt,
                fmt_duration(mean * (total_steps - state.step) as f64)
            );
            progress.step(log, state.step as u64, &line)?;
            if let Some(path) = &opts.checkpoint {
                state.params = snapshot(&tape)?;
                state.save(path)?;
            }
            if state.step >= total_steps {
                break;
            }
        }
        let finished_epoch = state.step >= (state.epoch + 1) * steps_per_epoch;
        if finished_epoch {
            state.epoch += 1;
        }
        // Validate after every epoch, and once when a step budget ends one early.
        if !val.is_empty() && (finished_epoch || state.step >= total_steps) {
            let d = validate(&model, &tape, frozen.as_ref(), &val)?;
            if state.best_val_dice.is_none_or(|b| d > b) {
                state.best_val_dice = Some(d);
                state.best_params = Some(snapshot(&tape)?);
                state.evals_since_best = 0;
            } else {
                state.evals_since_best += 1;
            }
            progress.println(log, &format!("epoch {}: val Dice {d:.4} (best {:.4})", state.epoch, state.best_val_dice.unwrap_or(d)))?;
            if let Some(path) = &opts.checkpoint {
                state.params = snapshot(&tape)?;
                state.save(path)?;
            }
            if state.evals_since_best >= opts.patience {
                progress.println(log, &format!("early stop: no improvement for {} epochs", opts.patience))?;
                break 'epochs;
            }
        }
    }

    if let Some(best) = &state.best_params {
        restore(&tape, best)?;
    }
    let factors = export_lora(&tape, &layers)?;
    let meta = AdapterMeta {
        name: opts.name.clone(),
        modality: opts.modality.clone(),
        base_model_sha256: base_sha256,
        rank: opts.rank as u32,
        alpha: opts.alpha,
        targets: opts.targets.clone(),
        training_set_sha256: train_sha256,
        created: adapter::rfc3339_utc_now(),
        val_dice: state.best_val_dice.map(|d| d as f32),
        trainer_version: concat!("minisam ", env!("CARGO_PKG_VERSION")).into(),
    };
    let out = std::fs::File::create(&opts.output).with_context(|| format!("creating {}", opts.output.display()))?;
    let written = adapter::write_adapter(std::io::BufWriter::new(out), &meta, &factors)?;
    let mean_step_s = if step_times.is_empty() { 0.0 } else { step_times.iter().sum::<f64>() / step_times.len() as f64 };
    Ok(TrainReport { trainable, base, steps: state.step, mean_step_s, val_dice: state.best_val_dice, adapter_sha256: written.sha256_hex().to_string() })
}
