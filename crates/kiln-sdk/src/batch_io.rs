//! Triton's ragged batching, for backends that run a batch as one tensor per input:
//! inputs with `allow_ragged_batch` are joined flat (one dimension, every request's
//! elements in turn), the config's `batch_input`s describe where each request's part lies,
//! and its `batch_output`s are cut back per request by the shape of a source input — as
//! Triton's backend utilities (`BackendInputCollector`, `BackendOutputResponder`) do.
use serde_json::Value;

use crate::{DataType, Error, OwnedTensor, Request, Result};

/// What a `batch_input` entry computes (Triton's `BatchInput.Kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchInputKind {
    /// `[requests]`: each request's element count of the source input.
    ElementCount,
    /// `[requests]`: the running total of those counts (where each request's part ends).
    AccumulatedElementCount,
    /// `[requests + 1]`: 0, then the running total (where each part starts and ends).
    AccumulatedElementCountWithZero,
    /// `[largest element count]`: only the shape matters (the values are zeros).
    MaxElementCountAsShape,
    /// `[batch rows, rank - 1]`: each batch row's shape without the batch dimension.
    ItemShape,
    /// The same values as `ItemShape`, flat.
    ItemShapeFlatten,
}

/// One `batch_input` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchInput {
    /// What it computes.
    pub kind: BatchInputKind,
    /// The model input it feeds.
    pub target: String,
    /// `Fp32` or `Int32`.
    pub dtype: DataType,
    /// The request input it describes.
    pub source: String,
}

/// One `batch_output` entry (`BATCH_SCATTER_WITH_INPUT_SHAPE`): the model writes the
/// outputs of every request one after another, each shaped like its request's `source`.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The model outputs it applies to.
    pub targets: Vec<String>,
    /// The request input whose shape each request's part takes.
    pub source: String,
}

/// The ragged-batching part of a model's config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchIo {
    /// Inputs with `allow_ragged_batch`.
    pub ragged: Vec<String>,
    /// `batch_input` entries.
    pub inputs: Vec<BatchInput>,
    /// `batch_output` entries.
    pub outputs: Vec<BatchOutput>,
    /// Each output's config dims with the batch dimension first (-1 = variable).
    output_dims: Vec<(String, Vec<i64>)>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn single(v: &Value, what: &str) -> Result<String> {
    match strings(v).as_slice() {
        [one] => Ok(one.clone()),
        other => Err(Error::invalid_arg(format!(
            "{what} expects 1 name, got {}",
            other.len()
        ))),
    }
}

impl BatchIo {
    /// Reads `allow_ragged_batch`, `batch_input` and `batch_output` from a config in
    /// Triton's JSON form (`ModelInfo::config_json`).
    pub fn from_config(config: &Value) -> Result<Self> {
        let list = |k: &str| config[k].as_array().cloned().unwrap_or_default();
        let ragged = list("input")
            .iter()
            .filter(|i| i["allow_ragged_batch"].as_bool() == Some(true))
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect();
        let mut inputs = Vec::new();
        for b in list("batch_input") {
            let kind = match b["kind"].as_str().unwrap_or("BATCH_ELEMENT_COUNT") {
                "BATCH_ELEMENT_COUNT" => BatchInputKind::ElementCount,
                "BATCH_ACCUMULATED_ELEMENT_COUNT" => BatchInputKind::AccumulatedElementCount,
                "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO" => {
                    BatchInputKind::AccumulatedElementCountWithZero
                }
                "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE" => BatchInputKind::MaxElementCountAsShape,
                "BATCH_ITEM_SHAPE" => BatchInputKind::ItemShape,
                "BATCH_ITEM_SHAPE_FLATTEN" => BatchInputKind::ItemShapeFlatten,
                other => {
                    return Err(Error::invalid_arg(format!(
                        "unknown batch input kind '{other}'"
                    )))
                }
            };
            let dtype = match b["data_type"].as_str() {
                Some("TYPE_FP32") => DataType::Fp32,
                Some("TYPE_INT32") => DataType::Int32,
                _ => {
                    return Err(Error::invalid_arg(
                        "batch input data type must be TYPE_INT32 or TYPE_FP32",
                    ))
                }
            };
            let source = single(&b["source_input"], "batch input 'source_input'")?;
            for target in strings(&b["target_name"]) {
                inputs.push(BatchInput {
                    kind,
                    target,
                    dtype,
                    source: source.clone(),
                });
            }
        }
        let outputs = list("batch_output")
            .iter()
            .map(|b| {
                Ok(BatchOutput {
                    targets: strings(&b["target_name"]),
                    source: single(&b["source_input"], "batch output 'source_input'")?,
                })
            })
            .collect::<Result<_>>()?;
        let batching = config["max_batch_size"].as_i64().unwrap_or(0) > 0;
        let output_dims = list("output")
            .iter()
            .map(|o| {
                let dims = full_dims(&o["dims"], batching);
                (o["name"].as_str().unwrap_or("").to_string(), dims)
            })
            .collect();
        Ok(BatchIo {
            ragged,
            inputs,
            outputs,
            output_dims,
        })
    }

