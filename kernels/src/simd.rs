//! Which SIMD instruction set the kernels run with, chosen once per process at run time.
//!
//! The crate is compiled for the baseline target (x86-64 without AVX, or aarch64 with NEON), so
//! wider builds of the hot loops are selected here from what the CPU reports. `MINISAM_SIMD`
//! (`avx512`, `avx2`, `neon`, `portable`) lowers the choice, so a bench or test can compare levels
//! in one run on one machine; it never raises it above what the CPU has.

use std::sync::OnceLock;

/// An instruction-set level the kernels have a build for, widest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust the compiler vectorises for the baseline target.
    Portable,
    /// aarch64 Advanced SIMD (always present on aarch64).
    Neon,
    /// x86-64 AVX2 with FMA3.
    Avx2Fma,
    /// x86-64 AVX-512 Foundation (plus AVX2/FMA, which every AVX-512 CPU has).
    Avx512,
}

impl Isa {
    /// The name `MINISAM_SIMD` takes and benches print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512f",
        }
    }

    fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(Isa::Portable),
            "neon" => Some(Isa::Neon),
            "avx2" | "avx2+fma" | "fma" => Some(Isa::Avx2Fma),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// Every level this CPU can run, narrowest first (always starts with `Portable`).
pub fn supported() -> Vec<Isa> {
    let mut levels = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            levels.push(Isa::Avx2Fma);
            if std::is_x86_feature_detected!("avx512f") {
                levels.push(Isa::Avx512);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            levels.push(Isa::Neon);
        }
    }
    levels
}

/// The level the kernels use: the widest the CPU has, lowered by `MINISAM_SIMD` if set.
pub fn active() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = *supported().last().expect("portable is always supported");
        match std::env::var("MINISAM_SIMD").ok().and_then(|v| Isa::parse(&v)) {
            Some(wanted) if supported().contains(&wanted) => wanted,
            // Asked for a level this CPU lacks: the widest one below it.
            Some(wanted) => supported().into_iter().rfind(|&l| l <= wanted && l != Isa::Neon).unwrap_or(Isa::Portable),
            None => best,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_active_is_supported() {
        for isa in [Isa::Portable, Isa::Neon, Isa::Avx2Fma, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert!(supported().contains(&active()));
    }

    /// Every aarch64 CPU has Advanced SIMD, so there the NEON kernels are what the tests check.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_supports_neon() {
        assert!(supported().contains(&Isa::Neon));
    }
}
