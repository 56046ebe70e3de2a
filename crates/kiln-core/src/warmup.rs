//! Model warm-up (`model_warmup` in `config.pbtxt`), as Triton runs it: once a version's
//! instances have started and before it is ready, each sample runs `count` times (at
//! least once) for every instance, as `batch_size` requests of one item each (zeros,
//! random bytes, or `<model>/warmup/<input_data_file>`). A sample that fails fails the
//! load; warm-up runs are left out of the statistics.
use std::path::Path;

use bytes::Bytes;
use kiln_proto::inference::model_warmup::{input::InputDataType, Input};
use kiln_proto::inference::ModelWarmup;
use kiln_sdk::DataType;
use tokio::sync::mpsc::unbounded_channel;

use crate::config;
use crate::error::{CoreError, CoreResult};
use crate::model::ModelVersion;
use crate::request::{InferRequest, InputTensor, ResponseEvent, ResponseSink};

/// Triton's folder (inside the model's folder) of warm-up data files.
pub const DATA_FOLDER: &str = "warmup";

/// Runs every warm-up sample of `mv`'s config on its `instances` instances.
pub fn run(mv: &ModelVersion, model_dir: &Path, instances: usize) -> CoreResult<()> {
    let shared = &mv.shared;
    let samples = &shared.config.model_warmup;
    if samples.is_empty() {
        return Ok(());
    }
    for sample in samples {
        if sample.batch_size == 0 {
            tracing::debug!(model = %shared.name, sample = %sample.name, "skipping a batch-0 warm-up sample");
            continue;
        }
        let fail = |e: CoreError| {
            CoreError::new(
                e.kind,
                format!(
                    "model '{}' failed warm-up sample '{}': {}",
                    shared.name, sample.name, e.message
                ),
            )
        };
        let mut request =
            request(&shared.name, sample, model_dir, shared.max_batch_size > 0).map_err(fail)?;
        if shared.sequences.is_some() {
            // A sequence model: each sample is a whole sequence of one request.
            request.correlation_id = 1;
            request.flags = crate::sequence::FLAG_START | crate::sequence::FLAG_END;
        }
        tracing::info!(model = %shared.name, sample = %sample.name, "warming up");
        // Every instance at once (an idle instance takes the next batch), `count` rounds.
        let per_round = instances.max(1) * sample.batch_size as usize;
        for _ in 0..sample.count.max(1) {
            let (tx, mut rx) = unbounded_channel();
            for _ in 0..per_round {
                mv.submit(request.clone(), ResponseSink::new(tx.clone()))
                    .map_err(fail)?;
            }
            drop(tx);
            // Waited for off any async runtime (loads may run on one).
            let outcome = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut finished = 0;
                    while let Some(event) = rx.blocking_recv() {
                        match event {
                            ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => {
                                return Err(e)
                            }
                            e if e.is_final() => finished += 1,
                            _ => {}
                        }
                    }
                    if finished < per_round {
                        return Err(CoreError::internal(
                            "a warm-up request ended without a response",
                        ));
                    }
                    Ok(())
                })
                .join()
                .unwrap_or_else(|_| Err(CoreError::internal("warm-up waiter panicked")))
            });
            outcome.map_err(fail)?;
        }
    }
    shared.stats.reset();
    Ok(())
}

/// One warm-up request of one item (`[1] + dims` when the model batches).
fn request(
    model: &str,
    sample: &ModelWarmup,
    model_dir: &Path,
    batching: bool,
) -> CoreResult<InferRequest> {
    let mut req = InferRequest::new(model);
    req.id = format!("warmup:{}", sample.name);
    let mut names: Vec<&String> = sample.inputs.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let input = &sample.inputs[name];
        let dtype = config::data_type(input.data_type).ok_or_else(|| {
            CoreError::invalid(format!("warm-up input '{name}' has no valid data_type"))
        })?;
        let mut shape = if batching { vec![1] } else { Vec::new() };
        shape.extend(&input.dims);
        req.inputs.push(InputTensor {
            name: name.clone(),
            dtype,
            shape,
            data: data(name, input, dtype, model_dir, i as u64)?,
        });
    }
    Ok(req)
}

