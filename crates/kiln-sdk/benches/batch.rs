//! Batch gather (concatenating requests' inputs) and scatter (slicing a batched output).
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_sdk::{batch_rows, concat_batch, DataType, Tensor};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    for (requests, row) in [(8usize, 64usize), (32, 3 * 224 * 224)] {
        let row_bytes = row * 4;
        let data = vec![1u8; row_bytes];
        let shape = [1i64, row as i64];
        let tensors: Vec<Tensor<'_>> = (0..requests)
            .map(|_| Tensor {
                name: "INPUT0",
                dtype: DataType::Fp32,
                shape: &shape,
                data: &data,
            })
            .collect();
        g.throughput(Throughput::Bytes((requests * row_bytes) as u64));
        let id = format!("{requests}x{row}");
        g.bench_function(BenchmarkId::new("gather", &id), |b| {
            b.iter(|| concat_batch("INPUT0", &tensors).map(|(_, _, v)| v.len()))
        });
        let (_, _, batched) = concat_batch("INPUT0", &tensors).expect("same shapes");
        g.bench_function(BenchmarkId::new("scatter", &id), |b| {
            b.iter(|| {
                // Each request's copy of its rows, as Response::scatter_from makes it.
                (0..requests)
                    .map(|i| {
                        let rows = batch_rows(&batched, i, 1, row_bytes).map(<[u8]>::to_vec);
                        black_box(rows).map_or(0, |r| r.len())
                    })
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
