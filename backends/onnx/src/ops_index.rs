//! Operators that move values by index or select them: ScatterElements, ScatterND,
//! NonMaxSuppression, and the linear (de)quantization of quantized models. They run on the
//! host in f64 (exact for every integer up to 2^53), then convert back.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::cpu_kernels::strides;
use crate::ops::{axis, f64s, i64s, like};

/// Combines an existing value with an update per `reduction`.
fn reduce(reduction: &str, old: f64, new: f64) -> f64 {
    match reduction {
        "add" => old + new,
        "mul" => old * new,
        "max" => old.max(new),
        "min" => old.min(new),
        _ => new,
    }
}

/// ScatterElements (and the older Scatter): `data` with `updates` written at `indices`
/// along `axis`.
pub fn scatter_elements(
    node: &NodeProto,
    data: &Tensor,
    idx: &Tensor,
    upd: &Tensor,
) -> Result<Tensor> {
    let a = axis(attrs::int(node, "axis", 0), data.rank())?;
    let reduction = attrs::string(node, "reduction", "none");
    if idx.dims() != upd.dims() || idx.rank() != data.rank() {
        bail!(
            "ScatterElements: indices {:?} and updates {:?} must match and have data's rank",
            idx.dims(),
            upd.dims()
        )
    }
    let (mut out, ix, up) = (f64s(data)?, i64s(idx)?, f64s(upd)?);
    let (ds, is) = (strides(data.dims()), strides(idx.dims()));
    let len = data.dims()[a] as i64;
    for (k, (&i, &u)) in ix.iter().zip(&up).enumerate() {
        let i = if i < 0 { i + len } else { i };
        if !(0..len).contains(&i) {
            bail!("ScatterElements: index {i} out of range for an axis of {len}")
        }
        let mut at = 0;
        for d in 0..data.rank() {
            let c = if d == a {
                i as usize
            } else {
                (k / is[d]) % idx.dims()[d]
            };
            at += c * ds[d];
        }
        out[at] = reduce(&reduction, out[at], u);
    }
    like(out, data.dims(), data)
}

/// ScatterND: `updates` slices written at the index tuples of `indices`' last axis.
pub fn scatter_nd(node: &NodeProto, data: &Tensor, idx: &Tensor, upd: &Tensor) -> Result<Tensor> {
    let reduction = attrs::string(node, "reduction", "none");
    let q = *idx.dims().last().unwrap_or(&0);
    if q > data.rank() {
        bail!(
            "ScatterND: index tuples of {q} for data of rank {}",
            data.rank()
        )
    }
    let (mut out, ix, up) = (f64s(data)?, i64s(idx)?, f64s(upd)?);
    let ds = strides(data.dims());
    let slice: usize = data.dims()[q..].iter().product();
    for (t, tuple) in ix.chunks(q.max(1)).enumerate().take(ix.len() / q.max(1)) {
        let mut at = 0;
        for (d, &i) in tuple.iter().enumerate() {
            let len = data.dims()[d] as i64;
            let i = if i < 0 { i + len } else { i };
            if !(0..len).contains(&i) {
                bail!("ScatterND: index {i} out of range for an axis of {len}")
            }
            at += i as usize * ds[d];
        }
        for j in 0..slice {
            let u = *up.get(t * slice + j).unwrap_or(&0.0);
            out[at + j] = reduce(&reduction, out[at + j], u);
        }
    }
    like(out, data.dims(), data)
}

