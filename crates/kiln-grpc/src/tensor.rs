//! Converting `ModelInferRequest` / `ModelInferResponse` to and from the core's types.
use bytes::{BufMut, Bytes, BytesMut};
pub use kiln_core::request::parse_version;
use kiln_core::shm::SharedMemory;
use kiln_core::{CoreError, DataType, InferRequest, InferResponse, InputTensor, RequestedOutput};
use kiln_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, InferParameter, ModelInferRequest, ModelInferResponse,
};
use serde_json::{Map, Value};
use std::collections::HashMap;

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::invalid(msg)
}

/// An `InferParameter` as the JSON value the core keeps parameters in.
pub fn param_to_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        None => Value::Null,
    }
}

/// A JSON parameter value (boolean, integer, double or string) as an `InferParameter`;
/// any other value travels as its JSON text.
pub fn json_to_param(v: &Value) -> InferParameter {
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ParameterChoice::Int64Param(i),
            (None, Some(u), _) => ParameterChoice::Uint64Param(u),
            (_, _, d) => ParameterChoice::DoubleParam(d.unwrap_or_default()),
        },
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        other => ParameterChoice::StringParam(other.to_string()),
    };
    InferParameter {
        parameter_choice: Some(choice),
    }
}

fn params_to_json(p: &HashMap<String, InferParameter>) -> Map<String, Value> {
    p.iter()
        .map(|(k, v)| (k.clone(), param_to_json(v)))
        .collect()
}

/// What the stream handler needs to know besides the request itself.
#[derive(Debug)]
pub struct StreamOptions {
    /// `triton_enable_empty_final_response`: send a response carrying only the final flag.
    pub empty_final_response: bool,
}

/// Decodes a `ModelInferRequest`; raw contents become slices of the received message and
/// tensors may name regions of `shm` (such inputs have no raw contents entry).
pub fn decode(
    msg: ModelInferRequest,
    shm: &SharedMemory,
) -> Result<(InferRequest, StreamOptions), CoreError> {
    let mut req = InferRequest::new(msg.model_name);
    req.model_version = parse_version(&msg.model_version)?;
    req.id = msg.id;
    let mut params = params_to_json(&msg.parameters);
    let empty_final_response = match params.remove("triton_enable_empty_final_response") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(bad(format!(
                "parameter 'triton_enable_empty_final_response' must be a boolean, got {v}"
            )))
        }
    };
    req.set_parameters(params)?;

    let raw = msg.raw_input_contents;
    let not_shared = msg
        .inputs
        .iter()
        .filter(|i| !i.parameters.contains_key("shared_memory_region"))
        .count();
    if !raw.is_empty() && raw.len() != not_shared {
        return Err(bad(format!(
            "expected {not_shared} inputs in raw_input_contents (one per input not in shared memory) but got {}",
            raw.len()
        )));
    }
    let mut raw = raw.into_iter();
    for input in msg.inputs {
        let dtype = DataType::from_protocol_name(&input.datatype).ok_or_else(|| {
            bad(format!(
                "invalid datatype '{}' for input '{}'",
                input.datatype, input.name
            ))
        })?;
        if input.shape.iter().any(|&d| d < 0) {
            return Err(bad(format!(
                "input '{}' has a negative dimension in its shape",
                input.name
            )));
        }
        let from_shm = shm.input(&input.name, &params_to_json(&input.parameters))?;
        let data = match from_shm.map(Ok).or_else(|| raw.next().map(Err)) {
            Some(Ok(shared)) => {
                if input.contents.is_some() {
                    return Err(bad(format!(
                        "unexpected 'content' provided when using shared memory for input tensor '{}' for model '{}'",
                        input.name, req.model_name
                    )));
                }
                shared
            }
            Some(Err(bytes)) => {
                if input.contents.is_some() {
                    return Err(bad(format!(
                        "input '{}' has contents although raw_input_contents is used",
                        input.name
                    )));
                }
                bytes
            }
            None => typed_contents(&input, dtype)?,
        };
        req.inputs.push(InputTensor {
            name: input.name,
            dtype,
            shape: input.shape,
            data,
        });
    }
    for o in msg.outputs {
        let slot = shm.output(&o.name, &params_to_json(&o.parameters))?;
        let class_count = match o.parameters.get("classification").map(param_to_json) {
            None => 0,
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                bad(format!(
                    "output '{}': parameter 'classification' must be a non-negative integer, got {v}",
                    o.name
                ))
            })?,
        };
        req.outputs.push(RequestedOutput {
            name: o.name,
            class_count,
            shm: slot,
        });
    }
    Ok((
        req,
        StreamOptions {
            empty_final_response,
        },
    ))
}

