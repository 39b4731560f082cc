//! Encodes (and optionally decodes) one synthetic frame in a loop with a packed model, and
//! nothing else: the workload to put under `perf record` when profiling the CPU backend, without
//! the loading, packing and checkpoint parsing that `cpu_latency` also does.
//!
//! ```text
//! cargo build --release -p minisam-models --example encode_loop
//! perf record -g target/release/examples/encode_loop models/litemedsam-nf4.msam 20 2 [decodes]
//! ```

use std::time::Instant;

use minisam_models::cpu::CpuBackend;
use minisam_models::image::RgbImage;
use minisam_models::load::ModelFile;
use minisam_models::prompt::{BoxPrompt, Prompts};
use minisam_models::sam::Segmenter;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().map_or("models/litemedsam-nf4.msam", String::as_str);
    let encodes: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(20);
    let threads: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    let decodes: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(0);
    let file = ModelFile::open(std::path::Path::new(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let segmenter = Segmenter::load(CpuBackend::new(threads).expect("thread pool"), file.store(), file.config()).expect("model loads");
    let (w, h) = (800, 540);
    let grey: Vec<u8> = (0..w * h).map(|i| ((i % w) * 7 + (i / w) * 3) as u8).collect();
    let image = RgbImage::from_grey(w, h, &grey).expect("valid frame");
    let mut emb = segmenter.encode(&image).expect("encode");
    let mut times = Vec::new();
    let fresh_after_first = segmenter.backend().fresh_allocations();
    for _ in 0..encodes {
        let t = Instant::now();
        emb = segmenter.encode(&image).expect("encode");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Buffers the pool had to allocate after the first frame (0 in the steady state).
    let fresh = segmenter.backend().fresh_allocations() - fresh_after_first;
    let prompts = Prompts::with_box(BoxPrompt { x0: 300.0, y0: 200.0, x1: 500.0, y1: 400.0 });
    let mut dtimes = Vec::new();
    for _ in 0..decodes {
        let t = Instant::now();
        segmenter.decode(&emb, &prompts, false).expect("decode");
        dtimes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!("encode median {:.1} ms over {encodes}, decode median {:.1} ms over {decodes}; pool allocations after the first frame: {fresh}", median(times), median(dtimes));
}
