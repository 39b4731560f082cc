//! Runs every committed seed and crash regression through its harness, uninstrumented: CI
//! exercises the same code the fuzzer runs, and a crash once found stays fixed.

use std::path::Path;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<_> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

#[test]
fn every_seed_and_regression_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for &(name, harness) in minisam_fuzz::TARGETS {
        let seeds = files(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "{name}: no seeds under corpus/{name} (cargo run --example gen_seeds)");
        let regressions = files(&root.join("regressions").join(name));
        for p in seeds.iter().chain(&regressions) {
            let bytes = std::fs::read(p).unwrap();
            // A panic here names the input: reproduce it with the fuzz binary (README.md).
            eprintln!("{name}: {}", p.display());
            harness(&bytes);
        }
        eprintln!("{name}: {} seeds, {} regressions", seeds.len(), regressions.len());
    }
}