/// NonMaxSuppression: per batch and class, boxes by descending score, each kept unless it
/// overlaps an already kept one by more than the IoU threshold. Output `[k, 3]` int64
/// rows `(batch, class, box)`.
pub fn non_max_suppression(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .filter(|t| t.elem_count() > 0)
    };
    let (Some(boxes), Some(scores)) = (get(0), get(1)) else {
        bail!("NonMaxSuppression: needs boxes and scores")
    };
    let scalar = |i: usize, default: f64| -> Result<f64> {
        Ok(match get(i) {
            Some(t) => *f64s(t)?.first().unwrap_or(&default),
            None => default,
        })
    };
    let max_out = scalar(2, 0.0)?.max(0.0) as usize;
    let iou_max = scalar(3, 0.0)?;
    let min_score = get(4)
        .map(f64s)
        .transpose()?
        .and_then(|v| v.first().copied());
    let center = attrs::int(node, "center_point_box", 0) != 0;
    if boxes.rank() != 3 || scores.rank() != 3 {
        bail!(
            "NonMaxSuppression: boxes {:?} and scores {:?} must be 3-D",
            boxes.dims(),
            scores.dims()
        )
    }
    let (nb, nbox) = (boxes.dims()[0], boxes.dims()[1]);
    let nc = scores.dims()[1];
    if boxes.dims() != [nb, nbox, 4] || scores.dims() != [nb, nc, nbox] {
        bail!(
            "NonMaxSuppression: boxes {:?} and scores {:?} do not match",
            boxes.dims(),
            scores.dims()
        )
    }
    let (bv, sv) = (f64s(boxes)?, f64s(scores)?);
    // Corners (y1, x1, y2, x2), ordered.
    let corners = |b: usize, i: usize| {
        let p = &bv[(b * nbox + i) * 4..(b * nbox + i) * 4 + 4];
        if center {
            let (xc, yc, w, h) = (p[0], p[1], p[2], p[3]);
            [yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]
        } else {
            [
                p[0].min(p[2]),
                p[1].min(p[3]),
                p[0].max(p[2]),
                p[1].max(p[3]),
            ]
        }
    };
    let iou = |a: [f64; 4], b: [f64; 4]| {
        let ih = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let iw = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = ih * iw;
        let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    };
    let mut out: Vec<i64> = Vec::new();
    for b in 0..nb {
        for c in 0..nc {
            let s = &sv[(b * nc + c) * nbox..(b * nc + c + 1) * nbox];
            let mut order: Vec<usize> = (0..nbox)
                .filter(|&i| min_score.is_none_or(|m| s[i] > m))
                .collect();
            order.sort_by(|&i, &j| s[j].total_cmp(&s[i]).then(i.cmp(&j)));
            let mut kept: Vec<usize> = Vec::new();
            for i in order {
                if kept.len() >= max_out {
                    break;
                }
                if kept
                    .iter()
                    .all(|&k| iou(corners(b, k), corners(b, i)) <= iou_max)
                {
                    kept.push(i);
                    out.extend([b as i64, c as i64, i as i64]);
                }
            }
        }
    }
    let rows = out.len() / 3;
    Tensor::from_vec(out, (rows, 3), &Device::Cpu)?.to_device(boxes.device())
}

/// Per-axis (or per-tensor) broadcast of a quantization parameter against `x`.
fn along_axis(p: &Tensor, x: &Tensor, a: usize) -> Result<Tensor> {
    if p.rank() == 1 && p.elem_count() > 1 {
        let mut shape = vec![1usize; x.rank()];
        shape[a] = p.elem_count();
        p.reshape(shape)
    } else {
        Ok(p.clone())
    }
}

/// A quantization parameter broadcast against `x`: per tensor, per `axis`, or with
/// `block_size` (opset 21) per block of that many elements along `axis` (the parameter
/// then has `x`'s rank, `ceil(n / block_size)` along `axis`).
fn fit_param(node: &NodeProto, p: &Tensor, x: &Tensor, a: usize) -> Result<Tensor> {
    let block = attrs::int(node, "block_size", 0);
    if block <= 0 {
        return along_axis(p, x, a);
    }
    let a = axis(attrs::int(node, "axis", 1), x.rank())?;
    let (n, bs) = (x.dims()[a], block as usize);
    if p.rank() != x.rank() || p.dims()[a] != n.div_ceil(bs) {
        bail!(
            "{}: a parameter of shape {:?} does not block {:?} by {bs} along axis {a}",
            node.op_type,
            p.dims(),
            x.dims()
        )
    }
    let mut wide = p.dims().to_vec();
    wide.insert(a + 1, bs);
    let mut merged = p.dims().to_vec();
    merged[a] *= bs;
    p.unsqueeze(a + 1)?
        .broadcast_as(wide)?
        .reshape(merged)?
        .narrow(a, 0, n)
}

/// The axis of per-axis parameters (a 1-D scale of more than one value); 0 otherwise.
fn param_axis(node: &NodeProto, scale: &Tensor, x: &Tensor) -> Result<usize> {
    if scale.rank() == 1 && scale.elem_count() > 1 {
        axis(attrs::int(node, "axis", 1), x.rank())
    } else {
        Ok(0)
    }
}

