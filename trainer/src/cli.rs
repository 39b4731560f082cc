//! The command line: subcommands and strict parsing of prompt arguments. A malformed `--box`
//! (wrong arity, NaN, inverted corners) is refused here with the expected syntax, before any
//! model is loaded.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use minisam_models::cuda::{parse_bytes, BackendChoice};
use minisam_models::prompt::{BoxPrompt, Point, PointLabel};

use crate::eval::protocol::PromptKind;
use crate::eval::split::Split;

#[derive(Debug, Parser)]
#[command(
    name = "minisam",
    version,
    about = "QLoRA-MiniSAM offline tools: pack, inspect, segment, eval, onnx-check"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Quantise a checkpoint (.pth/.pt/.safetensors, or ONNX exports) into a packed NF4 model file.
    Pack(PackArgs),
    /// Print a packed model's header, config, provenance and tensor table.
    Inspect(InspectArgs),
    /// Segment one image from box and/or point prompts and write the mask PNG.
    Segment(SegmentArgs),
    /// Write an image (PNG, JPEG, TIFF, BMP, DICOM) as the RGB PNG the engine sees: after
    /// decoding, LUTs and windowing. For checking a window, or feeding minisamctl.
    Convert(ConvertArgs),
    /// Run the box-prompt evaluation protocol on a data tree and write per-target Dice.
    Eval(EvalArgs),
    /// Train a LoRA adapter against a packed base model on a data tree; writes the adapter file.
    Train(TrainArgs),
    /// Train a small ViT image encoder to reproduce a packed model's embeddings; writes a packed model.
    Distill(DistillArgs),
    /// Run ONNX exports with tract and the weights mapped from them with our engine; compare.
    OnnxCheck(OnnxCheckArgs),
    /// Compile every CUDA kernel with NVRTC for the given architectures (no GPU needed).
    CudaCompile(CudaCompileArgs),
    /// Check the CUDA backend against the CPU reference, kernel by kernel and end to end.
    CudaCheck(CudaCheckArgs),
    /// Time encode / decode / end-to-end on the GPU and report peak VRAM.
    CudaBench(CudaBenchArgs),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input image.
    pub input: PathBuf,
    /// Output PNG (8-bit RGB).
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub dicom: DicomArgs,
}

/// How a DICOM file or a NIfTI volume becomes the engine's image.
#[derive(Debug, Clone, Args)]
pub struct DicomArgs {
    /// Frame of a multi-frame DICOM file, or volume of a 4D NIfTI file; 0 = the first.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub frame: u32,
    /// Grey-level window for DICOM and NIfTI: CENTRE,WIDTH after the rescale (e.g. 40,400 in
    /// HU) or a preset: abdomen, lung, brain, bone, mediastinum, liver. Default: a DICOM file's
    /// own window for CT and MR, else min-max (uint8 volumes as stored).
    #[arg(long, value_name = "C,W|PRESET")]
    pub window: Option<crate::dicom::Window>,
    /// Slice of a NIfTI volume: AXIS[:INDEX], AXIS = x, y, z (world directions from the
    /// header's sform/qform) or 0, 1, 2 (stored axes), INDEX as stored; default z, middle slice.
    #[arg(long, value_name = "AXIS[:INDEX]")]
    pub slice: Option<crate::nifti_io::SliceSpec>,
}

impl DicomArgs {
    pub fn options(&self) -> crate::image_io::ReadOptions {
        crate::image_io::ReadOptions { frame: self.frame, window: self.window, slice: self.slice }
    }
}

/// How the volumes of a NIfTI data tree (MSD or KiTS layout) become 2D examples.
#[derive(Debug, Clone, Copy, Args)]
pub struct VolumeArgs {
    /// Axis the volumes are sliced along: x, y, z (world directions) or 0, 1, 2 (stored axes).
    #[arg(long, value_name = "AXIS", default_value = "z")]
    pub axis: crate::nifti_io::Axis,
    /// Grey-level window for the volumes' slices: CENTRE,WIDTH or a preset (see `segment`);
    /// default: min-max per slice (uint8 volumes as stored).
    #[arg(long, value_name = "C,W|PRESET")]
    pub window: Option<crate::dicom::Window>,
}