/// Packs `InferTensorContents` into the core's row-major bytes.
fn typed_contents(input: &InferInputTensor, dtype: DataType) -> Result<Bytes, CoreError> {
    let name = &input.name;
    let c = input.contents.clone().unwrap_or_default();
    let expected = kiln_core::element_count(&input.shape)
        .ok_or_else(|| kiln_core::request::shape_too_large(name, &input.shape))?;
    let count = |n: usize, field: &str| -> Result<(), CoreError> {
        if n != expected {
            return Err(bad(format!(
                "unexpected number of elements for input '{name}': {field} holds {n} but shape {:?} needs {expected}",
                input.shape
            )));
        }
        Ok(())
    };
    let mut out = BytesMut::new();
    macro_rules! pack {
        ($field:ident, $name:literal, |$v:ident| $put:expr) => {{
            count(c.$field.len(), $name)?;
            for &$v in &c.$field {
                $put;
            }
        }};
    }
    match dtype {
        DataType::Bool => pack!(bool_contents, "bool_contents", |v| out.put_u8(v as u8)),
        DataType::Int8 => pack!(int_contents, "int_contents", |v| out.put_i8(v as i8)),
        DataType::Int16 => pack!(int_contents, "int_contents", |v| out.put_i16_le(v as i16)),
        DataType::Int32 => pack!(int_contents, "int_contents", |v| out.put_i32_le(v)),
        DataType::Int64 => pack!(int64_contents, "int64_contents", |v| out.put_i64_le(v)),
        DataType::UInt8 => pack!(uint_contents, "uint_contents", |v| out.put_u8(v as u8)),
        DataType::UInt16 => pack!(uint_contents, "uint_contents", |v| out.put_u16_le(v as u16)),
        DataType::UInt32 => pack!(uint_contents, "uint_contents", |v| out.put_u32_le(v)),
        DataType::UInt64 => pack!(uint64_contents, "uint64_contents", |v| out.put_u64_le(v)),
        DataType::Fp32 => pack!(fp32_contents, "fp32_contents", |v| out.put_f32_le(v)),
        DataType::Fp64 => pack!(fp64_contents, "fp64_contents", |v| out.put_f64_le(v)),
        DataType::Bytes => {
            count(c.bytes_contents.len(), "bytes_contents")?;
            for e in &c.bytes_contents {
                let len = u32::try_from(e.len())
                    .map_err(|_| bad(format!("input '{name}': element larger than 4 GiB")))?;
                out.put_u32_le(len);
                out.put_slice(e);
            }
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(bad(format!(
                "input '{name}': {} data must be sent in raw_input_contents (there is no typed field for it)",
                dtype.protocol_name()
            )))
        }
    }
    Ok(out.freeze())
}

/// Encodes a response: one `raw_output_contents` entry per output, in output order,
/// holding the buffer the backend wrote (no copy; empty for an output written to shared
/// memory, as Triton sends it).
pub fn encode(resp: InferResponse) -> ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for o in resp.outputs {
        outputs.push(InferOutputTensor {
            name: o.name,
            datatype: o.dtype.protocol_name().to_string(),
            shape: o.shape,
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(o.data);
    }
    ModelInferResponse {
        model_name: resp.model_name,
        model_version: resp.model_version.to_string(),
        id: resp.id,
        parameters: resp
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), json_to_param(v)))
            .collect(),
        outputs,
        raw_output_contents: raw,
    }
}

