//! Median time of the CPU GELU and softmax kernels on BERT-sized tensors:
//! `elementwise_bench [reps]` (threads from RAYON_NUM_THREADS).
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    // BERT's feed-forward activation at batch 8, sequence 128: [8, 128, 1536].
    let n = 8 * 128 * 1536;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 / 250.0 - 2.0).collect();
    let ms = time(reps, || {
        std::hint::black_box(kiln_onnx::cpu_kernels::gelu(&x));
    });
    println!(
        "gelu [8,128,1536]: {ms:.3} ms ({:.2} ns/element)",
        ms * 1e6 / n as f64
    );
    // Attention scores at batch 8, 12 heads, sequence 128, with a per-column mask.
    let (rows, width) = (8 * 12 * 128, 128);
    let scores: Vec<f32> = (0..rows * width).map(|i| (i % 97) as f32 / 10.0).collect();
    let mask = vec![0f32; 8 * width];
    let offsets: Vec<usize> = (0..rows).map(|r| (r / (12 * 128)) * width).collect();
    let ms = time(reps, || {
        std::hint::black_box(kiln_onnx::cpu_kernels::masked_softmax_rows(
            &scores, width, 0.125, 0.0, &mask, &offsets, 1,
        ));
    });
    println!(
        "masked softmax [8,12,128,128]: {ms:.3} ms ({:.2} ns/element)",
        ms * 1e6 / (rows * width) as f64
    );
}
