//! Single-thread GFLOP/s of the AVX2 matrix kernel on a few shapes: `sgemm_bench [reps]`.
use kiln_onnx::sgemm::{pack_panels, sgemm, Base, Epilogue, Lhs, Out, Rhs};
use std::time::Instant;

fn main() {
    if !kiln_onnx::sgemm::available() {
        eprintln!("no AVX2/FMA");
        return;
    }
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for &(m, n, k) in &[
        (96, 256, 256),
        (128, 64, 1152),
        (256, 64, 2304),
        (512, 49, 512),
        (2048, 49, 512),
        (64, 256, 64),
        (256, 196, 256),
        (64, 192, 384),
        (64, 192, 1536),
        (64, 768, 384),
        (66, 512, 256),
        (196, 1024, 256),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
        let packed = pack_panels(&b, k, n);
        let mut a_blocks = vec![0f32; m.div_ceil(6) * 6 * k];
        kiln_onnx::sgemm::to_blocks(&mut a_blocks, 6, k, m, |r, line| {
            for (i, v) in line.iter_mut().enumerate() {
                *v = a[i * k + r];
            }
        });
        let mut c = vec![0f32; m * n];
        let bias = vec![0.5f32; n];
        let rows = Lhs::Rows {
            ptr: a.as_ptr(),
            lda: k,
        };
        let blocks = Lhs::Blocks {
            ptr: a_blocks.as_ptr(),
            k,
            bw: 6,
        };
        let b_rows = Rhs::Rows {
            ptr: b.as_ptr(),
            ldb: n,
        };
        let b_panels = Rhs::Panels {
            ptr: packed.as_ptr(),
            k,
        };
        for (name, lhs, rhs) in [
            ("rows", rows, b_rows),
            ("panels", rows, b_panels),
            ("A-packed", blocks, b_panels),
            ("C-transp", blocks, b_panels),
        ] {
            let mut best = Vec::new();
            for _ in 0..reps {
                let t = Instant::now();
                // "C-transp": C written column-major with a column bias and ReLU, as the
                // pixel-row convolutions write NCHW.
                let transposed = name == "C-transp";
                let e = Epilogue {
                    base: Base::Zero,
                    row_bias: None,
                    col_bias: transposed.then_some(bias.as_ptr()),
                    relu: transposed,
                };
                let out = if transposed {
                    Out {
                        ptr: c.as_mut_ptr(),
                        rs: 1,
                        cs: m,
                    }
                } else {
                    Out::rows(c.as_mut_ptr(), n)
                };
                unsafe { sgemm(m, n, k, lhs, rhs, out, e) };
                best.push(t.elapsed().as_secs_f64());
            }
            best.sort_by(f64::total_cmp);
            let t = best[best.len() / 2];
            println!(
                "m{m:5} n{n:4} k{k:5} {name:8} {:6.1} GF/s",
                2.0 * (m * n * k) as f64 / t / 1e9
            );
        }
    }
}