impl VolumeArgs {
    pub fn slicing(&self) -> crate::eval::volume_sets::Slicing {
        crate::eval::volume_sets::Slicing { axis: self.axis, window: self.window }
    }
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// Source checkpoint, or ONNX exports (encoder and decoder, in one file or two).
    #[arg(required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Output packed model file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Keep tensors whose whole name matches the glob PATTERN (`*` = any run of characters,
    /// e.g. `mask_decoder.*`) in fp16 instead of NF4 (repeatable).
    #[arg(long = "keep-fp16", value_name = "PATTERN")]
    pub keep_fp16: Vec<String>,
    /// Quantise every eligible tensor, dropping the architecture's default fp16 list (TinyViT
    /// encoders and the decoder's attention stay fp16 by default: see
    /// `format::default_keep_fp16`). For size/accuracy studies.
    #[arg(long = "all-nf4")]
    pub all_nf4: bool,
}

#[derive(Debug, Args)]
pub struct OnnxCheckArgs {
    /// ONNX exports: encoder and decoder (one file or two; see README).
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Image to feed (PNG/DICOM), preprocessed as the model's family does; default: a
    /// deterministic synthetic input.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Box prompt in the image's pixels (required with --image; default: over the middle).
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub prompt: Option<BoxPrompt>,
    /// Fail when a relative error exceeds this.
    #[arg(long, default_value_t = 1e-3)]
    pub max_rel_err: f64,
    #[command(flatten)]
    pub threads: Threads,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model (packed .msam); the adapter is bound to its SHA-256.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// With a frozen image encoder (no target under `image_encoder.`), keep each image's
    /// embedding in DIR so later runs (and `eval --embedding-cache`) skip the encoder.
    #[arg(long, value_name = "DIR")]
    pub embedding_cache: Option<PathBuf>,
    /// Output adapter file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Adapter name for the manifest (`us-hc18-r8`).
    #[arg(long)]
    pub name: String,
    /// Imaging modality for the manifest (`US`, `CT`, `MR`).
    #[arg(long)]
    pub modality: String,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (update scale alpha/rank); default 2 x rank.
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Glob over linear-layer names to adapt (repeatable; default: `*.attn.qkv`, `*.attn.proj`).
    #[arg(long = "target", value_name = "GLOB")]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long = "weight-decay", default_value_t = 0.01)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Examples whose gradients are accumulated per update.
    #[arg(long, default_value_t = 4)]
    pub accum: usize,
    /// Stop after this many updates (trial runs).
    #[arg(long = "max-steps")]
    pub max_steps: Option<usize>,
    /// Share of the images held out for validation.
    #[arg(long = "val-fraction", default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Epochs without a better validation Dice before stopping.
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest move of each box side, as a fraction of the box size.
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    #[arg(long = "no-flips")]
    pub no_flips: bool,
    #[arg(long = "no-intensity")]
    pub no_intensity: bool,
    /// Training state file, rewritten after every update.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from --checkpoint if it exists.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
    #[command(flatten)]
    pub threads: Threads,
    /// Where a frozen image encoder runs (decoder-only targets); the adapter trains on the CPU.
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Teacher: a packed model (its image encoder is what the student learns to reproduce).
    #[arg(long)]
    pub teacher: PathBuf,
    /// The images (their masks are not used).
    #[command(flatten)]
    pub data: DataArgs,
    /// Student width (channels per token).
    #[arg(long, default_value_t = 64)]
    pub student_dim: usize,
    /// Student blocks (the last one attends globally, the others in windows).
    #[arg(long, default_value_t = 4)]
    pub student_depth: usize,
    #[arg(long, default_value_t = 2)]
    pub student_heads: usize,
    /// Side of the student's attention windows, in grid cells.
    #[arg(long, default_value_t = 8)]
    pub student_window: usize,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Stop after this many steps (trial runs).
    #[arg(long = "max-steps")]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long = "weight-decay", default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Weight of a mask term added to the embedding MSE: the binary KL of the student's masks
    /// from the teacher's, both through the teacher's frozen decoder with the same random boxes.
    /// 0 (the default) leaves it out.
    #[arg(long = "mask-kl", value_name = "WEIGHT", default_value_t = 0.0)]
    pub mask_kl: f64,
    /// Random boxes per image for the mask term.
    #[arg(long = "mask-kl-boxes", default_value_t = 2)]
    pub mask_kl_boxes: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Teacher embeddings kept in DIR (the teacher then runs once per image across runs).
    #[arg(long, value_name = "DIR")]
    pub embedding_cache: Option<PathBuf>,
    /// Output packed model: the student encoder with the teacher's prompt encoder and decoder.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the loss of every step here (`step,epoch,loss,embedding_mse,mask_kl`).
    #[arg(long, value_name = "FILE")]
    pub loss_csv: Option<PathBuf>,
    #[command(flatten)]
    pub threads: Threads,
    /// Where the teacher runs; the student trains on the CPU.
    #[command(flatten)]
    pub backend: BackendArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Packed model file.
    pub file: PathBuf,
    /// Print one JSON object on stdout instead of the text (keys in the README).
    #[arg(long)]
    pub json: bool,
    /// Run one frame through a counting backend and print its FLOPs and bytes (encoder,
    /// decoder), the CPU's achieved rate, and with --peak-tflops/--peak-gbs the roofline floor.
    #[arg(long, conflicts_with = "json")]
    pub cost: bool,
    /// A machine's peak tensor throughput for the roofline floor, e.g. 989 (H200 bf16 dense).
    #[arg(long, requires = "cost", requires = "peak_gbs")]
    pub peak_tflops: Option<f64>,
    /// The same machine's peak memory bandwidth in GB/s, e.g. 4800 (H200 HBM3e).
    #[arg(long, requires = "cost", requires = "peak_tflops")]
    pub peak_gbs: Option<f64>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("prompt").required(true).multiple(true).args(["boxes", "points"])))]
