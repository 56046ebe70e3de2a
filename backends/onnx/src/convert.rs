//! Kiln tensors (bytes + type + shape) to candle tensors and back.
use candle_core::{DType, Device, Tensor};
use kiln_sdk::{DataType, Error, Result};

/// The candle type a protocol type is computed in (BOOL as U8).
pub fn dtype(dt: DataType) -> Option<DType> {
    Some(match dt {
        DataType::Bool | DataType::UInt8 => DType::U8,
        DataType::UInt16 | DataType::UInt32 => DType::U32,
        DataType::Int8 | DataType::Int16 => DType::I16,
        DataType::UInt64 => DType::I64,
        DataType::Int32 => DType::I32,
        DataType::Int64 => DType::I64,
        DataType::Fp16 => DType::F16,
        DataType::Bf16 => DType::BF16,
        DataType::Fp32 => DType::F32,
        DataType::Fp64 => DType::F64,
        _ => return None,
    })
}

/// An input's bytes as a tensor on `dev`.
pub fn to_tensor(dt: DataType, shape: &[i64], data: &[u8], dev: &Device) -> Result<Tensor> {
    let dims: Vec<usize> = shape.iter().map(|&x| x.max(0) as usize).collect();
    let err = |e: candle_core::Error| Error::invalid_arg(format!("input tensor: {e}"));
    // Types stored wider than on the wire are converted element by element.
    let widened = match dt {
        DataType::Int8 => Some(Tensor::from_vec(
            data.iter().map(|&b| b as i8 as i16).collect::<Vec<_>>(),
            dims.clone(),
            dev,
        )),
        DataType::UInt16 => Some(Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect::<Vec<_>>(),
            dims.clone(),
            dev,
        )),
        _ => None,
    };
    if let Some(t) = widened {
        return t.map_err(err);
    }
    let d = dtype(dt).ok_or_else(|| {
        Error::unsupported(format!(
            "the onnx backend does not compute in {}",
            dt.protocol_name()
        ))
    })?;
    Tensor::from_raw_buffer(data, d, &dims, dev).map_err(err)
}

/// A tensor's row-major bytes in protocol type `dt`.
pub fn to_bytes(t: &Tensor, dt: DataType) -> Result<Vec<u8>> {
    let want = dtype(dt)
        .ok_or_else(|| Error::unsupported(format!("output type {}", dt.protocol_name())))?;
    let t = t
        .to_device(&Device::Cpu)
        .and_then(|t| {
            if t.dtype() == want {
                Ok(t)
            } else {
                t.to_dtype(want)
            }
        })
        .and_then(|t| t.flatten_all())
        .map_err(|e| Error::internal(format!("output: {e}")))?;
    macro_rules! bytes {
        ($ty:ty) => {{
            let v: Vec<$ty> = t
                .to_vec1()
                .map_err(|e| Error::internal(format!("output: {e}")))?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }};
    }
    Ok(match (dt, want) {
        (DataType::Int8, _) => {
            let v: Vec<i16> = t
                .to_vec1()
                .map_err(|e| Error::internal(format!("output: {e}")))?;
            v.iter().map(|&x| x as i8 as u8).collect()
        }
        (DataType::UInt16, _) => {
            let v: Vec<u32> = t
                .to_vec1()
                .map_err(|e| Error::internal(format!("output: {e}")))?;
            v.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect()
        }
        (_, DType::U8) => bytes!(u8),
        (_, DType::U32) => bytes!(u32),
        (_, DType::I16) => bytes!(i16),
        (_, DType::I32) => bytes!(i32),
        (_, DType::I64) => bytes!(i64),
        (_, DType::F16) => bytes!(half::f16),
        (_, DType::BF16) => bytes!(half::bf16),
        (_, DType::F32) => bytes!(f32),
        (_, DType::F64) => bytes!(f64),
        _ => return Err(Error::unsupported("output type")),
    })
}

/// ONNX `TensorProto.DataType` → protocol type.
pub fn from_onnx(elem_type: i32) -> Option<DataType> {
    Some(match elem_type {
        1 => DataType::Fp32,
        2 => DataType::UInt8,
        3 => DataType::Int8,
        4 => DataType::UInt16,
        5 => DataType::Int16,
        6 => DataType::Int32,
        7 => DataType::Int64,
        8 => DataType::Bytes,
        9 => DataType::Bool,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        12 => DataType::UInt32,
        13 => DataType::UInt64,
        16 => DataType::Bf16,
        _ => return None,
    })
}

