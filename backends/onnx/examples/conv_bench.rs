//! GFLOP/s of the CPU convolution on ResNet-50's and DenseNet-121's layer shapes: `conv_bench [reps] [threads] [batch] [only]`.
use kiln_onnx::cpu_conv::Conv2d;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // As the backend does when the server loads it.
    kiln_onnx::allocator::tune();
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let batch: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    // Only the shapes whose line contains this text (e.g. "56x56").
    let only = args.next().unwrap_or_default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    // (ic, h, oc, k, stride)
    let shapes = [
        (3, 224, 64, 7, 2),
        (64, 56, 64, 3, 1),
        (64, 56, 64, 1, 1),
        (64, 56, 256, 1, 1),
        (256, 56, 64, 1, 1),
        (128, 28, 128, 3, 1),
        (128, 28, 512, 1, 1),
        (256, 14, 256, 3, 1),
        (256, 14, 1024, 1, 1),
        (1024, 14, 256, 1, 1),
        (512, 7, 512, 3, 1),
        (512, 7, 2048, 1, 1),
        (2048, 7, 512, 1, 1),
        (128, 56, 128, 3, 2),
        (256, 28, 256, 3, 2),
        (512, 14, 512, 3, 2),
        (256, 56, 512, 1, 2),
        (1024, 14, 2048, 1, 2),
        // DenseNet-121's growth layers (32 new channels from a 128-channel bottleneck).
        (128, 56, 32, 3, 1),
        (128, 28, 32, 3, 1),
        (128, 14, 32, 3, 1),
        (128, 7, 32, 3, 1),
    ];
    for &(ic, h, oc, k, s) in &shapes {
        let p = k / 2;
        if h < k {
            continue;
        }
        let geo = Conv2d {
            input: [batch, ic, h, h],
            out_channels: oc,
            kernel: [k, k],
            stride: [s, s],
            dilation: [1, 1],
            pads: [p, p, p, p],
            groups: 1,
        };
        let [oh, ow] = geo.out_hw().unwrap();
        let name = format!("ic{ic:5} {h:3}x{h:<3} oc{oc:5} k{k} s{s}");
        if !name.contains(&only) {
            continue;
        }
        let x: Vec<f32> = (0..batch * ic * h * h)
            .map(|i| (i % 7) as f32 * 0.1)
            .collect();
        let w: Vec<f32> = (0..oc * ic * k * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let bias = vec![0.5f32; oc];
        // CONV_BENCH_RESIDUAL=1: a residual added as well (ResNet's expanding 1×1 layers).
        let residual = vec![0.25f32; batch * oc * oh * ow];
        let with_residual = std::env::var_os("CONV_BENCH_RESIDUAL").is_some();
        let fused = kiln_onnx::cpu_conv::Fused {
            bias: Some(&bias),
            relu: true,
            residual: with_residual.then_some(&residual[..]),
            ..Default::default()
        };
        // CONV_BENCH_PACKED_ONLY=1: only the packed weight's run (for profiles).
        let dense_reps = if std::env::var_os("CONV_BENCH_PACKED_ONLY").is_some() {
            1
        } else {
            reps
        };
        let t = median(
            (0..dense_reps)
                .map(|_| {
                    let t = Instant::now();
                    pool.install(|| {
                        geo.run(&x, kiln_onnx::cpu_conv::Weight::Dense(&w), &fused, threads)
                    });
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        let kk = ic * k * k;
        let mut packed = kiln_onnx::cpu_conv::pack_weight(&w, oc, ic, k * k);
        // CONV_BENCH_NO_WINOGRAD=1: 3×3 layers without their Winograd transform.
        if k == 3 && s == 1 && std::env::var_os("CONV_BENCH_NO_WINOGRAD").is_none() {
            // CONV_BENCH_WINOGRAD_TILE=2: F(2×2, 3×3) where F(4×4, 3×3) would be picked.
            let forced: Option<usize> = std::env::var("CONV_BENCH_WINOGRAD_TILE")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|t| matches!(t, 2 | 4));
            if let Some(tile) = forced.or_else(|| kiln_onnx::winograd::pick(oc, ic, 16 << 20)) {
                packed.extend(kiln_onnx::winograd::transform_weight(&w, oc, ic, tile));
            }
        }
        // CONV_BENCH_COLD=MiB: the runs take turns over copies of the weight that fill this
        // many MiB, so that each finds its weight out of the cores' caches (as in a model,
        // where the other layers' weights come between).
        let cold_mib: usize = std::env::var("CONV_BENCH_COLD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let copies = (cold_mib << 20) / (packed.len() * 4).max(1) + 1;
        let packed = vec![packed; copies];
        let tp = median(
            (0..reps)
                .map(|r| {
                    let t = Instant::now();
                    pool.install(|| {
                        geo.run(
                            &x,
                            kiln_onnx::cpu_conv::Weight::Packed(&packed[r % copies]),
                            &fused,
                            threads,
                        )
                    });
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        let macs = (batch * oc * oh * ow * kk) as f64;
        println!(
            "{name}: {:7.3} ms {:6.1} GF/s | packed {:7.3} ms {:6.1} GF/s",
            t * 1e3,
            2.0 * macs / t / 1e9,
            tp * 1e3,
            2.0 * macs / tp / 1e9
        );
    }
}
