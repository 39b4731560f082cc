//! What every check shares: the random source, launch helpers in the backend's geometry, NaN
//! poisoning with guard elements, and the comparison with a per-element error bound.

use minisam_gpusim::{kernel, Arg, Dim3, Kernel, LaunchOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Fresh shapes every run, reproducible: the seed is printed, and GPU_SIM_SEED replays it.
pub fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("GPU_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: GPU_SIM_SEED={seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Which build of the kernels a check runs and how: the default build, or a mutant with one
/// barrier skipped or fragments swapped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sim {
    pub variant: &'static str,
    pub options: LaunchOptions,
}

impl Sim {
    pub fn with_variant(variant: &'static str) -> Self {
        Sim {
            variant,
            options: LaunchOptions::default(),
        }
    }
    /// The same with the scheduler's priorities drawn from `seed` (the checks draw it from their
    /// generator, so every run also tries fresh schedules).
    pub fn seeded(mut self, seed: u64) -> Self {
        self.options.seed = seed;
        self
    }
    pub fn kernel(&self, name: &str) -> Kernel {
        kernel(self.variant, name).unwrap_or_else(|e| panic!("{e}"))
    }
    /// Launches `name`; a launch error (deadlock, bad collective, ...) is a check failure.
    pub fn launch(
        &self,
        name: &str,
        grid: Dim3,
        block: Dim3,
        args: &[Arg<'_>],
    ) -> Result<(), String> {
        // SAFETY: every check passes buffers sized for the launch it makes (with guard elements
        // behind each output to catch strays).
        unsafe { self.kernel(name).launch(grid, block, args, &self.options) }
            .map_err(|e| format!("launch failed: {e}"))
    }
    /// The backend's 1-D grid-stride geometry (`grid_for` in models/src/cuda/device.rs).
    pub fn grid_for(n: usize) -> (Dim3, Dim3) {
        (
            Dim3(n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            Dim3(256, 1, 1),
        )
    }
}

/// Elements behind every output buffer that no kernel may touch.
pub const GUARD: usize = 37;
/// The guard and fresh-output pattern: a NaN (so an unwritten element fails any comparison) with
/// a payload no arithmetic produces, so a stray write into the guard is told apart.
pub const POISON: u32 = 0x7fc0_dead;

/// An output buffer of `n` poisoned elements plus the guard.
pub fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::from_bits(POISON); n + GUARD]
}

/// Compares `got` (with its guard) against `want` element by element: |got - want| <= bound[i]
/// (NaN only where want is NaN), and the guard untouched.
pub fn compare(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> Result<(), String> {
    let n = want.len();
    assert_eq!(got.len(), n + GUARD, "{what}: output buffer size");
    if let Some(i) = got[n..].iter().position(|v| v.to_bits() != POISON) {
        return Err(format!(
            "{what}: element {} past the end ({} elements) was written",
            n + i,
            n
        ));
    }
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0;
    for i in 0..n {
        let (g, w) = (got[i] as f64, want[i]);
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g - w).abs() <= bound[i]
        };
        if !ok {
            bad += 1;
            let excess = if g.is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs() / bound[i].max(f64::MIN_POSITIVE)
            };
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{what}: {bad} of {n} elements outside their bound; worst at {i}: got {} want {} (bound {:.3e}){}",
            got[i],
            want[i],
            bound[i],
            if got[i].to_bits() == POISON { " — never written" } else { "" }
        )),
    }
}

/// Bit-exact comparison (layout kernels, and those that promise the CPU's bits).
pub fn compare_exact(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    compare(what, got, &want64, &vec![0.0; want.len()])
}

/// f32 unit roundoff.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Rounds to bf16 as `cvt.rn.bf16x2.f32` does (nearest even), back in f32.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Rounds to fp16 as `cvt.rn.satfinite.f16x2.f32` does (nearest even, clamped to ±65504).
pub fn round_f16_satfinite(x: f32) -> f32 {
    half::f16::from_f32(x.clamp(-65504.0, 65504.0)).to_f32()
}

pub fn pick<T: Copy>(rng: &mut ChaCha8Rng, options: &[T]) -> T {
    options[rng.gen_range(0..options.len())]
}
