//! Mutation checks: the simulator must turn a broken kernel into a failing check. Each barrier
//! site of a mutant build is skipped in turn, and the mma fragments are swapped; the checks that
//! pass on the intact kernel must then fail.

use minisam_gpusim::{kernels, LaunchOptions};

use crate::common::*;

/// The source lines of the barrier sites of `module`'s mutant build.
pub fn barrier_sites(module: &str) -> Vec<u32> {
    kernels()
        .into_iter()
        .find(|k| k.module == module && k.variant == "mutant")
        .unwrap_or_else(|| panic!("no mutant build of {module}.cu"))
        .barrier_site_lines
        .to_vec()
}

/// Runs `suite` once intact (must pass) and once per barrier site with that barrier skipped
/// (must fail); panics naming any barrier whose removal went unnoticed.
pub fn every_barrier_is_needed(module: &str, suite: impl Fn(&Sim) -> Result<(), String>) {
    let intact = Sim::with_variant("mutant");
    suite(&intact).unwrap_or_else(|e| panic!("the intact mutant build of {module}.cu fails: {e}"));
    let sites = barrier_sites(module);
    assert!(!sites.is_empty(), "{module}.cu has no barrier sites");
    let mut unnoticed = Vec::new();
    for (site, line) in sites.iter().enumerate() {
        let sim = Sim {
            variant: "mutant",
            options: LaunchOptions {
                skip_barrier_site: Some(site as u32),
                ..Default::default()
            },
        };
        match suite(&sim) {
            Ok(()) => unnoticed.push(format!("{module}.cu:{line}")),
            Err(e) => eprintln!("without the barrier at {module}.cu:{line}: {e}"),
        }
    }
    assert!(
        unnoticed.is_empty(),
        "removing these barriers went unnoticed: {unnoticed:?}"
    );
}