/// DequantizeLinear: `(x − zero_point) · scale`, per tensor or per `axis`.
pub fn dequantize(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(scale)) = (get(0), get(1)) else {
        bail!("DequantizeLinear: needs x and x_scale")
    };
    let a = param_axis(node, scale, x)?;
    let xf = x.to_dtype(DType::F32)?;
    let centred = match get(2) {
        Some(zp) => xf.broadcast_sub(&fit_param(node, &zp.to_dtype(DType::F32)?, x, a)?)?,
        None => xf,
    };
    centred
        .broadcast_mul(&fit_param(node, &scale.to_dtype(DType::F32)?, x, a)?)?
        .to_dtype(scale.dtype())
}

/// QuantizeLinear: `saturate(round_half_even(x / scale) + zero_point)` into the zero
/// point's type (UINT8 without one). A widened INT8 (I16 here) saturates to INT8's range.
pub fn quantize(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(scale)) = (get(0), get(1)) else {
        bail!("QuantizeLinear: needs x and y_scale")
    };
    let a = param_axis(node, scale, x)?;
    let zp = get(2);
    // The output type: the zero point's (its ONNX type as the planner marked it, since
    // INT8 and INT16 are both I16 here), else `output_dtype` (opset 21), else UINT8.
    let onnx_type = match (attrs::int(node, crate::ops::ZERO_POINT_TYPE, 0), zp) {
        (0, Some(z)) => match z.dtype() {
            DType::I16 => 3,
            DType::U32 => 4,
            DType::I32 => 6,
            _ => 2,
        },
        (0, None) => attrs::int(node, "output_dtype", 2),
        (t, _) => t,
    };
    let onnx_type = onnx_type as i32;
    let (out, lo, hi) = match onnx_type {
        t if crate::lowbit::handles(t) => (DType::F32, 0.0, 0.0),
        2 => (DType::U8, 0.0, 255.0),
        3 => (DType::I16, -128.0, 127.0),
        4 => (DType::U32, 0.0, 65535.0),
        5 => (DType::I16, -32768.0, 32767.0),
        6 => (DType::I32, i32::MIN as f64, i32::MAX as f64),
        other => bail!("QuantizeLinear: output type {other} is not supported"),
    };
    // x / scale in x's own precision (f32 unless f64), as ONNX's reference does.
    let dt = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let q = x
        .to_dtype(dt)?
        .broadcast_div(&fit_param(node, &scale.to_dtype(dt)?, x, a)?)?
        .to_dtype(DType::F64)?;
    let zero = |q: Tensor| match zp {
        Some(z) => q.broadcast_add(&fit_param(node, &z.to_dtype(DType::F64)?, x, a)?),
        None => Ok(q),
    };
    if crate::lowbit::handles(onnx_type) {
        // An 8-bit float rounds (and saturates) as its Cast does; a 4-bit integer is
        // rounded before its zero point is added, as the wider integers.
        let saturate = attrs::int(node, "saturate", 1) != 0;
        let q = if matches!(onnx_type, crate::lowbit::INT4 | crate::lowbit::UINT4) {
            crate::ops_more::round_half_even(&q)?
        } else {
            q
        };
        return crate::lowbit::cast(&zero(q)?, onnx_type, saturate);
    }
    let q = zero(crate::ops_more::round_half_even(&q)?)?;
    q.clamp(lo, hi)?.to_dtype(out)
}

/// NegativeLogLikelihoodLoss on host values: `input` `[n, c, d...]` (log-probabilities),
/// `target` `[n, d...]`, optional class `weight` `[c]`; returns the loss (shape `[n, d...]`
/// for reduction `none`, else a scalar).
fn nll(
    node: &NodeProto,
    input: &[f64],
    dims: &[usize],
    target: &[i64],
    weight: Option<&[f64]>,
) -> Result<(Vec<f64>, Vec<usize>)> {
    let (n, c) = (dims[0], dims[1]);
    let inner: usize = dims[2..].iter().product();
    let ignore = attrs::has(node, "ignore_index").then(|| attrs::int(node, "ignore_index", 0));
    let reduction = attrs::string(node, "reduction", "mean");
    let (mut loss, mut wsum) = (vec![0f64; n * inner], 0f64);
    for i in 0..n {
        for j in 0..inner {
            let t = target[i * inner + j];
            if Some(t) == ignore {
                continue;
            }
            if !(0..c as i64).contains(&t) {
                bail!("{}: target {t} is not a class of {c}", node.op_type)
            }
            let w = weight.map_or(1.0, |w| w[t as usize]);
            loss[i * inner + j] = -input[(i * c + t as usize) * inner + j] * w;
            wsum += w;
        }
    }
    Ok(match reduction.as_str() {
        "none" => {
            let mut shape = vec![n];
            shape.extend(&dims[2..]);
            (loss, shape)
        }
        "sum" => (vec![loss.iter().sum()], vec![]),
        _ => (vec![loss.iter().sum::<f64>() / wsum], vec![]),
    })
}