    /// Whether the config uses ragged batching at all.
    pub fn is_empty(&self) -> bool {
        self.ragged.is_empty() && self.inputs.is_empty() && self.outputs.is_empty()
    }

    /// Whether `input` is joined flat.
    pub fn is_ragged(&self, input: &str) -> bool {
        self.ragged.iter().any(|r| r == input)
    }

    /// Whether `name` is a batch input (the backend makes it, requests do not carry it).
    pub fn is_batch_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|b| b.target == name)
    }

    /// The batch inputs of a batch of requests.
    pub fn batch_inputs(&self, requests: &[Request<'_>]) -> Result<Vec<OwnedTensor>> {
        self.inputs
            .iter()
            .map(|b| {
                let shapes = requests
                    .iter()
                    .map(|r| r.require_input(&b.source).map(|t| t.shape.to_vec()))
                    .collect::<Result<Vec<_>>>()?;
                let (shape, values) = batch_input_values(b.kind, &shapes);
                let bytes = match b.dtype {
                    DataType::Fp32 => values
                        .iter()
                        .flat_map(|&v| (v as f32).to_ne_bytes())
                        .collect(),
                    _ => values
                        .iter()
                        .flat_map(|&v| (v as i32).to_ne_bytes())
                        .collect(),
                };
                Ok(OwnedTensor {
                    name: b.target.clone(),
                    dtype: b.dtype,
                    shape,
                    data: bytes,
                })
            })
            .collect()
    }

    /// For a batch output: each request's shape of `output` (the config dims with every
    /// -1 taken from the request's source input) — the parts the model's output is cut
    /// into, in request order. `None` when `output` is not a batch output.
    pub fn scatter_shapes(
        &self,
        output: &str,
        requests: &[Request<'_>],
    ) -> Option<Result<Vec<Vec<i64>>>> {
        let b = self
            .outputs
            .iter()
            .find(|b| b.targets.iter().any(|t| t == output))?;
        let dims = self
            .output_dims
            .iter()
            .find(|(n, _)| n == output)
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        Some(
            requests
                .iter()
                .map(|r| {
                    let src = r.require_input(&b.source)?;
                    Ok(scatter_shape(&dims, src.shape))
                })
                .collect(),
        )
    }
}

/// A tensor's full shape from its config dims (a JSON list): with `batching`, the batch
/// dimension (-1) first.
pub fn full_dims(dims: &Value, batching: bool) -> Vec<i64> {
    let rest = dims
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64);
    batching.then_some(-1).into_iter().chain(rest).collect()
}

/// A request's shape of a batch output: `dims` with each -1 replaced by the source
/// input's dimension at the same position.
fn scatter_shape(dims: &[i64], source: &[i64]) -> Vec<i64> {
    dims.iter()
        .enumerate()
        .map(|(i, &d)| {
            if d == -1 {
                source.get(i).copied().unwrap_or(1)
            } else {
                d
            }
        })
        .collect()
}

