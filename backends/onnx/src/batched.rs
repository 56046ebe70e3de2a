//! A dynamic batch as one graph execution, with ragged batching (Triton's
//! `allow_ragged_batch`, `batch_input`, `batch_output`) as Triton's onnxruntime backend does
//! it: inputs are concatenated along the batch dimension (the scheduler merges only requests
//! whose other dimensions are equal), except a ragged input, which reaches the graph as one
//! flat tensor of every request's elements; the batch inputs describe the batch; a batch
//! output is cut per request by its source input's shape, and the other outputs by batch
//! rows.
use candle_core::Tensor;
use kiln_sdk::{BatchIo, DataType, Error, OwnedTensor, Request, Result};

use crate::plan::Plan;
use crate::OnnxInstance;

/// Whether `output` is the target of a `batch_output`.
pub fn is_batch_output(io: &BatchIo, output: &str) -> bool {
    io.outputs
        .iter()
        .any(|b| b.targets.iter().any(|t| t == output))
}

/// Checks the graph against the ragged part of the config: each ragged input is a graph
/// input of one dimension, and each batch input a graph input of the configured type.
pub fn check_graph(model: &str, io: &BatchIo, plan: &Plan) -> Result<()> {
    let graph_input = |name: &str| plan.inputs.iter().find(|g| g.name == name);
    for name in &io.ragged {
        if let Some(g) = graph_input(name) {
            if !g.dims.is_empty() && g.dims.len() != 1 {
                return Err(Error::invalid_arg(format!(
                    "model '{model}', tensor '{name}': a ragged input (allow_ragged_batch) reaches the model as one flat tensor, so the model's shape must have 1 dimension, but it is {:?}",
                    g.dims
                )));
            }
        }
    }
    for b in &io.inputs {
        let g = graph_input(&b.target).ok_or_else(|| {
            Error::invalid_arg(format!(
                "unable to load model '{model}': batch input '{}' is not a model input",
                b.target
            ))
        })?;
        if g.dtype.is_some_and(|dt| dt != b.dtype) {
            return Err(Error::invalid_arg(format!(
                "unable to load model '{model}', configuration expects datatype {} for batch input '{}', model provides {}",
                b.dtype.config_name(),
                b.target,
                g.dtype.map_or("an unsupported type", DataType::config_name)
            )));
        }
    }
    Ok(())
}

/// A request's part of each output: its rows, or, for a batch output, its elements
/// (`start`, shape).
struct Part {
    first_row: usize,
    rows: usize,
    scattered: Vec<(String, usize, Vec<i64>)>,
}

impl Part {
    fn cut(&self, name: &str, t: &Tensor) -> candle_core::Result<Tensor> {
        match self.scattered.iter().find(|(n, _, _)| n == name) {
            Some((_, start, shape)) => {
                let count: i64 = shape.iter().product();
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                t.flatten_all()?
                    .narrow(0, *start, count.max(0) as usize)?
                    .reshape(dims)
            }
            None => t.narrow(0, self.first_row, self.rows),
        }
    }
}

impl OnnxInstance {
    /// Runs a batch as one graph execution. A batch that fails as a whole (a bad request,
    /// or tensors the core adds, such as a sequence's implicit state, that differ in shape
    /// and cannot be joined) is retried request by request, so one bad request fails alone.
    pub(crate) fn execute_joined(&mut self, requests: &[Request<'_>]) -> Result<()> {
        let outputs = match self.run_joined(requests) {
            Ok(o) => o,
            Err(e) if requests.len() < 2 => return Err(e),
            Err(_) => {
                for r in requests {
                    if let Err(e) = self.execute_joined(std::slice::from_ref(r)) {
                        r.response()?.send_error(e)?;
                    }
                }
                return Ok(());
            }
        };
        let parts = self.parts(requests)?;
        for (r, part) in requests.iter().zip(&parts) {
            let mut response = r.response()?;
            match self.fill(r, &mut response, &outputs, |n, t| part.cut(n, t)) {
                Ok(()) => response.send()?,
                Err(e) => response.send_error(e)?,
            }
        }
        Ok(())
    }

    fn run_joined(&self, requests: &[Request<'_>]) -> Result<crate::Outputs> {
        let first = requests
            .first()
            .ok_or_else(|| Error::invalid_arg("empty batch"))?;
        let mut joined = Vec::new();
        for t in first.inputs() {
            let tensors = requests
                .iter()
                .map(|r| r.require_input(t.name))
                .collect::<Result<Vec<_>>>()?;
            let name = t.name.to_string();
            joined.push(if self.batch_io.is_ragged(t.name) {
                let count: i64 = tensors
                    .iter()
                    .map(|t| t.shape.iter().product::<i64>())
                    .sum();
                let data = tensors
                    .iter()
                    .flat_map(|t| t.data.iter().copied())
                    .collect();
                OwnedTensor {
                    name,
                    dtype: t.dtype,
                    shape: vec![count],
                    data,
                }
            } else {
                let (dtype, shape, data) = kiln_sdk::concat_batch(t.name, &tensors)?;
                OwnedTensor {
                    name,
                    dtype,
                    shape,
                    data,
                }
            });
        }
        joined.extend(self.batch_io.batch_inputs(requests)?);
        self.run(
            joined
                .iter()
                .map(|t| (t.name.as_str(), t.dtype, t.shape.clone(), t.data.as_slice()))
                .collect(),
        )
    }

    /// Where each request's part of the outputs lies.
    fn parts(&self, requests: &[Request<'_>]) -> Result<Vec<Part>> {
        let mut parts: Vec<Part> = Vec::with_capacity(requests.len());
        let mut first_row = 0;
        for r in requests {
            let rows = r.batch_size() as usize;
            parts.push(Part {
                first_row,
                rows,
                scattered: Vec::new(),
            });
            first_row += rows;
        }
        for b in &self.batch_io.outputs {
            for name in &b.targets {
                let Some(shapes) = self.batch_io.scatter_shapes(name, requests) else {
                    continue;
                };
                let mut start = 0usize;
                for (part, shape) in parts.iter_mut().zip(shapes?) {
                    let count = shape.iter().product::<i64>().max(0) as usize;
                    part.scattered.push((name.clone(), start, shape));
                    start += count;
                }
            }
        }
        Ok(parts)
    }
}
