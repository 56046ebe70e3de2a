//! Tensor data in JSON (`"data": [...]`, flat or nested) to and from raw bytes.
use kiln_core::DataType;
use serde_json::Value;

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

macro_rules! ints {
    ($vals:expr, $ty:ty, $name:expr, $out:expr) => {{
        for v in $vals {
            if !v.is_i64() && !v.is_u64() {
                // tritonserver's words for a value of the wrong JSON type.
                let kind = if <$ty>::MIN == 0 { "unsigned-integer" } else { "signed-integer" };
                return Err(format!(
                    "unable to parse 'data' of input '{}': attempt to access JSON non-{kind} as {kind}, got {v}",
                    $name
                ));
            }
            let x = v
                .as_i64()
                .and_then(|i| <$ty>::try_from(i).ok())
                .or_else(|| v.as_u64().and_then(|u| <$ty>::try_from(u).ok()))
                .ok_or_else(|| {
                    format!(
                        "unable to parse 'data' of input '{}': {} is out of range for {}",
                        $name,
                        v,
                        stringify!($ty)
                    )
                })?;
            $out.extend_from_slice(&x.to_le_bytes());
        }
    }};
}

/// Converts JSON `data` of input `name` into raw bytes for `count` elements.
pub fn json_to_bytes(
    name: &str,
    dtype: DataType,
    data: &Value,
    count: usize,
) -> Result<Vec<u8>, String> {
    // Sized by what the request holds, never by the count its shape claims.
    let mut vals = Vec::new();
    flatten(data, &mut vals);
    if vals.len() != count {
        return Err(format!(
            "unable to parse 'data' of input '{name}': expected {count} elements for its shape, got {}",
            vals.len()
        ));
    }
    let mut out = Vec::with_capacity(vals.len() * dtype.element_size().unwrap_or(8));
    match dtype {
        DataType::Bool => {
            for v in vals {
                let b = v.as_bool().ok_or_else(|| format!("unable to parse 'data' of input '{name}': attempt to access JSON non-boolean as boolean, got {v}"))?;
                out.push(b as u8);
            }
        }
        DataType::UInt8 => ints!(vals, u8, name, out),
        DataType::UInt16 => ints!(vals, u16, name, out),
        DataType::UInt32 => ints!(vals, u32, name, out),
        DataType::UInt64 => ints!(vals, u64, name, out),
        DataType::Int8 => ints!(vals, i8, name, out),
        DataType::Int16 => ints!(vals, i16, name, out),
        DataType::Int32 => ints!(vals, i32, name, out),
        DataType::Int64 => ints!(vals, i64, name, out),
        DataType::Fp32 | DataType::Fp64 => {
            for v in vals {
                let f = v.as_f64().ok_or_else(|| format!("unable to parse 'data' of input '{name}': attempt to access JSON non-number as double, got {v}"))?;
                if dtype == DataType::Fp32 {
                    out.extend_from_slice(&(f as f32).to_le_bytes());
                } else {
                    out.extend_from_slice(&f.to_le_bytes());
                }
            }
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(format!(
                "receiving {dtype} data via JSON is not supported. Please use the binary data format for input '{name}'"
            ))
        }
        DataType::Bytes => {
            for v in vals {
                let s = v.as_str().ok_or_else(|| format!("unable to parse 'data' of input '{name}': attempt to access JSON non-string as string, got {v}"))?;
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    Ok(out)
}

fn num<T: Into<serde_json::Number>>(x: T) -> Value {
    Value::Number(x.into())
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// Converts an output's raw bytes into a flat JSON array.
pub fn bytes_to_json(name: &str, dtype: DataType, data: &[u8]) -> Result<Value, String> {
    macro_rules! map {
        ($ty:ty, $n:expr, $f:expr) => {
            data.chunks_exact($n)
                .map(|c| $f(<$ty>::from_le_bytes(c.try_into().unwrap_or([0; $n]))))
                .collect()
        };
    }
    let v: Vec<Value> = match dtype {
        DataType::Bool => data.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::UInt8 => data.iter().map(|&b| num(b)).collect(),
        DataType::Int8 => data.iter().map(|&b| num(b as i8)).collect(),
        DataType::UInt16 => map!(u16, 2, num),
        DataType::Int16 => map!(i16, 2, num),
        DataType::UInt32 => map!(u32, 4, num),
        DataType::Int32 => map!(i32, 4, num),
        DataType::UInt64 => map!(u64, 8, num),
        DataType::Int64 => map!(i64, 8, num),
        DataType::Fp32 => map!(f32, 4, |x: f32| float(x as f64)),
        DataType::Fp64 => map!(f64, 8, float),
        DataType::Fp16 | DataType::Bf16 => {
            return Err(format!(
                "sending {dtype} data via JSON is not supported. Please use the binary data format for output '{name}'"
            ))
        }
        DataType::Bytes => kiln_core::bytes_elements(data)
            .map(|e| Value::String(String::from_utf8_lossy(e.unwrap_or_default()).into_owned()))
            .collect(),
    };
    Ok(Value::Array(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_flat_data_match() {
        let a = json_to_bytes("x", DataType::Int32, &json!([[1, 2], [3, -4]]), 4).unwrap();
        let b = json_to_bytes("x", DataType::Int32, &json!([1, 2, 3, -4]), 4).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            bytes_to_json("x", DataType::Int32, &a).unwrap(),
            json!([1, 2, 3, -4])
        );
    }

    #[test]
    fn rejects_wrong_count_range_and_type() {
        assert!(json_to_bytes("x", DataType::Int32, &json!([1, 2]), 3).is_err());
        assert!(json_to_bytes("x", DataType::Int8, &json!([200]), 1).is_err());
        assert!(json_to_bytes("x", DataType::Fp32, &json!(["a"]), 1).is_err());
        assert!(json_to_bytes("x", DataType::Fp16, &json!([1.0]), 1).is_err());
    }

    #[test]
    fn strings_roundtrip() {
        let b = json_to_bytes("s", DataType::Bytes, &json!(["ab", ""]), 2).unwrap();
        assert_eq!(b, vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(
            bytes_to_json("s", DataType::Bytes, &b).unwrap(),
            json!(["ab", ""])
        );
    }
}