/// The shape and values of one batch input, from the source input's shape in each
/// request (batch dimension first).
fn batch_input_values(kind: BatchInputKind, shapes: &[Vec<i64>]) -> (Vec<i64>, Vec<i64>) {
    let counts: Vec<i64> = shapes.iter().map(|s| s.iter().product()).collect();
    let running = counts.iter().scan(0, |acc, c| {
        *acc += c;
        Some(*acc)
    });
    let n = shapes.len() as i64;
    match kind {
        BatchInputKind::ElementCount => (vec![n], counts),
        BatchInputKind::AccumulatedElementCount => (vec![n], running.collect()),
        BatchInputKind::AccumulatedElementCountWithZero => {
            (vec![n + 1], std::iter::once(0).chain(running).collect())
        }
        BatchInputKind::MaxElementCountAsShape => {
            let max = counts.iter().copied().max().unwrap_or(0);
            (vec![max], vec![0; max.max(0) as usize])
        }
        BatchInputKind::ItemShape | BatchInputKind::ItemShapeFlatten => {
            let rank = shapes.first().map_or(0, |s| s.len().saturating_sub(1));
            let mut values = Vec::new();
            let mut rows = 0;
            for s in shapes {
                let (&b, item) = s.split_first().unwrap_or((&1, &[]));
                for _ in 0..b.max(0) {
                    values.extend_from_slice(item);
                }
                rows += b.max(0);
            }
            if kind == BatchInputKind::ItemShape {
                (vec![rows, rank as i64], values)
            } else {
                (vec![values.len() as i64], values)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_follow_tritons_definitions() {
        // Requests of 3, 4 and 5 elements (the ragged batching guide's example).
        let s = vec![vec![1, 3], vec![1, 4], vec![1, 5]];
        let v = |k| batch_input_values(k, &s);
        assert_eq!(v(BatchInputKind::ElementCount), (vec![3], vec![3, 4, 5]));
        assert_eq!(
            v(BatchInputKind::AccumulatedElementCount),
            (vec![3], vec![3, 7, 12])
        );
        assert_eq!(
            v(BatchInputKind::AccumulatedElementCountWithZero),
            (vec![4], vec![0, 3, 7, 12])
        );
        assert_eq!(v(BatchInputKind::MaxElementCountAsShape).0, vec![5]);
        // The proto's item-shape example: a batch-2 input [2, 3, 1] and a batch-1 [1, 2, 2].
        let s = vec![vec![2, 3, 1], vec![1, 2, 2]];
        assert_eq!(
            batch_input_values(BatchInputKind::ItemShape, &s),
            (vec![3, 2], vec![3, 1, 3, 1, 2, 2])
        );
        assert_eq!(
            batch_input_values(BatchInputKind::ItemShapeFlatten, &s),
            (vec![6], vec![3, 1, 3, 1, 2, 2])
        );
    }

    #[test]
    fn full_dims_prepend_the_batch_dimension_when_batching() {
        assert_eq!(full_dims(&json!([3, -1]), true), vec![-1, 3, -1]);
        assert_eq!(full_dims(&json!([3, -1]), false), vec![3, -1]);
        assert_eq!(full_dims(&Value::Null, true), vec![-1]);
    }

    #[test]
    fn scatter_shape_takes_variable_dims_from_the_source() {
        assert_eq!(scatter_shape(&[-1, -1], &[1, 7]), vec![1, 7]);
        assert_eq!(scatter_shape(&[-1, 2], &[3, 7]), vec![3, 2]);
    }

    #[test]
    fn reads_the_config() {
        let c = json!({
            "max_batch_size": 8,
            "input": [{"name": "IN", "allow_ragged_batch": true}, {"name": "B"}],
            "output": [{"name": "OUT", "dims": [-1]}],
            "batch_input": [{"kind": "BATCH_ACCUMULATED_ELEMENT_COUNT", "target_name": ["IDX"],
                             "data_type": "TYPE_INT32", "source_input": ["IN"]}],
            "batch_output": [{"kind": "BATCH_SCATTER_WITH_INPUT_SHAPE", "target_name": ["OUT"],
                              "source_input": ["IN"]}],
        });
        let b = BatchIo::from_config(&c).unwrap();
        assert!(b.is_ragged("IN") && !b.is_ragged("B") && b.is_batch_input("IDX"));
        assert_eq!(b.inputs[0].kind, BatchInputKind::AccumulatedElementCount);
        assert_eq!(b.inputs[0].dtype, DataType::Int32);
        assert_eq!(b.outputs[0].targets, vec!["OUT".to_string()]);
        assert_eq!(b.output_dims, vec![("OUT".to_string(), vec![-1, -1])]);
        assert!(BatchIo::from_config(&json!({})).unwrap().is_empty());
        let bad =
            json!({"batch_input": [{"kind": "BATCH_ELEMENT_COUNT", "data_type": "TYPE_INT64"}]});
        assert!(BatchIo::from_config(&bad).is_err());
    }
}