pub struct SegmentArgs {
    /// Input image: PNG, JPEG, TIFF, BMP or DICOM (see the README for transfer syntaxes).
    pub image: PathBuf,
    #[command(flatten)]
    pub dicom: DicomArgs,
    /// Box prompt in pixels, inclusive corners: x0,y0,x1,y1.
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub boxes: Vec<BoxPrompt>,
    /// Point prompt in pixels: x,y[,label] with label 1 = foreground (default), 0 = background.
    #[arg(long = "point", value_name = "X,Y[,LABEL]", value_parser = parse_point)]
    pub points: Vec<Point>,
    /// Model file (packed or checkpoint); default: $MINISAM_MODEL, then models/litemedsam-nf4.msam.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// LoRA adapter file.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output mask PNG (8-bit grey, 0/255).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the mask as 0/1 instead of 0/255 (the reference's golden mask files).
    #[arg(long = "mask-01")]
    pub mask_01: bool,
    /// Also write an RGB PNG of the image as the engine saw it with the mask filled and outlined
    /// and the prompts drawn (box; positive points green, negative red).
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,
    /// Ask the decoder for 3 masks and keep the one with the best predicted IoU.
    #[arg(long)]
    pub multimask: bool,
    #[command(flatten)]
    pub threads: Threads,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print peak resident memory at the end.
    #[arg(long)]
    pub stats: bool,
    /// Print one JSON object on stdout instead of the text lines (keys in the README).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file (packed or checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// Data tree: <data>/<set>/{images,masks}/*.png, or NIfTI volume pairs laid out as MSD
    /// (imagesTr/, labelsTr/) or KiTS (case_*/{imaging,segmentation}.nii.gz).
    #[arg(long)]
    pub data: PathBuf,
    /// LoRA adapter file.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Box prompt of each target.
    #[arg(long, value_enum, default_value_t = PromptKind::Box)]
    pub prompt: PromptKind,
    /// Jittered boxes (default: <data>/../reference/boxes-jitter.json when it exists).
    #[arg(long, value_name = "FILE")]
    pub jitter_boxes: Option<PathBuf>,
    /// Per-target CSV output.
    #[arg(long, default_value = "results.csv")]
    pub out: PathBuf,
    #[command(flatten)]
    pub threads: Threads,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Only the first N images of each set (quick runs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Keep image embeddings in DIR and reuse them (when no adapter changes the image encoder,
    /// zero-shot and adapter runs share them); values are stored exactly, so scores do not change.
    #[arg(long, value_name = "DIR")]
    pub embedding_cache: Option<PathBuf>,
    #[command(flatten)]
    pub volumes: VolumeArgs,
    /// Print the summary as one JSON object on stdout instead of the table (keys in the README);
    /// the per-target CSV is written either way.
    #[arg(long)]
    pub json: bool,
    /// Write an HTML report to DIR/index.html: Dice tables per set and label, a Dice histogram
    /// per set, overlays of each set's 5 worst targets. Self-contained (no network).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// The images of a data tree a training command reads (`selection::Selection`).
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// Data tree `<root>/<set>/{images,masks}` (the evaluation protocol's layout), or NIfTI
    /// volume pairs laid out as MSD or KiTS (see `eval --help`).
    #[arg(long)]
    pub data: PathBuf,
    /// These sets only (repeatable; default: every set under --data).
    #[arg(long = "set", value_name = "NAME")]
    pub sets: Vec<String>,
    /// First N images of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub split: SplitArgs,
    #[command(flatten)]
    pub volumes: VolumeArgs,
}

impl DataArgs {
    pub fn selection(&self) -> crate::selection::Selection {
        crate::selection::Selection {
            root: self.data.clone(),
            sets: self.sets.clone(),
            limit: self.limit,
            split: self.split.split,
            test_share: self.split.test_share,
            slicing: self.volumes.slicing(),
        }
    }
}

/// The train/test split of a data tree (by image name; see `eval::split`).
#[derive(Debug, Args, Clone, Copy)]
pub struct SplitArgs {
    /// Which images: all of them, or one side of the train/test split.
    #[arg(long, value_enum, default_value_t = Split::All)]
    pub split: Split,
    /// Share of each set's images in the test split.
    #[arg(long, default_value_t = crate::eval::split::DEFAULT_TEST_SHARE, value_parser = parse_share)]
    pub test_share: f64,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a share between 0 and 1"))
    }
}

#[derive(Debug, Args)]
pub struct Threads {
    /// Worker threads (default: all cores).
    #[arg(long = "threads", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

impl Threads {
    pub fn get(&self) -> usize {
        match self.threads {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Where the networks run: auto (the GPU when one works, else the CPU, saying why), cpu, or
    /// cuda (fail when no GPU works).
    #[arg(long, value_name = "auto|cpu|cuda", default_value = "auto")]
    pub backend: BackendChoice,
    /// VRAM the CUDA backend may take in all (weights + activation arena): bytes, or 1GiB, 512MiB.
    #[arg(long = "vram-budget", value_name = "BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub vram_budget: u64,
    /// Tensor-core operand precision of the CUDA GEMMs: bf16, f16, or f32 (CUDA cores only).
    #[arg(long = "cuda-precision", value_name = "bf16|f16|f32", default_value = "bf16")]
    pub cuda_precision: String,
}

#[derive(Debug, Args)]
pub struct CudaCompileArgs {
    /// Target architecture (repeatable): sm_87 (Jetson Orin), sm_90 (H100/H200), ...
    #[arg(long, value_name = "SM", required = true)]
    pub arch: Vec<String>,
    /// Tensor-core operand precision compiled for: bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    /// Skip the second, real-architecture compile that yields ptxas's register/spill report.
    #[arg(long = "no-report")]
    pub no_report: bool,
    /// Fail when a kernel has a stack frame or spills (local-memory traffic the design does not
    /// intend), except the kernels named by --known-local-memory.
    #[arg(long = "deny-local-memory")]
    pub deny_local_memory: bool,
    /// A kernel known to use local memory today (repeatable), reported but not failed. A listed
    /// kernel that has become clean fails the check too, so the list can only shrink.
    #[arg(long = "known-local-memory", value_name = "KERNEL")]
    pub known_local_memory: Vec<String>,
}

/// What `cuda-check` and `cuda-bench` both run on: models, input and GPU settings.
#[derive(Debug, Args)]
pub struct CudaRunArgs {
    /// Model to check or time (repeatable; packed or checkpoint).
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// Also run a random-weight SAM ViT-B at 1024, packed to NF4 on the fly.
    #[arg(long = "random-vit-b")]
    pub random_vit_b: bool,
    /// Input image (default: the bundled ultrasound sample).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Box prompt (default: the middle of the image).
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub r#box: Option<BoxPrompt>,
    /// bf16, f16 or f32 (the checks' tolerances follow).
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    #[arg(long = "vram-budget", value_name = "BYTES", default_value = "4GiB", value_parser = parse_bytes)]
    pub vram_budget: u64,
}

#[derive(Debug, Args)]
pub struct CudaCheckArgs {
    #[command(flatten)]
    pub run: CudaRunArgs,
    /// Seed of the kernel checks' random inputs (default: from the clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only the end-to-end checks.
    #[arg(long = "skip-kernels")]
    pub skip_kernels: bool,
    /// Fail instead of skipping when no GPU is usable.
    #[arg(long = "require-gpu")]
    pub require_gpu: bool,
}

#[derive(Debug, Args)]
pub struct CudaBenchArgs {
    #[command(flatten)]
    pub run: CudaRunArgs,
    /// Timed runs (median reported) after the warm-up runs.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The device's peak tensor throughput in TFLOP/s (e.g. 989 for an H200's bf16 dense), to
    /// print each encoder's share of it.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// After the timed runs, profile one frame (encoder + decoder, kernel by kernel) per model
    /// and print each kernel's launches, time, counted work and achieved rates as markdown.
    #[arg(long)]
    pub kernels: bool,
    /// The device's peak memory bandwidth in GB/s (e.g. 4800 for an H200's HBM3e), for the
    /// kernel table's share of it.
    #[arg(long, requires = "kernels")]
    pub peak_gbs: Option<f64>,
}

fn numbers(s: &str, what: &str, syntax: &str, arities: &[usize]) -> Result<Vec<f32>, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if !arities.contains(&parts.len()) {
        return Err(format!(
            "{what} {s:?} has {} values; expected {syntax}",
            parts.len()
        ));
    }
    parts
        .iter()
        .map(|p| match p.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(format!(
                "{what} {s:?}: {p:?} is not a finite number; expected {syntax}"
            )),
        })
        .collect()
}

/// `x0,y0,x1,y1`, finite, `x0 <= x1` and `y0 <= y1`.
pub fn parse_box(s: &str) -> Result<BoxPrompt, String> {
    let v = numbers(s, "box", "x0,y0,x1,y1 in pixels", &[4])?;
    if v[0] > v[2] || v[1] > v[3] {
        return Err(format!(
            "box {s:?}: need x0 <= x1 and y0 <= y1 (corners are top-left, bottom-right)"
        ));
    }
    Ok(BoxPrompt {
        x0: v[0],
        y0: v[1],
        x1: v[2],
        y1: v[3],
    })
}

/// `x,y` or `x,y,label` with label 1 (foreground) or 0 (background).
pub fn parse_point(s: &str) -> Result<Point, String> {
    let v = numbers(
        s,
        "point",
        "x,y or x,y,label (label 1 = foreground, 0 = background)",
        &[2, 3],
    )?;
    let label = match v.get(2).copied() {
        None => PointLabel::Foreground,
        Some(l) if l == 1.0 || l == 0.0 => {
            if l == 1.0 {
                PointLabel::Foreground
            } else {
                PointLabel::Background
            }
        }
        Some(l) => {
            return Err(format!(
                "point {s:?}: label {l} must be 1 (foreground) or 0 (background)"
            ))
        }
    };
    Ok(Point {
        x: v[0],
        y: v[1],
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn boxes_are_parsed_strictly() {
        assert_eq!(
            parse_box("1,2.5, 3,4").unwrap(),
            BoxPrompt {
                x0: 1.0,
                y0: 2.5,
                x1: 3.0,
                y1: 4.0
            }
        );
        for bad in [
            "1,2,3",
            "1,2,3,4,5",
            "1,2,NaN,4",
            "1,2,inf,4",
            "a,2,3,4",
            "5,2,3,4",
            "1,5,3,4",
            "",
            "1,,3,4",
        ] {
            assert!(parse_box(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn points_are_parsed_strictly() {
        assert_eq!(
            parse_point("3,4").unwrap(),
            Point {
                x: 3.0,
                y: 4.0,
                label: PointLabel::Foreground
            }
        );
        assert_eq!(parse_point("3,4,0").unwrap().label, PointLabel::Background);
        assert_eq!(parse_point("3,4,1").unwrap().label, PointLabel::Foreground);
        for bad in ["3", "3,4,2", "3,4,0.5", "nan,4", "1,2,3,4"] {
            assert!(parse_point(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn command_line_shapes() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "minisam",
            "segment",
            "a.png",
            "--box",
            "1,2,3,4",
            "--point",
            "5,6,0",
            "-o",
            "m.png",
            "--threads",
            "2",
        ])
        .unwrap();
        let Command::Segment(s) = c.command else {
            panic!("not segment")
        };
        assert_eq!((s.boxes.len(), s.points.len(), s.threads.get()), (1, 1, 2));
        assert!(
            Cli::try_parse_from(["minisam", "segment", "a.png", "-o", "m.png"]).is_err(),
            "a prompt is required"
        );
        assert!(Cli::try_parse_from([
            "minisam",
            "segment",
            "a.png",
            "--box",
            "1,2,nan,4",
            "-o",
            "m.png"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "minisam",
            "segment",
            "a.png",
            "--box",
            "1,2,3,4",
            "-o",
            "m.png",
            "--threads",
            "0"
        ])
        .is_err());
        let c = Cli::try_parse_from([
            "minisam",
            "eval",
            "--model",
            "m",
            "--data",
            "d",
            "--prompt",
            "box-jitter",
            "--limit",
            "3",
        ])
        .unwrap();
        let Command::Eval(e) = c.command else {
            panic!("not eval")
        };
        assert_eq!(
            (e.prompt, e.limit, e.out.to_str()),
            (PromptKind::BoxJitter, Some(3), Some("results.csv"))
        );
        assert!(Cli::try_parse_from([
            "minisam", "eval", "--model", "m", "--data", "d", "--limit", "0"
        ])
        .is_err());
        let c = Cli::try_parse_from([
            "minisam",
            "pack",
            "x.pth",
            "-o",
            "y.msam",
            "--keep-fp16",
            "a",
            "--keep-fp16",
            "b",
        ])
        .unwrap();
        let Command::Pack(p) = c.command else {
            panic!("not pack")
        };
        assert_eq!(p.keep_fp16, vec!["a", "b"]);
        let c = Cli::try_parse_from(["minisam", "pack", "enc.onnx", "dec.onnx", "-o", "y.msam"]).unwrap();
        let Command::Pack(p) = c.command else {
            panic!("not pack")
        };
        assert_eq!(p.inputs.len(), 2);
        assert!(Cli::try_parse_from(["minisam", "pack", "-o", "y.msam"]).is_err(), "an input is required");
        let c = Cli::try_parse_from(["minisam", "onnx-check", "a.onnx", "--box", "1,2,3,4", "--threads", "3"]).unwrap();
        let Command::OnnxCheck(o) = c.command else {
            panic!("not onnx-check")
        };
        assert_eq!((o.files.len(), o.threads.get(), o.max_rel_err), (1, 3, 1e-3));
    }
}
