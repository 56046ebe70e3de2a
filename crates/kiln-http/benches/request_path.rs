//! The HTTP request path's hot pieces: decoding an infer request (JSON data and binary
//! tensor data) and encoding its response.
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_core::{DataType, InferResponse, OutputTensor};
use kiln_http::infer::{decode, encode};

fn json_body(n: usize) -> Bytes {
    let data: Vec<String> = (0..n).map(|i| format!("{}.5", i % 100)).collect();
    Bytes::from(format!(
        r#"{{"id":"x","inputs":[{{"name":"INPUT0","shape":[1,{n}],"datatype":"FP32","data":[{}]}}],"outputs":[{{"name":"OUTPUT0"}}]}}"#,
        data.join(",")
    ))
}

fn binary_body(n: usize) -> (Bytes, usize) {
    let header = format!(
        r#"{{"inputs":[{{"name":"INPUT0","shape":[1,{n}],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}],"outputs":[{{"name":"OUTPUT0","parameters":{{"binary_data":true}}}}]}}"#,
        n * 4
    );
    let mut body = header.clone().into_bytes();
    body.extend(std::iter::repeat_n(0u8, n * 4));
    (Bytes::from(body), header.len())
}

fn bench(c: &mut Criterion) {
    let shm = kiln_core::shm::SharedMemory::default();
    let mut g = c.benchmark_group("http_decode");
    for n in [16usize, 4096] {
        g.throughput(Throughput::Elements(n as u64));
        let body = json_body(n);
        g.bench_with_input(BenchmarkId::new("json", n), &body, |b, body| {
            b.iter(|| decode("m", None, body.clone(), None, &shm).map(|(r, _)| r.inputs.len()))
        });
        let (body, hl) = binary_body(n);
        g.bench_with_input(BenchmarkId::new("binary", n), &body, |b, body| {
            b.iter(|| decode("m", None, body.clone(), Some(hl), &shm).map(|(r, _)| r.inputs.len()))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("http_encode");
    for n in [16usize, 4096] {
        g.throughput(Throughput::Elements(n as u64));
        let resp = InferResponse {
            model_name: "m".into(),
            model_version: 1,
            id: "x".into(),
            outputs: vec![OutputTensor {
                name: "OUTPUT0".into(),
                dtype: DataType::Fp32,
                shape: vec![1, n as i64],
                data: Bytes::from(vec![0u8; n * 4]),
                in_shared_memory: false,
            }],
            parameters: Default::default(),
        };
        for binary in [false, true] {
            let (_, enc) = if binary {
                let (body, hl) = binary_body(n);
                decode("m", None, body, Some(hl), &shm).expect("valid request")
            } else {
                decode("m", None, json_body(n), None, &shm).expect("valid request")
            };
            let name = if binary { "binary" } else { "json" };
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| encode(resp.clone(), &enc).map(|e| e.header.len()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
