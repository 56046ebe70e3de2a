//! Operators beyond the core set in `ops.rs`: rounding and tests (Round, IsInf,
//! ThresholdedRelu), index tricks along an axis (CumSum, Hardmax, OneHot, TopK, the
//! `select_last_index` of ArgMax/ArgMin, the edge/reflect/wrap modes of Pad) and ReduceProd.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::ops::{axis, i64s};

/// `x` reversed along `a`.
pub fn flip(x: &Tensor, a: usize) -> Result<Tensor> {
    let d = x.dim(a)?;
    let idx: Vec<u32> = (0..d as u32).rev().collect();
    x.index_select(&Tensor::new(idx, x.device())?, a)
}

/// Round half to even (ONNX Round), for float tensors: halfway values take 2·round(x/2).
pub fn round_half_even(x: &Tensor) -> Result<Tensor> {
    let r = x.round()?; // halfway away from zero
    let halfway = r.sub(x)?.abs()?.eq(0.5)?;
    let even = ((x / 2.0)?.round()? * 2.0)?;
    halfway.where_cond(&even, &r)
}

/// IsInf with `detect_positive` / `detect_negative`.
pub fn is_inf(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F64)?;
    let pos = x.eq(f64::INFINITY)?;
    let neg = x.eq(f64::NEG_INFINITY)?;
    let (dp, dn) = (
        attrs::int(node, "detect_positive", 1) != 0,
        attrs::int(node, "detect_negative", 1) != 0,
    );
    let zero = pos.zeros_like()?;
    let pos = if dp { pos } else { zero.clone() };
    let neg = if dn { neg } else { zero };
    pos.maximum(&neg)
}

/// ThresholdedRelu: `x` where `x > alpha`, else 0.
pub fn thresholded_relu(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let alpha = attrs::float(node, "alpha", 1.0) as f64;
    x.gt(alpha)?.where_cond(x, &x.zeros_like()?)
}

/// CumSum along the axis given as input 1, with `exclusive` and `reverse`.
pub fn cumsum(node: &NodeProto, x: &Tensor, axis_t: &Tensor) -> Result<Tensor> {
    let a = axis(*i64s(axis_t)?.first().unwrap_or(&0), x.rank())?;
    let reverse = attrs::int(node, "reverse", 0) != 0;
    let exclusive = attrs::int(node, "exclusive", 0) != 0;
    let dt = x.dtype();
    let mut y = x.to_dtype(DType::F64)?;
    if reverse {
        y = flip(&y, a)?;
    }
    let mut s = y.cumsum(a)?;
    if exclusive {
        s = (s - &y)?;
    }
    if reverse {
        s = flip(&s, a)?;
    }
    s.to_dtype(dt)
}

/// ArgMax/ArgMin with `select_last_index`: the arg of the flipped tensor, mirrored.
pub fn arg_last(op: &str, x: &Tensor, a: usize, keep: bool) -> Result<Tensor> {
    let d = x.dim(a)? as f64;
    let f = flip(x, a)?;
    let r = if op == "ArgMax" {
        f.argmax_keepdim(a)?
    } else {
        f.argmin_keepdim(a)?
    };
    let r = r
        .to_dtype(DType::F64)?
        .affine(-1.0, d - 1.0)?
        .to_dtype(DType::I64)?;
    if keep {
        Ok(r)
    } else {
        r.squeeze(a)
    }
}

/// Hardmax: 1 at the first maximum along the axis, 0 elsewhere (before opset 13 the input
/// is flattened to 2-D at the axis).
pub fn hardmax(node: &NodeProto, x: &Tensor, opset: i64) -> Result<Tensor> {
    let (x2, a) = if opset < 13 {
        let a = axis(attrs::int(node, "axis", 1), x.rank())?;
        let outer: usize = x.dims()[..a].iter().product();
        (x.reshape((outer, x.elem_count() / outer.max(1)))?, 1)
    } else {
        (x.clone(), axis(attrs::int(node, "axis", -1), x.rank())?)
    };
    let arg = x2.argmax_keepdim(a)?.to_dtype(DType::I64)?;
    let pos = Tensor::arange(0i64, x2.dim(a)? as i64, x.device())?;
    let mut shape = vec![1usize; x2.rank()];
    shape[a] = x2.dim(a)?;
    let hit = pos.reshape(shape)?.broadcast_eq(&arg)?;
    hit.to_dtype(x.dtype())?.reshape(x.dims())
}

