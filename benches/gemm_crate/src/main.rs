//! `minisam_kernels::gemm::linear` (f32 weight, no bias, no activation) against `gemm::gemm` on
//! the same operands, alternated nine times per shape, medians; prints a markdown table with
//! the SIMD level our kernels dispatched to and the largest difference between the two results.

use std::time::Instant;

use minisam_kernels::{gemm::linear, simd, Activation, MatrixRef};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("rayon pool");
    // TinyViT (LiteMedSAM/MobileSAM) stage 2-3 linears, and ViT-B's MLP at 1024 tokens.
    let shapes = [(4096usize, 160usize, 480usize), (4096, 640, 160), (16384, 128, 512), (4096, 320, 1280), (4096, 1280, 320), (1024, 768, 3072)];
    println!("{threads} threads; ours at SIMD level {:?}; gemm 0.19 with feature x86-v4", simd::active());
    println!("| m x k x n | ours GFLOP/s | gemm GFLOP/s | ours / gemm time | max abs diff |");
    println!("|---|---|---|---|---|");
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let (mut ours_out, mut gemm_out) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..9 {
            let t = Instant::now();
            linear(&x, m, k, MatrixRef::F32(&w), n, None, Activation::None, &mut ours_out);
            ours.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            // out[m, n] = x[m, k] · wᵀ with w stored [n, k]: the right-hand operand's element
            // (p, j) is w[j * k + p], so its column stride is k and its row stride 1.
            // SAFETY: every pointer covers the extent its strides and m, n, k describe.
            unsafe {
                gemm::gemm(m, n, k, gemm_out.as_mut_ptr(), 1, n as isize, false, x.as_ptr(), 1, k as isize, w.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads));
            }
            theirs.push(t.elapsed().as_secs_f64());
        }
        let max_diff = ours_out.iter().zip(&gemm_out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let (o, t) = (median(ours), median(theirs));
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!("| {m}x{k}x{n} | {:.0} | {:.0} | {:.2} | {max_diff:.1e} |", gflop / o, gflop / t, o / t);
    }
}
