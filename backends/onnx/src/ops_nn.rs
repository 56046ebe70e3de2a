//! More neural-network operators found in exported vision and generative models:
//! PRelu, HardSwish, Mish, Celu, Shrink, the inverse and hyperbolic trigonometric functions,
//! IsNaN, InstanceNormalization, GroupNormalization, MeanVarianceNormalization,
//! DepthToSpace/SpaceToDepth, NonZero, GatherND, EyeLike, the bitwise operators and LpPool.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::ops::{axis, i64s};

/// `f` on every value, computed in f64 on the host, back in `x`'s type and device.
pub fn host_map(x: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let out: Vec<f64> = v.into_iter().map(f).collect();
    crate::ops::like(out, x.dims(), x)
}

/// One-input functions by name (those candle lacks), or `None`.
pub fn unary(node: &NodeProto, x: &Tensor) -> Result<Option<Tensor>> {
    let alpha = attrs::float(node, "alpha", 1.0) as f64;
    let bias = attrs::float(node, "bias", 0.0) as f64;
    let lambd = attrs::float(node, "lambd", 0.5) as f64;
    let f: Box<dyn Fn(f64) -> f64> = match node.op_type.as_str() {
        "Tan" => Box::new(f64::tan),
        "Asin" => Box::new(f64::asin),
        "Acos" => Box::new(f64::acos),
        "Atan" => Box::new(f64::atan),
        "Sinh" => Box::new(f64::sinh),
        "Cosh" => Box::new(f64::cosh),
        "Asinh" => Box::new(f64::asinh),
        "Acosh" => Box::new(f64::acosh),
        "Atanh" => Box::new(f64::atanh),
        "HardSwish" => Box::new(|v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
        "Mish" => Box::new(|v| v * (v.exp().ln_1p()).tanh()),
        "Celu" => Box::new(move |v| v.max(0.0) + (alpha * ((v / alpha).exp() - 1.0)).min(0.0)),
        "Shrink" => Box::new(move |v| {
            if v < -lambd {
                v + bias
            } else if v > lambd {
                v - bias
            } else {
                0.0
            }
        }),
        _ => return Ok(None),
    };
    host_map(x, f).map(Some)
}

/// IsNaN as a boolean (U8) tensor.
pub fn is_nan(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let out: Vec<u8> = v.iter().map(|v| v.is_nan() as u8).collect();
    Tensor::from_vec(out, x.dims(), &Device::Cpu)?.to_device(x.device())
}

/// PRelu: `x` where positive, `slope · x` elsewhere (slope broadcast as ONNX does).
pub fn prelu(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    let neg = x.broadcast_mul(&slope.to_dtype(x.dtype())?)?;
    x.ge(0.0)?.where_cond(x, &neg)
}

/// Normalises `x` over the dimensions from `from` on within each group of rows:
/// `(x − mean) / √(var + eps)`, in f64.
fn normalise(x: &Tensor, rows: usize, eps: f64) -> Result<Vec<f64>> {
    let mut v: Vec<f64> = crate::ops::f64s(x)?;
    let width = v.len() / rows.max(1);
    if width == 0 {
        return Ok(v);
    }
    for row in v.chunks_mut(width) {
        let mean = row.iter().sum::<f64>() / width as f64;
        let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / width as f64;
        let inv = 1.0 / (var + eps).sqrt();
        row.iter_mut().for_each(|a| *a = (*a - mean) * inv);
    }
    Ok(v)
}

/// InstanceNormalization(`x [n, c, ...]`, `scale [c]`, `bias [c]`).
pub fn instance_norm(
    node: &NodeProto,
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let eps = attrs::float(node, "epsilon", 1e-5) as f64;
    if x.rank() < 2 {
        bail!("InstanceNormalization: input must be [N, C, ...]")
    }
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let v = normalise(x, n * c, eps)?;
    let t = Tensor::from_vec(v, x.dims(), &Device::Cpu)?.to_device(x.device())?;
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    let f = |p: &Tensor| p.to_dtype(DType::F64)?.reshape(shape.clone());
    t.broadcast_mul(&f(scale)?)?
        .broadcast_add(&f(bias)?)?
        .to_dtype(x.dtype())
}

/// GroupNormalization(x [n, c, ...], scale, bias) with `num_groups`; scale and bias are per
/// channel (opset 21) or per group (opset 18).
pub fn group_norm(node: &NodeProto, x: &Tensor, scale: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let eps = attrs::float(node, "epsilon", 1e-5) as f64;
    let groups = attrs::int(node, "num_groups", 1).max(1) as usize;
    if x.rank() < 2 || !x.dims()[1].is_multiple_of(groups) {
        bail!(
            "GroupNormalization: {groups} groups do not divide the channels of {:?}",
            x.dims()
        )
    }
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let v = normalise(x, n * groups, eps)?;
    let t = Tensor::from_vec(v, x.dims(), &Device::Cpu)?.to_device(x.device())?;
    let per_channel = |p: &Tensor| -> Result<Tensor> {
        let p = p.to_dtype(DType::F64)?.flatten_all()?;
        let p = if p.elem_count() == groups && groups != c {
            // One value per group: repeat it for the group's channels.
            p.reshape((groups, 1))?
                .repeat((1, c / groups))?
                .flatten_all()?
        } else {
            p
        };
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        p.reshape(shape)
    };
    t.broadcast_mul(&per_channel(scale)?)?
        .broadcast_add(&per_channel(bias)?)?
        .to_dtype(x.dtype())
}

/// MeanVarianceNormalization over `axes` (default 0, 2, 3).
pub fn mvn(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let axes: Vec<usize> = attrs::ints(node, "axes")
        .unwrap_or_else(|| vec![0, 2, 3])
        .iter()
        .map(|&a| axis(a, x.rank()))
        .collect::<Result<_>>()?;
    let xf = x.to_dtype(DType::F64)?;
    let mut mean = xf.clone();
    for &a in &axes {
        mean = mean.mean_keepdim(a)?;
    }
    let c = xf.broadcast_sub(&mean)?;
    let mut var = c.sqr()?;
    for &a in &axes {
        var = var.mean_keepdim(a)?;
    }
    c.broadcast_div(&(var.sqrt()? + 1e-9)?)?.to_dtype(x.dtype())
}

/// DepthToSpace (`DCR` or `CRD`) and SpaceToDepth with `blocksize`.
pub fn depth_space(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let b = attrs::int(node, "blocksize", 1).max(1) as usize;
    let (n, c, h, w) = x.dims4()?;
    if node.op_type == "SpaceToDepth" {
        if h % b != 0 || w % b != 0 {
            bail!("SpaceToDepth: blocksize {b} does not divide {h}×{w}")
        }
        return x
            .reshape(&[n, c, h / b, b, w / b, b][..])?
            .permute(vec![0, 3, 5, 1, 2, 4])?
            .reshape((n, c * b * b, h / b, w / b));
    }
    if c % (b * b) != 0 {
        bail!("DepthToSpace: blocksize {b}² does not divide {c} channels")
    }
    let co = c / (b * b);
    let t = if attrs::string(node, "mode", "DCR") == "CRD" {
        x.reshape(&[n, co, b, b, h, w][..])?
            .permute(vec![0, 1, 4, 2, 5, 3])?
    } else {
        x.reshape(&[n, b, b, co, h, w][..])?
            .permute(vec![0, 3, 4, 1, 5, 2])?
    };
    t.reshape((n, co, h * b, w * b))
}

/// NonZero: the coordinates of non-zero values, `[rank, count]` int64.
pub fn non_zero(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let dims = x.dims();
    let hits: Vec<usize> = (0..v.len()).filter(|&i| v[i] != 0.0).collect();
    let r = dims.len().max(1);
    let mut out = vec![0i64; r * hits.len()];
    for (k, &i) in hits.iter().enumerate() {
        let mut rest = i;
        for d in (0..dims.len()).rev() {
            out[d * hits.len() + k] = (rest % dims[d]) as i64;
            rest /= dims[d];
        }
    }
    Tensor::from_vec(out, (r, hits.len()), &Device::Cpu)?.to_device(x.device())
}

/// GatherND with `batch_dims`.
pub fn gather_nd(node: &NodeProto, data: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let bd = attrs::int(node, "batch_dims", 0).max(0) as usize;
    let q = *idx.dims().last().unwrap_or(&0);
    let (dd, id) = (data.dims(), idx.dims());
    if bd + q > dd.len() || id.len() < bd + 1 || dd[..bd] != id[..bd] {
        bail!("GatherND: indices {id:?} do not fit data {dd:?} with batch_dims {bd}")
    }
    let v: Vec<f64> = crate::ops::f64s(data)?;
    let ix = i64s(idx)?;
    let batches: usize = dd[..bd].iter().product();
    let per_batch_data: usize = dd[bd..].iter().product();
    let slice: usize = dd[bd + q..].iter().product();
    let tuples_per_batch: usize = id[bd..id.len() - 1].iter().product();
    let mut out = Vec::with_capacity(batches * tuples_per_batch * slice);
    for b in 0..batches {
        for t in 0..tuples_per_batch {
            let tuple = &ix[(b * tuples_per_batch + t) * q..(b * tuples_per_batch + t + 1) * q];
            let mut at = 0usize;
            for (d, &i) in tuple.iter().enumerate() {
                let len = dd[bd + d] as i64;
                let i = if i < 0 { i + len } else { i };
                if !(0..len).contains(&i) {
                    bail!("GatherND: index {i} out of range for an axis of {len}")
                }
                at = at * dd[bd + d] + i as usize;
            }
            let start = b * per_batch_data + at * slice;
            out.extend_from_slice(&v[start..start + slice]);
        }
    }
    let mut shape = id[..id.len() - 1].to_vec();
    shape.extend(&dd[bd + q..]);
    crate::ops::like(out, shape, data)
}

/// EyeLike: ones on the `k`-th diagonal of a 2-D tensor shaped like `x`.
pub fn eye_like(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    let k = attrs::int(node, "k", 0);
    let mut v = vec![0f64; r * c];
    for i in 0..r as i64 {
        let j = i + k;
        if (0..c as i64).contains(&j) {
            v[i as usize * c + j as usize] = 1.0;
        }
    }
    let dt = match attrs::int(node, "dtype", 0) {
        0 => x.dtype(),
        t => crate::convert::onnx_dtype(t as i32).unwrap_or(x.dtype()),
    };
    Tensor::from_vec(v, (r, c), &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(x.device())
}

/// BitwiseAnd/Or/Xor, BitShift (two inputs, broadcast) and BitwiseNot, on integers.
pub fn bitwise(node: &NodeProto, a: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let op = node.op_type.as_str();
    let dims = match b {
        Some(b) => a
            .shape()
            .broadcast_shape_binary_op(b.shape(), "bitwise")?
            .dims()
            .to_vec(),
        None => a.dims().to_vec(),
    };
    let ints = |t: &Tensor| -> Result<Vec<i64>> {
        t.to_dtype(DType::I64)?
            .broadcast_as(dims.clone())?
            .flatten_all()?
            .to_vec1()
    };
    let x = ints(a)?;
    let y = match b {
        Some(b) => ints(b)?,
        None => vec![0; x.len()],
    };
    // Unsigned types shift as unsigned of their width.
    let bits = match a.dtype() {
        DType::U8 => 8,
        DType::U32 => 32,
        _ => 64,
    };
    let mask = if bits == 64 {
        -1i64
    } else {
        (1i64 << bits) - 1
    };
    let left = attrs::string(node, "direction", "LEFT") == "LEFT";
    let out: Vec<i64> = x
        .iter()
        .zip(&y)
        .map(|(&p, &q)| match op {
            "BitwiseAnd" => p & q,
            "BitwiseOr" => p | q,
            "BitwiseXor" => p ^ q,
            "BitShift" if left => (p << (q & 63)) & mask,
            "BitShift" => ((p as u64 & mask as u64) >> (q & 63)) as i64,
            _ => !p & mask, // BitwiseNot
        })
        .collect();
    crate::ops::like(out, dims, a)
}

/// LpPool: the p-norm over each window (`p` attribute, default 2).
pub fn lp_pool(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let p = attrs::int(node, "p", 2).max(1) as f64;
    // Σ|x|^p over the window = mean with every position counted · taps.
    let w = crate::pool::window(node, &x.dims()[2..], None)?;
    let taps: usize = w.kernel.iter().product();
    let powered = host_map(&x.to_dtype(DType::F32)?, |v| v.abs().powf(p))?;
    let data: Vec<f32> = powered.flatten_all()?.to_vec1()?;
    let planes = x.dims()[0] * x.dims()[1];
    let sums: Vec<f64> = w
        .pool(&data, planes, false, true)
        .iter()
        .map(|&m| (m as f64 * taps as f64).powf(1.0 / p))
        .collect();
    let mut dims = x.dims()[..2].to_vec();
    dims.extend(&w.output);
    crate::ops::like(sums, dims, x)
}
