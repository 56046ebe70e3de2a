//! Single-thread GFLOP/s of the AVX2 kernel with B streamed from memory (many copies).
use kiln_onnx::sgemm::{pack_panels, sgemm, Base, Epilogue, Lhs, Out, Rhs};
use std::time::Instant;

fn main() {
    let (m, n, k) = (64usize, 1536usize, 384usize);
    let copies = 64;
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
    let packed: Vec<Vec<f32>> = (0..copies).map(|_| pack_panels(&b, k, n)).collect();
    let mut c = vec![0f32; m * n];
    for (hot, fresh) in [(true, false), (false, false), (false, true)] {
        let mut times = Vec::new();
        for r in 0..200 {
            let p = if hot { &packed[0] } else { &packed[r % copies] };
            let t = Instant::now();
            let mut fresh_c: Vec<f32> = Vec::with_capacity(m * n);
            let cp = if fresh {
                fresh_c.as_mut_ptr()
            } else {
                c.as_mut_ptr()
            };
            let e = Epilogue {
                base: Base::Zero,
                row_bias: None,
                col_bias: None,
                relu: false,
            };
            unsafe {
                sgemm(
                    m,
                    n,
                    k,
                    Lhs::Rows {
                        ptr: a.as_ptr(),
                        lda: k,
                    },
                    Rhs::Panels { ptr: p.as_ptr(), k },
                    Out::rows(cp, n),
                    e,
                );
                if fresh {
                    fresh_c.set_len(m * n)
                }
            };
            times.push(t.elapsed().as_secs_f64());
            drop(fresh_c);
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        println!(
            "hot {hot} fresh C {fresh}: {:.1} GF/s",
            2.0 * (m * n * k) as f64 / t / 1e9
        );
    }
    // Through linear(), 128 rows, like BERT's feed-forward layer.
    let x: Vec<f32> = (0..2 * m * k).map(|i| (i % 7) as f32).collect();
    let bias = vec![0.5f32; n];
    for hot in [true, false] {
        let mut times = Vec::new();
        for r in 0..200 {
            let p = if hot { &packed[0] } else { &packed[r % copies] };
            let t = Instant::now();
            let y = kiln_onnx::cpu_kernels::linear(
                &x,
                kiln_onnx::cpu_kernels::Weight::Panels(p),
                Some(&bias),
                k,
                n,
            );
            times.push(t.elapsed().as_secs_f64());
            drop(y);
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        println!(
            "linear hot {hot}: {:.1} GF/s",
            2.0 * (2 * m * n * k) as f64 / t / 1e9
        );
    }
}

#[allow(dead_code)]
fn unused() {}