/// A parameter holding `b`.
pub fn bool_param(b: bool) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::BoolParam(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::inference::model_infer_request::InferRequestedOutputTensor;
    use kiln_proto::inference::InferTensorContents;

    fn input(
        name: &str,
        dt: &str,
        shape: Vec<i64>,
        c: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape,
            parameters: HashMap::new(),
            contents: c,
        }
    }

    #[test]
    fn typed_contents_pack_little_endian_and_bytes_get_length_prefixes() {
        let msg = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![
                input(
                    "A",
                    "INT16",
                    vec![2],
                    Some(InferTensorContents {
                        int_contents: vec![1, -2],
                        ..Default::default()
                    }),
                ),
                input(
                    "S",
                    "BYTES",
                    vec![1, 2],
                    Some(InferTensorContents {
                        bytes_contents: vec![Bytes::from_static(b"ab"), Bytes::new()],
                        ..Default::default()
                    }),
                ),
            ],
            outputs: vec![InferRequestedOutputTensor {
                name: "O".into(),
                parameters: [(
                    "classification".to_string(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(3)),
                    },
                )]
                .into(),
            }],
            ..Default::default()
        };
        let (r, _) = decode(msg, &SharedMemory::default()).unwrap();
        assert_eq!(&r.inputs[0].data[..], &[1, 0, 0xfe, 0xff]);
        assert_eq!(&r.inputs[1].data[..], &[2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(r.outputs[0].class_count, 3);
    }

    #[test]
    fn element_count_and_raw_count_mismatches_are_invalid() {
        let msg = ModelInferRequest {
            inputs: vec![input(
                "A",
                "FP32",
                vec![3],
                Some(InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let e = decode(msg, &SharedMemory::default()).unwrap_err();
        assert!(
            e.message.contains("unexpected number of elements"),
            "{}",
            e.message
        );
        let msg = ModelInferRequest {
            inputs: vec![
                input("A", "FP32", vec![1], None),
                input("B", "FP32", vec![1], None),
            ],
            raw_input_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        assert!(decode(msg, &SharedMemory::default())
            .unwrap_err()
            .message
            .contains("raw_input_contents"));
        let msg = ModelInferRequest {
            inputs: vec![input(
                "H",
                "FP16",
                vec![1],
                Some(InferTensorContents::default()),
            )],
            ..Default::default()
        };
        assert!(decode(msg, &SharedMemory::default())
            .unwrap_err()
            .message
            .contains("raw_input_contents"));
    }

    #[test]
    fn reserved_parameters_reach_the_request_fields() {
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        let msg = ModelInferRequest {
            parameters: [
                ("priority".to_string(), p(ParameterChoice::Int64Param(2))),
                ("timeout".to_string(), p(ParameterChoice::Int64Param(500))),
                (
                    "sequence_id".to_string(),
                    p(ParameterChoice::StringParam("7".into())),
                ),
                (
                    "triton_enable_empty_final_response".to_string(),
                    p(ParameterChoice::BoolParam(true)),
                ),
                (
                    "custom".to_string(),
                    p(ParameterChoice::StringParam("x".into())),
                ),
            ]
            .into(),
            ..Default::default()
        };
        let (r, so) = decode(msg, &SharedMemory::default()).unwrap();
        assert_eq!((r.priority, r.timeout_us), (2, 500));
        // A string id is its own sequence (not the number 7), as in Triton.
        assert_eq!(r.correlation_text.as_deref(), Some("7"));
        assert_ne!(r.correlation_id, 0);
        assert_eq!(r.sequence_name(), "7");
        assert!(so.empty_final_response);
        assert_eq!(r.parameters.len(), 1);
        assert_eq!(r.parameters["custom"], "x");
    }

    #[test]
    fn response_parameters_keep_their_types() {
        let mut parameters = Map::new();
        parameters.insert("s".into(), Value::from("text"));
        parameters.insert("i".into(), Value::from(-42i64));
        parameters.insert("u".into(), Value::from(u64::MAX));
        parameters.insert("d".into(), Value::from(0.25f64));
        parameters.insert("b".into(), Value::Bool(true));
        let resp = InferResponse {
            model_name: "m".into(),
            model_version: 1,
            id: String::new(),
            outputs: vec![],
            parameters,
        };
        let p = encode(resp).parameters;
        let choice = |k: &str| p[k].parameter_choice.clone();
        assert_eq!(
            choice("s"),
            Some(ParameterChoice::StringParam("text".into()))
        );
        assert_eq!(choice("i"), Some(ParameterChoice::Int64Param(-42)));
        assert_eq!(choice("u"), Some(ParameterChoice::Uint64Param(u64::MAX)));
        assert_eq!(choice("d"), Some(ParameterChoice::DoubleParam(0.25)));
        assert_eq!(choice("b"), Some(ParameterChoice::BoolParam(true)));
        // And back: the JSON the core keeps is what went in.
        assert_eq!(param_to_json(&p["u"]), Value::from(u64::MAX));
    }
}
