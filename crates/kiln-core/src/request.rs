//! Protocol-neutral inference requests and responses, shared by every front end.
use std::time::Instant;

use bytes::Bytes;
use kiln_sdk::DataType;

use crate::error::CoreError;

/// Parses a model version as the protocols carry it ("" = chosen by the version policy).
pub fn parse_version(v: &str) -> Result<Option<i64>, CoreError> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse::<i64>()
        .ok()
        .filter(|&n| n >= 0)
        .map(Some)
        .ok_or_else(|| {
            CoreError::invalid(format!(
                "failed to parse model version '{v}': must be a non-negative integer"
            ))
        })
}

/// Elements of a tensor of `shape`: `None` for a negative dimension or a count past
/// `usize` (which a plain product would wrap to a small number, so that a request could
/// claim 2^64 elements and send none).
pub fn element_count(shape: &[i64]) -> Option<usize> {
    if shape.iter().any(|&d| d < 0) {
        return None;
    }
    if shape.contains(&0) {
        return Some(0);
    }
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// The error for an input whose shape [`element_count`] refuses.
pub fn shape_too_large(name: &str, shape: &[i64]) -> CoreError {
    CoreError::invalid(format!(
        "input '{name}' has an invalid shape {shape:?}: a negative dimension, or more elements than can be addressed"
    ))
}

/// One input tensor: its bytes are a slice of the request body (no copy).
#[derive(Debug, Clone)]
pub struct InputTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Shape as the client sent it.
    pub shape: Vec<i64>,
    /// Row-major bytes; BYTES as 4-byte LE length + bytes per element.
    pub data: Bytes,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
    /// Classification extension: top-k classes instead of raw data (0 = raw).
    pub class_count: u32,
    /// System shared memory the output is written to instead of the response.
    pub shm: Option<crate::shm::ShmSlot>,
}

/// An inference request after protocol decoding.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// Target model.
    pub model_name: String,
    /// Requested version; `None` means the latest ready one.
    pub model_version: Option<i64>,
    /// Client-chosen id, echoed in the response.
    pub id: String,
    /// Sequence correlation id (for a string id, a number standing for it: see
    /// `correlation_text`).
    pub correlation_id: u64,
    /// The correlation id a client gave as a string (Triton accepts both kinds).
    pub correlation_text: Option<String>,
    /// Sequence flags.
    pub flags: u32,
    /// Priority level (0 = model default).
    pub priority: u64,
    /// Timeout in microseconds (0 = none).
    pub timeout_us: u64,
    /// Remaining request parameters, as a JSON object.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Inputs.
    pub inputs: Vec<InputTensor>,
    /// Requested outputs; empty means every output.
    pub outputs: Vec<RequestedOutput>,
    /// Set by the core on a request that missed the response cache.
    pub cache_key: Option<crate::cache::CacheKey>,
    /// The request's trace, when the tracer sampled it.
    pub trace: Option<std::sync::Arc<crate::trace::Trace>>,
    /// When the front end received it.
    pub arrival: Instant,
}

impl InferRequest {
    /// An empty request for `model_name`.
    pub fn new(model_name: impl Into<String>) -> Self {
        InferRequest {
            model_name: model_name.into(),
            model_version: None,
            id: String::new(),
            correlation_id: 0,
            correlation_text: None,
            flags: 0,
            priority: 0,
            timeout_us: 0,
            parameters: serde_json::Map::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            cache_key: None,
            trace: None,
            arrival: Instant::now(),
        }
    }

    /// The correlation id as the client gave it.
    pub fn sequence_name(&self) -> String {
        self.correlation_text
            .clone()
            .unwrap_or_else(|| self.correlation_id.to_string())
    }