/// The bytes of one warm-up input. Zeros for a BYTES tensor are empty strings; random
/// data for BYTES is zeros too (as Triton); a file is read whole for BYTES (serialized
/// elements) and must hold at least the tensor's size otherwise.
fn data(
    name: &str,
    input: &Input,
    dtype: DataType,
    model_dir: &Path,
    seed: u64,
) -> CoreResult<Bytes> {
    if input.dims.iter().any(|&d| d < 0) {
        return Err(CoreError::invalid(format!(
            "warmup setting expects all variable-size dimensions are specified for input '{name}'"
        )));
    }
    let count: usize = input.dims.iter().map(|&d| d as usize).product();
    // A BYTES element of zero length is its 4-byte length prefix.
    let size = count * dtype.element_size().unwrap_or(4);
    Ok(match &input.input_data_type {
        Some(InputDataType::ZeroData(_)) => vec![0u8; size].into(),
        Some(InputDataType::RandomData(_)) if dtype == DataType::Bytes => vec![0u8; size].into(),
        Some(InputDataType::RandomData(_)) => random_bytes(size, seed).into(),
        Some(InputDataType::InputDataFile(file)) => {
            let path = model_dir.join(DATA_FOLDER).join(file);
            let mut bytes = std::fs::read(&path).map_err(|e| {
                CoreError::invalid(format!(
                    "cannot read warm-up data '{}': {e}",
                    path.display()
                ))
            })?;
            if dtype != DataType::Bytes {
                if bytes.len() < size {
                    return Err(CoreError::invalid(format!(
                        "warmup setting expects {size} bytes, but the data provided from {file} only has {} bytes",
                        bytes.len()
                    )));
                }
                bytes.truncate(size);
            }
            bytes.into()
        }
        None => {
            return Err(CoreError::invalid(format!(
                "warmup setting expects input '{name}' to have input_data_type set"
            )))
        }
    })
}

/// `n` pseudo-random bytes (xorshift; warm-up needs no more).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(dims: Vec<i64>, kind: InputDataType) -> Input {
        Input {
            data_type: DataType::Fp32 as i32,
            dims,
            input_data_type: Some(kind),
        }
    }

    #[test]
    fn builds_zero_random_and_file_data() {
        let dir = tempfile::tempdir().unwrap();
        let get = |dims: Vec<i64>, kind: InputDataType, dtype: DataType| {
            data("x", &input(dims, kind), dtype, dir.path(), 0)
        };
        let z = get(vec![2, 3], InputDataType::ZeroData(true), DataType::Fp32).unwrap();
        assert_eq!(z.len(), 24);
        assert!(z.iter().all(|&b| b == 0));
        let r = get(vec![4], InputDataType::RandomData(true), DataType::Fp32).unwrap();
        assert_eq!(r.len(), 16);
        assert!(r.iter().any(|&b| b != 0));
        // BYTES zeros: empty strings (a zero length prefix each).
        let s = get(vec![3], InputDataType::RandomData(true), DataType::Bytes).unwrap();
        assert_eq!(&s[..], &[0u8; 12]);
        std::fs::create_dir(dir.path().join(DATA_FOLDER)).unwrap();
        std::fs::write(dir.path().join(DATA_FOLDER).join("x.bin"), [1u8; 10]).unwrap();
        let file = InputDataType::InputDataFile("x.bin".into());
        let f = get(vec![2], file.clone(), DataType::Fp32).unwrap();
        assert_eq!(&f[..], &[1u8; 8]);
        let short = get(vec![3], file, DataType::Fp32).unwrap_err();
        assert!(
            short.message.contains("expects 12 bytes"),
            "{}",
            short.message
        );
        let var = get(vec![-1], InputDataType::ZeroData(true), DataType::Fp32).unwrap_err();
        assert!(var.message.contains("variable-size"), "{}", var.message);
    }
}