/// OneHot(indices, depth, values [off, on]) with `axis`; negative indices count from depth.
pub fn one_hot(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(idx), Some(depth), Some(values)) = (get(0), get(1), get(2)) else {
        bail!("OneHot: needs indices, depth and values")
    };
    let depth = depth
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let depth = *depth.first().unwrap_or(&0.0) as i64;
    if depth <= 0 {
        bail!("OneHot: depth must be positive")
    }
    let r = idx.rank() + 1;
    let a = axis(attrs::int(node, "axis", -1), r)?;
    let idx = idx.to_dtype(DType::F64)?;
    // Negative indices wrap once.
    let idx = idx.lt(0.0)?.where_cond(&(&idx + depth as f64)?, &idx)?;
    let pos = Tensor::arange(0f64, depth as f64, idx.device())?;
    let mut pshape = vec![1usize; r];
    pshape[a] = depth as usize;
    let hit = pos.reshape(pshape)?.broadcast_eq(&idx.unsqueeze(a)?)?;
    let off = values.narrow(0, 0, 1)?.squeeze(0)?;
    let on = values.narrow(0, 1, 1)?.squeeze(0)?;
    let shape = hit.shape().clone();
    hit.where_cond(&on.broadcast_as(shape.clone())?, &off.broadcast_as(shape)?)
}

/// TopK: the `k` largest (or smallest) values along the axis and their indices; equal
/// values keep the lower index first.
pub fn top_k(node: &NodeProto, x: &Tensor, k: &Tensor) -> Result<Vec<Tensor>> {
    let k = *i64s(k)?.first().unwrap_or(&0);
    let a = axis(attrs::int(node, "axis", -1), x.rank())?;
    let largest = attrs::int(node, "largest", 1) != 0;
    let d = x.dim(a)?;
    if k < 0 || k as usize > d {
        bail!("TopK: k = {k} for an axis of {d}")
    }
    let k = k as usize;
    let moved = x.transpose(a, x.rank() - 1)?.contiguous()?;
    let rows = moved.elem_count() / d.max(1);
    let data: Vec<f64> = moved.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (mut vals, mut idxs) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    for row in data.chunks(d.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&i, &j| {
            let c = row[i].total_cmp(&row[j]);
            (if largest { c.reverse() } else { c }).then(i.cmp(&j))
        });
        for &i in order.iter().take(k) {
            vals.push(row[i]);
            idxs.push(i as i64);
        }
    }
    let mut shape = moved.dims().to_vec();
    *shape.last_mut().unwrap_or(&mut 0) = k;
    let back = |t: Tensor| t.transpose(a, x.rank() - 1)?.contiguous();
    let v = back(Tensor::from_vec(vals, shape.clone(), &Device::Cpu)?)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    let i = back(Tensor::from_vec(idxs, shape, &Device::Cpu)?)?.to_device(x.device())?;
    Ok(vec![v, i])
}

/// Product over `a`, keeping the axis.
fn prod_keepdim(x: &Tensor, a: usize) -> Result<Tensor> {
    let d = x.dim(a)?;
    let mut acc = x.narrow(a, 0, 1.min(d))?;
    if d == 0 {
        let mut shape = x.dims().to_vec();
        shape[a] = 1;
        return Tensor::ones(shape, x.dtype(), x.device());
    }
    for i in 1..d {
        acc = acc.mul(&x.narrow(a, i, 1)?)?;
    }
    Ok(acc)
}

/// ReduceProd over `axes` (sorted, deduplicated).
pub fn reduce_prod(x: &Tensor, axes: &[usize], keep: bool) -> Result<Tensor> {
    let mut y = x.clone();
    for &a in axes.iter().rev() {
        y = prod_keepdim(&y, a)?;
    }
    if !keep {
        for &a in axes.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

/// Pad in `edge`, `reflect` or `wrap` mode along `a` by (`lo`, `hi`) (both ≥ 0).
pub fn pad_mode(x: &Tensor, a: usize, lo: usize, hi: usize, mode: &str) -> Result<Tensor> {
    let d = x.dim(a)? as i64;
    if d == 0 {
        bail!("Pad: cannot pad an empty axis in {mode} mode")
    }
    let idx: Vec<u32> = (-(lo as i64)..d + hi as i64)
        .map(|p| {
            let i = match mode {
                "edge" => p.clamp(0, d - 1),
                "wrap" => p.rem_euclid(d),
                _ if d == 1 => 0, // reflect of one element
                _ => {
                    let period = 2 * (d - 1);
                    let q = p.rem_euclid(period);
                    if q >= d {
                        period - q
                    } else {
                        q
                    }
                }
            };
            i as u32
        })
        .collect();
    x.index_select(&Tensor::new(idx, x.device())?, a)
}