    /// Takes the parameters Triton reserves (`sequence_id`, `sequence_start`,
    /// `sequence_end`, `priority`, `timeout`) out of `params` into the request's fields and
    /// keeps the rest as [`InferRequest::parameters`]; other `triton_` keys are refused, as
    /// tritonserver does. Every front end decodes through this.
    pub fn set_parameters(
        &mut self,
        mut params: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), CoreError> {
        use serde_json::Value;
        let uint = |k: &str, v: &Value| {
            v.as_u64().ok_or_else(|| {
                CoreError::invalid(format!(
                    "parameter '{k}' must be a non-negative integer, got {v}"
                ))
            })
        };
        let boolean = |k: &str, v: &Value| {
            v.as_bool().ok_or_else(|| {
                CoreError::invalid(format!("parameter '{k}' must be a boolean, got {v}"))
            })
        };
        if let Some(v) = params.remove("sequence_id") {
            match &v {
                // A string id names its own sequence ("7" is not 7); the scheduler keys it
                // by a hash with the top bit set.
                Value::String(s) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::hash::DefaultHasher::new();
                    s.hash(&mut h);
                    self.correlation_id = if s.is_empty() {
                        0
                    } else {
                        h.finish() | 1 << 63
                    };
                    self.correlation_text = (!s.is_empty()).then(|| s.clone());
                }
                _ => self.correlation_id = uint("sequence_id", &v)?,
            }
        }
        if let Some(v) = params.remove("sequence_start") {
            if boolean("sequence_start", &v)? {
                self.flags |= 1;
            }
        }
        if let Some(v) = params.remove("sequence_end") {
            if boolean("sequence_end", &v)? {
                self.flags |= 2;
            }
        }
        if let Some(v) = params.remove("priority") {
            self.priority = uint("priority", &v)?;
        }
        if let Some(v) = params.remove("timeout") {
            self.timeout_us = uint("timeout", &v)?;
        }
        if params.keys().any(|k| k.starts_with("triton_")) {
            return Err(CoreError::invalid(
                "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified.",
            ));
        }
        self.parameters = params;
        Ok(())
    }
}

/// A model's outputs as the backend produced them (before ordering, classification and
/// shared memory): name, type, shape, bytes.
pub type Produced = Vec<(String, DataType, Vec<i64>, Vec<u8>)>;

/// One output tensor of a response; `data` is the buffer the backend wrote into.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    /// Output name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Shape.
    pub shape: Vec<i64>,
    /// Row-major bytes (BYTES: length-prefixed elements); empty when the output went to
    /// shared memory.
    pub data: Bytes,
    /// The output was written to the system shared memory the client named, so the
    /// response carries no data for it.
    pub in_shared_memory: bool,
}

/// A complete inference response.
#[derive(Debug, Clone)]
pub struct InferResponse {
    /// Model that answered.
    pub model_name: String,
    /// Version that answered.
    pub model_version: i64,
    /// Echo of the request id.
    pub id: String,
    /// Outputs in the order the client asked for them (config order otherwise).
    pub outputs: Vec<OutputTensor>,
    /// Parameters the backend attached (Triton's response parameters): booleans,
    /// integers, doubles and strings; empty when it set none.
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// What a request's sink receives: responses (the last one marked final) or an error.
#[derive(Debug)]
pub enum ResponseEvent {
    /// A response; `last` when it is the final one.
    Response { response: InferResponse, last: bool },
    /// The request failed (always final).
    Error(CoreError),
    /// An error response of a decoupled model that goes on responding (Triton sends it
    /// on the stream and keeps the stream open); never final.
    StreamError(CoreError),
    /// No more responses (final flag without payload).
    Final,
}

impl ResponseEvent {
    /// Whether no more events follow this one.
    pub fn is_final(&self) -> bool {
        match self {
            ResponseEvent::Response { last, .. } => *last,
            ResponseEvent::StreamError(_) => false,
            ResponseEvent::Error(_) | ResponseEvent::Final => true,
        }
    }
}

pub use crate::sink::ResponseSink;

/// The receiving end of a request's responses.
pub type ResponseStream = tokio::sync::mpsc::UnboundedReceiver<ResponseEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_counts_refuse_negative_and_overflowing_shapes() {
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[i64::MAX, 3, 0]), Some(0));
        assert_eq!(element_count(&[2, -1]), None);
        // 2^64: a wrapping product would say 0.
        assert_eq!(element_count(&[1 << 32, 1 << 32]), None);
        assert_eq!(element_count(&[3, i64::MAX]), None);
    }
}
