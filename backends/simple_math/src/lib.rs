//! `simple_math`: OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1, element-wise,
//! with two's-complement wrap-around. The element type comes from the model config:
//! TYPE_INT32 (`simple`, `simple_dynamic_batch`), TYPE_INT8 (`simple_int8`), or
//! TYPE_STRING holding decimal integers (`simple_string`, computed as int32).
use kiln_sdk::{
    export_backend, Backend, DataType, Error, Instance, InstanceInfo, Model, ModelInfo, Request,
    Response, Result,
};

struct SimpleMath;
struct MathModel;
struct MathInstance;

impl Backend for SimpleMath {
    type Model = MathModel;
    fn initialize() -> Result<Self> {
        Ok(SimpleMath)
    }
    fn load_model(&self, info: &ModelInfo) -> Result<MathModel> {
        for name in ["INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1"] {
            if !info.config_json.contains(&format!("\"{name}\"")) {
                return Err(Error::invalid_arg(format!(
                    "model '{}': simple_math needs tensors INPUT0, INPUT1, OUTPUT0, OUTPUT1; '{name}' is missing",
                    info.name
                )));
            }
        }
        Ok(MathModel)
    }
}

impl Model for MathModel {
    type Instance = MathInstance;
    fn new_instance(&self, _info: &InstanceInfo) -> Result<MathInstance> {
        Ok(MathInstance)
    }
}

fn parse_decimal(e: &[u8]) -> Result<i32> {
    std::str::from_utf8(e)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(|| {
            Error::invalid_arg(format!(
                "'{}' is not a decimal int32",
                String::from_utf8_lossy(e)
            ))
        })
}

impl Instance for MathInstance {
    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()> {
        let a = request.require_input("INPUT0")?;
        let b = request.require_input("INPUT1")?;
        if a.shape != b.shape || a.dtype != b.dtype {
            return Err(Error::invalid_arg(
                "INPUT0 and INPUT1 must have the same shape and type",
            ));
        }
        let (sum, diff): (Vec<u8>, Vec<u8>) = match a.dtype {
            DataType::Int32 => {
                let (x, y) = (a.to_vec::<i32>()?, b.to_vec::<i32>()?);
                (
                    x.iter()
                        .zip(&y)
                        .flat_map(|(p, q)| p.wrapping_add(*q).to_le_bytes())
                        .collect(),
                    x.iter()
                        .zip(&y)
                        .flat_map(|(p, q)| p.wrapping_sub(*q).to_le_bytes())
                        .collect(),
                )
            }
            DataType::Int8 => (
                a.data
                    .iter()
                    .zip(b.data)
                    .map(|(p, q)| (*p as i8).wrapping_add(*q as i8) as u8)
                    .collect(),
                a.data
                    .iter()
                    .zip(b.data)
                    .map(|(p, q)| (*p as i8).wrapping_sub(*q as i8) as u8)
                    .collect(),
            ),
            DataType::Bytes => {
                let x = a
                    .bytes_elements()?
                    .into_iter()
                    .map(parse_decimal)
                    .collect::<Result<Vec<_>>>()?;
                let y = b
                    .bytes_elements()?
                    .into_iter()
                    .map(parse_decimal)
                    .collect::<Result<Vec<_>>>()?;
                let s: Vec<String> = x
                    .iter()
                    .zip(&y)
                    .map(|(p, q)| p.wrapping_add(*q).to_string())
                    .collect();
                let d: Vec<String> = x
                    .iter()
                    .zip(&y)
                    .map(|(p, q)| p.wrapping_sub(*q).to_string())
                    .collect();
                if request.wants("OUTPUT0") {
                    response.output_bytes("OUTPUT0", a.shape, &s)?;
                }
                if request.wants("OUTPUT1") {
                    response.output_bytes("OUTPUT1", a.shape, &d)?;
                }
                return Ok(());
            }
            other => {
                return Err(Error::unsupported(format!(
                    "simple_math does not support {other}"
                )))
            }
        };
        if request.wants("OUTPUT0") {
            response
                .output("OUTPUT0", a.dtype, a.shape, sum.len())?
                .copy_from_slice(&sum);
        }
        if request.wants("OUTPUT1") {
            response
                .output("OUTPUT1", a.dtype, a.shape, diff.len())?
                .copy_from_slice(&diff);
        }
        Ok(())
    }
}

export_backend!(SimpleMath);
