//! Throughput of the CPU GELU over a BERT-sized tensor: `gelu_bench`.
use std::time::Instant;
fn main() {
    let x: Vec<f32> = (0..8 * 128 * 1536)
        .map(|i| (i % 1000) as f32 / 100.0 - 5.0)
        .collect();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut t = Vec::new();
        for _ in 0..10 {
            let s = Instant::now();
            let y = pool.install(|| kiln_onnx::cpu_kernels::gelu(&x));
            t.push(s.elapsed().as_secs_f64());
            std::hint::black_box(y);
        }
        t.sort_by(f64::total_cmp);
        let mut c = Vec::new();
        for _ in 0..10 {
            let s = Instant::now();
            let y = x.to_vec();
            c.push(s.elapsed().as_secs_f64());
            std::hint::black_box(y);
        }
        c.sort_by(f64::total_cmp);
        println!("copy alone {:.2} ms", c[5] * 1e3);
        println!(
            "threads {threads}: {:.2} ms, {:.2} ns/elem",
            t[5] * 1e3,
            t[5] * 1e9 / x.len() as f64
        );
    }
}
// copy-only reference
#[allow(dead_code)]
fn copy_only() {}