/// NegativeLogLikelihoodLoss(input, target, weight?).
pub fn nll_loss(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(t)) = (get(0), get(1)) else {
        bail!("NegativeLogLikelihoodLoss: needs input and target")
    };
    if x.rank() < 2 {
        bail!("NegativeLogLikelihoodLoss: input must be [N, C, ...]")
    }
    let w = get(2).map(f64s).transpose()?;
    let (loss, shape) = nll(node, &f64s(x)?, x.dims(), &i64s(t)?, w.as_deref())?;
    like(loss, shape, x)
}

/// SoftmaxCrossEntropyLoss(scores, labels, weights?): NLL of log-softmax over axis 1;
/// the second output (if asked) is that log-probability.
pub fn softmax_cross_entropy(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(t)) = (get(0), get(1)) else {
        bail!("SoftmaxCrossEntropyLoss: needs scores and labels")
    };
    if x.rank() < 2 {
        bail!("SoftmaxCrossEntropyLoss: scores must be [N, C, ...]")
    }
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let inner: usize = x.dims()[2..].iter().product();
    let mut lp = f64s(x)?;
    for i in 0..n {
        for j in 0..inner {
            let at = |k: usize| (i * c + k) * inner + j;
            let max = (0..c).map(|k| lp[at(k)]).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + (0..c).map(|k| (lp[at(k)] - max).exp()).sum::<f64>().ln();
            (0..c).for_each(|k| lp[at(k)] -= lse);
        }
    }
    let w = get(2).map(f64s).transpose()?;
    let (loss, shape) = nll(node, &lp, x.dims(), &i64s(t)?, w.as_deref())?;
    Ok(vec![like(loss, shape, x)?, like(lp, x.dims(), x)?])
}

/// `t − zero_point` in f64; a 1-D zero point applies along `axis` of `t` (rows of A: the
/// second-to-last axis; columns of B: the last).
fn centred(t: &Tensor, zp: Option<&Tensor>, axis_from_end: usize) -> Result<Tensor> {
    let t64 = t.to_dtype(DType::F64)?;
    let Some(zp) = zp.filter(|z| z.elem_count() > 0) else {
        return Ok(t64);
    };
    let z = zp.to_dtype(DType::F64)?;
    let z = if z.elem_count() > 1 && z.rank() == 1 {
        let mut shape = vec![1usize; t.rank()];
        shape[t.rank() - axis_from_end] = z.elem_count();
        z.reshape(shape)?
    } else {
        z
    };
    t64.broadcast_sub(&z)
}

/// MatMulInteger(A, B, a_zero_point?, b_zero_point?): the exact integer product as INT32.
pub fn matmul_integer(ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(a), Some(b)) = (get(0), get(1)) else {
        bail!("MatMulInteger: needs A and B")
    };
    let a = centred(a, get(2), 2.min(a.rank()))?;
    let b = centred(b, get(3), 1)?;
    a.broadcast_matmul(&b)?.to_dtype(DType::I32)
}

/// Saturating cast of rounded values into a quantized type (UINT8, or INT8 held as I16).
fn saturate(q: &Tensor, like: DType) -> Result<Tensor> {
    let (lo, hi) = match like {
        DType::U8 => (0.0, 255.0),
        _ => (-128.0, 127.0),
    };
    crate::ops_more::round_half_even(q)?
        .clamp(lo, hi)?
        .to_dtype(like)
}

/// QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp).
pub fn qlinear_matmul(ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .ok_or_else(|| candle_core::Error::Msg(format!("QLinearMatMul: input {i} missing")))
    };
    let (a, b) = (get(0)?, get(3)?);
    let acc = centred(a, Some(get(2)?), 2.min(a.rank()))?.broadcast_matmul(&centred(
        b,
        Some(get(5)?),
        1,
    )?)?;
    let f = |i: usize| get(i)?.to_dtype(DType::F64);
    let (sa, sb, sy) = (f(1)?, f(4)?, f(6)?);
    let sb = if sb.elem_count() > 1 {
        sb.reshape((1, sb.elem_count()))?
    } else {
        sb
    };
    let y = acc
        .broadcast_mul(&sa)?
        .broadcast_mul(&sb)?
        .broadcast_div(&sy)?
        .broadcast_add(&f(7)?)?;
    saturate(&y, get(7)?.dtype())
}

