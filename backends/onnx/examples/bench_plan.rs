//! Median latency of the onnx backend's executor on one model, in process:
//! `bench_plan <model.onnx> [iterations] [batch] [sequence]`. Float inputs are
//! arange(n) / n; integer inputs are 1 when the name says "mask", else (31·i) mod 1000 (token
//! ids); unknown dimensions are `batch` (first) or `sequence` (default 1). Used by
//! `cargo xtask bench` next to onnxruntime on the same file and input
//! (`tests/bench/onnx_vs_ort.py` builds the same inputs).
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kiln_onnx::plan::Plan;
use kiln_sdk::DataType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: bench_plan <model.onnx> [iterations] [batch]")?;
    let iters: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let batch: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seq: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    // As the backend does when the server loads it.
    kiln_onnx::allocator::tune();
    let model = candle_onnx::read_file(&path)?;
    let plan = Plan::new(&model, &Device::Cpu)?;
    let mut inputs = HashMap::new();
    for info in &plan.inputs {
        let dims: Vec<usize> = info
            .dims
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if d > 0 {
                    d as usize
                } else if i == 0 {
                    batch
                } else {
                    seq
                }
            })
            .collect();
        let n: usize = dims.iter().product();
        let t = match info.dtype {
            Some(DataType::Int64) => {
                let mask = info.name.contains("mask");
                let v: Vec<i64> = (0..n as i64)
                    .map(|i| if mask { 1 } else { (31 * i) % 1000 })
                    .collect();
                Tensor::from_vec(v, dims, &Device::Cpu)?
            }
            _ => {
                let v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
                Tensor::from_vec(v, dims, &Device::Cpu)?
            }
        };
        inputs.insert(info.name.clone(), t);
    }
    // The backend runs each request's plan on a thread of the model's pool (lib.rs);
    // so does this.
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    pool.install(|| plan.run(inputs.clone()))?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        pool.install(|| plan.run(inputs.clone()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if std::env::var_os("KILN_BENCH_TIMES").is_some() {
        eprintln!("{times:.1?}");
    }
    times.sort_by(f64::total_cmp);
    println!("{:.3}", times[times.len() / 2]);
    // Where the time goes: one profiled run, top operators by time (stderr).
    let mut profile = HashMap::new();
    // KILN_PROFILE_SHAPES=1: per operator and shape, with GFLOP/s for convolutions.
    let by_shape = std::env::var_os("KILN_PROFILE_SHAPES").is_some();
    // KILN_PROFILE_RUNS=n: the mean of n profiled runs (one by default).
    let runs: usize = std::env::var("KILN_PROFILE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let table = plan.string_table();
    for _ in 0..runs {
        pool.install(|| plan.run_profiled(inputs.clone(), &table, Some(&mut profile), by_shape))?;
    }
    let mut ops: Vec<_> = profile
        .into_iter()
        .map(|(op, (ms, n))| (op, (ms / runs as f64, n / runs)))
        .collect();
    ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let top: Vec<String> = ops
        .iter()
        .take(if by_shape { 60 } else { 12 })
        .map(|(op, (ms, n))| format!("{op} {ms:.1} ms/{n}"))
        .collect();
    eprintln!("{}", top.join(if by_shape { "\n" } else { ", " }));
    Ok(())
}
