//! `POST .../infer`: decoding the JSON header + binary tensor data, and encoding the response.
use bytes::Bytes;
use kiln_core::shm::SharedMemory;
use kiln_core::{CoreError, DataType, InferRequest, InferResponse, InputTensor, RequestedOutput};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::json_tensor::{bytes_to_json, json_to_bytes};

#[derive(Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// How the client wants each output encoded.
#[derive(Debug)]
pub struct OutputEncoding {
    /// Default for outputs not named in the request (`binary_data_output`).
    pub default_binary: bool,
    /// Per requested output: binary or JSON.
    pub binary: Vec<(String, bool)>,
}

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::invalid(msg)
}

fn param_u64(p: &Map<String, Value>, k: &str) -> Result<Option<u64>, CoreError> {
    match p.get(k) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            bad(format!(
                "parameter '{k}' must be a non-negative integer, got {v}"
            ))
        }),
    }
}

fn param_bool(p: &Map<String, Value>, k: &str) -> Result<Option<bool>, CoreError> {
    match p.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(format!("parameter '{k}' must be a boolean, got {v}"))),
    }
}

/// Decodes an infer request body. `header_len` is `Inference-Header-Content-Length`;
/// tensors may name regions of `shm`.
pub fn decode(
    model: &str,
    version: Option<i64>,
    body: Bytes,
    header_len: Option<usize>,
    shm: &SharedMemory,
) -> Result<(InferRequest, OutputEncoding), CoreError> {
    let hl = header_len.unwrap_or(body.len());
    if hl > body.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length {hl} exceeds the request body size {}",
            body.len()
        )));
    }
    let header: RequestJson = serde_json::from_slice(&body[..hl])
        .map_err(|e| bad(format!("failed to parse the request JSON: {e}")))?;
    let mut req = InferRequest::new(model);
    req.model_version = version;
    req.id = match header.id {
        None => String::new(),
        Some(Value::String(s)) => s,
        Some(v) => return Err(bad(format!("request 'id' must be a string, got {v}"))),
    };
    let mut params = header.parameters.unwrap_or_default();
    let default_binary = param_bool(&params, "binary_data_output")?.unwrap_or(false);
    params.remove("binary_data_output");
    req.set_parameters(params)?;

    let mut offset = hl;
    for input in header.inputs {
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
        let count = kiln_core::element_count(&input.shape)
            .ok_or_else(|| kiln_core::request::shape_too_large(&input.name, &input.shape))?;
        let p = input.parameters.unwrap_or_default();
        let from_shm = shm.input(&input.name, &p)?;
        let data = match (from_shm, param_u64(&p, "binary_data_size")?) {
            (Some(d), binary) => {
                if input.data.is_some() || binary.is_some() {
                    return Err(bad(format!(
                        "input '{}' has data in the request although it names a shared memory region",
                        input.name
                    )));
                }
                d
            }
            (None, Some(n)) => {
                let n = n as usize;
                if input.data.is_some() {
                    return Err(bad(format!(
                        "input '{}' has both 'data' and 'binary_data_size'",
                        input.name
                    )));
                }
                let end = offset.checked_add(n).filter(|&e| e <= body.len()).ok_or_else(|| {
                    bad(format!(
                        "unexpected binary data size for input '{}': {n} bytes requested but only {} remain in the request body",
                        input.name,
                        body.len() - offset
                    ))
                })?;
                let d = body.slice(offset..end);
                offset = end;
                d
            }
            (None, None) => {
                let d = input.data.as_ref().ok_or_else(|| {
                    bad(format!(
                        "input '{}' has no 'data' and no 'binary_data_size'",
                        input.name
                    ))
                })?;
                Bytes::from(json_to_bytes(&input.name, dtype, d, count).map_err(bad)?)
            }
        };
        req.inputs.push(InputTensor {
            name: input.name,
            dtype,
            shape: input.shape,
            data,
        });
    }
    if offset != body.len() {
        return Err(bad(format!(
            "the request body has {} bytes of binary data that no input claims",
            body.len() - offset
        )));
    }
    let mut binary = Vec::new();
    for o in header.outputs.unwrap_or_default() {
        let p = o.parameters.unwrap_or_default();
        let slot = shm.output(&o.name, &p)?;
        let class_count = param_u64(&p, "classification")?.unwrap_or(0);
        let class_count = u32::try_from(class_count)
            .map_err(|_| bad("parameter 'classification' is too large"))?;
        binary.push((
            o.name.clone(),
            param_bool(&p, "binary_data")?.unwrap_or(default_binary),
        ));
        req.outputs.push(RequestedOutput {
            name: o.name,
            class_count,
            shm: slot,
        });
    }
    Ok((
        req,
        OutputEncoding {
            default_binary,
            binary,
        },
    ))
}