/// ONNX `TensorProto.DataType` → candle type.
pub fn onnx_dtype(elem_type: i32) -> Option<DType> {
    from_onnx(elem_type).and_then(dtype)
}

/// An ONNX `TensorProto` (initializer, Constant value, test data) as a tensor on the CPU,
/// with its declared shape. Types candle lacks are widened: INT8 → I16, UINT16 → U32,
/// UINT64 → I64 (wrapping above 2^63).
pub fn tensor_from_proto(t: &candle_onnx::onnx::TensorProto) -> candle_core::Result<Tensor> {
    use candle_core::bail;
    if !t.external_data.is_empty() {
        bail!(
            "tensor '{}' uses external data, which is not supported",
            t.name
        )
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = dims.iter().product();
    let raw = &t.raw_data;
    /// Values from `raw_data` (little-endian, `N` bytes each), else from the typed field.
    fn values<const N: usize, T>(
        raw: &[u8],
        decode: impl Fn([u8; N]) -> T,
        field: impl FnOnce() -> Vec<T>,
    ) -> Vec<T> {
        if raw.is_empty() {
            return field();
        }
        raw.chunks_exact(N)
            .map(|c| decode(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    let dev = &Device::Cpu;
    /// The `int32_data` field (where ONNX keeps 8- and 16-bit types), converted.
    fn ints<T>(d: &[i32], f: impl Fn(i32) -> T) -> Vec<T> {
        d.iter().map(|&x| f(x)).collect()
    }
    let i32s = &t.int32_data;
    if crate::lowbit::handles(t.data_type) {
        return crate::lowbit::decode(t.data_type, raw, i32s, &dims);
    }
    let tensor = match t.data_type {
        1 => Tensor::from_vec(
            values(raw, f32::from_le_bytes, || t.float_data.clone()),
            n,
            dev,
        )?,
        2 | 9 => Tensor::from_vec(
            values(raw, |[b]: [u8; 1]| b, || ints(i32s, |x| x as u8)),
            n,
            dev,
        )?,
        3 => {
            let v = values(
                raw,
                |[b]: [u8; 1]| b as i8 as i16,
                || ints(i32s, |x| x as i8 as i16),
            );
            Tensor::from_vec(v, n, dev)?
        }
        4 => {
            let v = values(
                raw,
                |b| u16::from_le_bytes(b) as u32,
                || ints(i32s, |x| x as u16 as u32),
            );
            Tensor::from_vec(v, n, dev)?
        }
        5 => Tensor::from_vec(
            values(raw, i16::from_le_bytes, || ints(i32s, |x| x as i16)),
            n,
            dev,
        )?,
        6 => Tensor::from_vec(
            values(raw, i32::from_le_bytes, || t.int32_data.clone()),
            n,
            dev,
        )?,
        7 => Tensor::from_vec(
            values(raw, i64::from_le_bytes, || t.int64_data.clone()),
            n,
            dev,
        )?,
        10 => {
            let v = values(
                raw,
                |b| half::f16::from_bits(u16::from_le_bytes(b)),
                || ints(i32s, |x| half::f16::from_bits(x as u16)),
            );
            Tensor::from_vec(v, n, dev)?
        }
        11 => Tensor::from_vec(
            values(raw, f64::from_le_bytes, || t.double_data.clone()),
            n,
            dev,
        )?,
        12 => {
            let field = || t.uint64_data.iter().map(|&x| x as u32).collect();
            Tensor::from_vec(values(raw, u32::from_le_bytes, field), n, dev)?
        }
        13 => {
            let field = || t.uint64_data.iter().map(|&x| x as i64).collect();
            Tensor::from_vec(values(raw, i64::from_le_bytes, field), n, dev)?
        }
        16 => {
            let v = values(
                raw,
                |b| half::bf16::from_bits(u16::from_le_bytes(b)),
                || ints(i32s, |x| half::bf16::from_bits(x as u16)),
            );
            Tensor::from_vec(v, n, dev)?
        }
        other => bail!(
            "tensor '{}' has ONNX data type {other}, which is not supported",
            t.name
        ),
    };
    tensor.reshape(dims)
}
