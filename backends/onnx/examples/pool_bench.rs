//! Milliseconds of the CPU max-pool on ResNet-50's stem output (3×3, stride 2, pad 1):
//! `pool_bench [reps] [threads] [batch]`.
use std::time::Instant;

fn main() {
    kiln_onnx::allocator::tune();
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let batch: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let p = kiln_onnx::cpu_kernels::Pool2d {
        planes: batch * 64,
        hw: [112, 112],
        kernel: [3, 3],
        stride: [2, 2],
        pads: [1, 1, 1, 1],
    };
    let x: Vec<f32> = (0..batch * 64 * 112 * 112)
        .map(|i| (i % 13) as f32 * 0.1)
        .collect();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            let out = pool.install(|| p.max(&x));
            std::hint::black_box(out);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    println!(
        "max-pool 3x3 s2 [{batch}, 64, 112, 112]: {:.3} ms",
        t[t.len() / 2]
    );
}