/// DynamicQuantizeLinear(x) → (y UINT8, y_scale, y_zero_point) over the range of x and 0,
/// in f32 arithmetic as ONNX's reference computes it.
pub fn dynamic_quantize(x: &Tensor) -> Result<Vec<Tensor>> {
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let max = v.iter().copied().fold(0f32, f32::max);
    let min = v.iter().copied().fold(0f32, f32::min);
    let scale = (max - min) / 255.0;
    let even = f32::round_ties_even;
    let zp = if scale == 0.0 {
        0.0
    } else {
        even(-min / scale).clamp(0.0, 255.0)
    };
    let y: Vec<u8> = v
        .iter()
        .map(|&a| {
            let q = if scale == 0.0 { 0.0 } else { even(a / scale) };
            (q + zp).clamp(0.0, 255.0) as u8
        })
        .collect();
    let dev = x.device();
    Ok(vec![
        Tensor::from_vec(y, x.dims(), &Device::Cpu)?.to_device(dev)?,
        Tensor::new(scale, dev)?,
        Tensor::new(zp as u8, dev)?,
    ])
}

/// `(x − zp)` in f64, the zero point per channel (axis 1 of x, or axis 0 of a weight) when
/// it has several values.
fn minus_zero_point(x: &Tensor, zp: Option<&Tensor>, channel_axis: usize) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F64)?;
    let Some(zp) = zp.filter(|z| z.elem_count() > 0) else {
        return Ok(xf);
    };
    let z = zp.to_dtype(DType::F64)?;
    let z = if z.elem_count() > 1 {
        let mut shape = vec![1usize; x.rank()];
        shape[channel_axis] = z.elem_count();
        z.reshape(shape)?
    } else {
        z.flatten_all()?.get(0)?
    };
    xf.broadcast_sub(&z)
}

/// ConvInteger(x, w, x_zero_point?, w_zero_point?): the exact integer convolution as INT32
/// (the Conv attributes apply as for Conv).
pub fn conv_integer(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    ctx: &crate::ops::Ctx<'_>,
) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(w)) = (get(0), get(1)) else {
        bail!("ConvInteger: needs x and w")
    };
    let xs = minus_zero_point(x, get(2), 1)?;
    let ws = minus_zero_point(w, get(3), 0)?;
    let mut conv = node.clone();
    conv.op_type = "Conv".into();
    crate::ops_fast::conv(&conv, &[Some(xs), Some(ws)], ctx)?.to_dtype(DType::I32)
}

/// QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B?): the integer
/// convolution plus bias, rescaled by x_scale·w_scale/y_scale (w_scale per output channel
/// or one), rounded half to even and saturated into y_zp's type.
pub fn qlinear_conv(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    ctx: &crate::ops::Ctx<'_>,
) -> Result<Tensor> {
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .ok_or_else(|| candle_core::Error::Msg(format!("QLinearConv: input {i} missing")))
    };
    let xs = minus_zero_point(get(0)?, Some(get(2)?), 1)?;
    let ws = minus_zero_point(get(3)?, Some(get(5)?), 0)?;
    let mut conv = node.clone();
    conv.op_type = "Conv".into();
    let mut acc = crate::ops_fast::conv(&conv, &[Some(xs), Some(ws)], ctx)?;
    let rank = acc.rank();
    // One value, or one per output channel (axis 1 of the result).
    let per_channel = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F64)?;
        if t.elem_count() > 1 {
            let mut shape = vec![1usize; rank];
            shape[1] = t.elem_count();
            t.reshape(shape)
        } else {
            t.flatten_all()?.get(0)
        }
    };
    if let Some(b) = ins
        .get(8)
        .and_then(|t| t.as_ref())
        .filter(|t| t.elem_count() > 0)
    {
        acc = acc.broadcast_add(&per_channel(b)?)?;
    }
    let scale = per_channel(get(1)?)?
        .broadcast_mul(&per_channel(get(4)?)?)?
        .broadcast_div(&per_channel(get(6)?)?)?;
    let y = acc
        .broadcast_mul(&scale)?
        .broadcast_add(&per_channel(get(7)?)?)?;
    saturate(&y, get(7)?.dtype())
}