/// Encoded response: JSON header plus binary chunks.
pub struct Encoded {
    /// The JSON header.
    pub header: Vec<u8>,
    /// Binary output buffers, in output order (empty when all outputs are JSON).
    pub binary: Vec<Bytes>,
}

/// The members every response object starts with: `model_name`, `model_version` and,
/// when the request had one, `id`.
pub(crate) fn response_header(model_name: String, version: i64, id: String) -> Map<String, Value> {
    let mut top = Map::new();
    top.insert("model_name".into(), Value::String(model_name));
    top.insert("model_version".into(), Value::String(version.to_string()));
    if !id.is_empty() {
        top.insert("id".into(), Value::String(id));
    }
    top
}

/// Encodes a response; binary outputs keep their buffers (no copy).
pub fn encode(resp: InferResponse, enc: &OutputEncoding) -> Result<Encoded, CoreError> {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut binary = Vec::new();
    for o in resp.outputs {
        let as_binary = enc
            .binary
            .iter()
            .find(|(n, _)| *n == o.name)
            .map(|(_, b)| *b)
            .unwrap_or(enc.default_binary);
        let mut j = Map::new();
        j.insert("name".into(), Value::String(o.name.clone()));
        j.insert(
            "datatype".into(),
            Value::String(o.dtype.protocol_name().into()),
        );
        j.insert("shape".into(), json!(o.shape));
        if o.in_shared_memory {
            // The data is in the client's shared memory region.
        } else if as_binary {
            j.insert(
                "parameters".into(),
                json!({"binary_data_size": o.data.len()}),
            );
            binary.push(o.data);
        } else {
            j.insert(
                "data".into(),
                bytes_to_json(&o.name, o.dtype, &o.data).map_err(bad)?,
            );
        }
        outputs.push(Value::Object(j));
    }
    let mut top = response_header(resp.model_name, resp.model_version, resp.id);
    if !resp.parameters.is_empty() {
        top.insert("parameters".into(), Value::Object(resp.parameters));
    }
    top.insert("outputs".into(), Value::Array(outputs));
    let header =
        serde_json::to_vec(&Value::Object(top)).map_err(|e| CoreError::internal(e.to_string()))?;
    Ok(Encoded { header, binary })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_inputs_are_slices_of_the_body() {
        let hdr = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}},{"name":"B","shape":[1],"datatype":"INT32","data":[5]}],"outputs":[{"name":"O","parameters":{"binary_data":true,"classification":2}}]}"#;
        let mut body = hdr.to_vec();
        body.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        let shm = SharedMemory::default();
        let (r, enc) = decode("m", Some(1), Bytes::from(body), Some(hdr.len()), &shm).unwrap();
        assert_eq!(&r.inputs[0].data[..], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&r.inputs[1].data[..], &[5, 0, 0, 0]);
        assert_eq!(
            r.outputs[0],
            RequestedOutput {
                name: "O".into(),
                class_count: 2,
                shm: None,
            }
        );
        assert!(enc.binary[0].1);
    }

    #[test]
    fn response_parameters_appear_only_when_set() {
        let mut resp = InferResponse {
            model_name: "m".into(),
            model_version: 2,
            id: String::new(),
            outputs: vec![],
            parameters: Map::new(),
        };
        let enc = OutputEncoding {
            default_binary: false,
            binary: vec![],
        };
        let top: Value =
            serde_json::from_slice(&encode(resp.clone(), &enc).unwrap().header).unwrap();
        assert!(top.get("parameters").is_none(), "{top}");
        resp.parameters.insert("param1".into(), json!(42));
        resp.parameters.insert("param2".into(), json!(false));
        let top: Value = serde_json::from_slice(&encode(resp, &enc).unwrap().header).unwrap();
        assert_eq!(top["parameters"], json!({"param1": 42, "param2": false}));
    }

    #[test]
    fn header_length_beyond_body_and_short_binary_are_errors() {
        let hdr = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let shm = SharedMemory::default();
        assert!(decode(
            "m",
            None,
            Bytes::from_static(hdr),
            Some(hdr.len() + 1),
            &shm
        )
        .is_err());
        let e = decode("m", None, Bytes::from_static(hdr), Some(hdr.len()), &shm).unwrap_err();
        assert!(e.message.contains("binary data size"), "{}", e.message);
    }
}
