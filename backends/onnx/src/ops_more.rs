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
    let mut dims = idx.dims().to_vec();
    dims.insert(a, depth as usize);
    // (As f64 positions while it is computed.)
    crate::size_guard::check(&dims, 8)?;
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
    let data: Vec<f64> = crate::ops::f64s(&moved)?;
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

/// HannWindow, HammingWindow, BlackmanWindow of `size` values (`periodic` by default).
pub fn window_fn(node: &NodeProto, size: &Tensor) -> Result<Tensor> {
    let n = *i64s(size)?.first().unwrap_or(&0);
    let n = n.max(0) as usize;
    let periodic = attrs::int(node, "periodic", 1) != 0;
    let denom = if periodic { n as f64 } else { n as f64 - 1.0 };
    let tau = std::f64::consts::TAU;
    let v: Vec<f64> = (0..n)
        .map(|k| {
            let x = if denom > 0.0 { k as f64 / denom } else { 0.0 };
            match node.op_type.as_str() {
                "HannWindow" => 0.5 - 0.5 * (tau * x).cos(),
                "HammingWindow" => 25.0 / 46.0 - (21.0 / 46.0) * (tau * x).cos(),
                _ => 0.42 - 0.5 * (tau * x).cos() + 0.08 * (2.0 * tau * x).cos(),
            }
        })
        .collect();
    let dt = crate::convert::onnx_dtype(attrs::int(node, "output_datatype", 1) as i32)
        .unwrap_or(DType::F32);
    Tensor::from_vec(v, n, &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(size.device())
}

/// CenterCropPad: each listed axis cropped or zero-padded to the wanted size, centred.
pub fn center_crop_pad(node: &NodeProto, x: &Tensor, shape: &Tensor) -> Result<Tensor> {
    let want = i64s(shape)?;
    let axes: Vec<usize> = match attrs::ints(node, "axes") {
        Some(a) => a
            .iter()
            .map(|&v| axis(v, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..x.rank()).collect(),
    };
    if want.len() != axes.len() {
        bail!(
            "CenterCropPad: {} sizes for {} axes",
            want.len(),
            axes.len()
        )
    }
    let mut y = x.clone();
    for (&a, &w) in axes.iter().zip(&want) {
        let (d, w) = (y.dim(a)?, w.max(0) as usize);
        y = if w < d {
            y.narrow(a, (d - w) / 2, w)?
        } else if w > d {
            let before = (w - d) / 2;
            y.pad_with_zeros(a, before, w - d - before)?
        } else {
            y
        };
    }
    Ok(y)
}

/// Compress: the slices along `axis` (or elements of the flattened input) where the
/// condition is true.
pub fn compress(node: &NodeProto, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
    let keep: Vec<u32> = cond
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    let (x, a) = if attrs::has(node, "axis") {
        (x.clone(), axis(attrs::int(node, "axis", 0), x.rank())?)
    } else {
        (x.flatten_all()?, 0)
    };
    let keep: Vec<u32> = keep
        .into_iter()
        .filter(|&i| (i as usize) < x.dim(a).unwrap_or(0))
        .collect();
    let n = keep.len();
    x.index_select(&Tensor::from_vec(keep, n, x.device())?, a)
}

/// ReverseSequence: per batch entry, its first `len` steps along the time axis reversed.
pub fn reverse_sequence(node: &NodeProto, x: &Tensor, lens: &Tensor) -> Result<Tensor> {
    let ba = axis(attrs::int(node, "batch_axis", 1), x.rank())?;
    let ta = axis(attrs::int(node, "time_axis", 0), x.rank())?;
    let lens = i64s(lens)?;
    let steps = x.dim(ta)?;
    let mut parts = Vec::with_capacity(x.dim(ba)?);
    for (b, &l) in lens.iter().enumerate().take(x.dim(ba)?) {
        let l = (l.max(0) as usize).min(steps);
        let idx: Vec<u32> = (0..steps)
            .map(|t| if t < l { (l - 1 - t) as u32 } else { t as u32 })
            .collect();
        let slice = x.narrow(ba, b, 1)?.contiguous()?;
        parts.push(slice.index_select(&Tensor::from_vec(idx, steps, x.device())?, ta)?);
    }
    Tensor::cat(&parts, ba)
}

/// Det: the determinant of each trailing square matrix (LU with partial pivoting, f64).
pub fn det(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    if r < 2 || x.dims()[r - 1] != x.dims()[r - 2] {
        bail!("Det: expected [..., M, M], got {:?}", x.dims())
    }
    let m = x.dims()[r - 1];
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let dets: Vec<f64> = v
        .chunks(m * m)
        .map(|a| {
            let mut a = a.to_vec();
            let mut det = 1.0;
            for c in 0..m {
                let p = (c..m)
                    .max_by(|&i, &j| a[i * m + c].abs().total_cmp(&a[j * m + c].abs()))
                    .unwrap_or(c);
                if a[p * m + c] == 0.0 {
                    return 0.0;
                }
                if p != c {
                    for k in 0..m {
                        a.swap(p * m + k, c * m + k);
                    }
                    det = -det;
                }
                det *= a[c * m + c];
                for i in c + 1..m {
                    let f = a[i * m + c] / a[c * m + c];
                    for k in c..m {
                        a[i * m + k] -= f * a[c * m + k];
                    }
                }
            }
            det
        })
        .collect();
    crate::ops::like(dets, &x.dims()[..r - 2], x)
}

/// Unique: the distinct elements (or slices along `axis`), sorted or in order of first
/// appearance, with their first indices, the inverse indices and the counts.
pub fn unique(node: &NodeProto, x: &Tensor) -> Result<Vec<Tensor>> {
    let sorted = attrs::int(node, "sorted", 1) != 0;
    let (t, a) = if attrs::has(node, "axis") {
        (x.clone(), axis(attrs::int(node, "axis", 0), x.rank())?)
    } else {
        (x.flatten_all()?, 0)
    };
    // Slices along the axis as rows.
    let moved = t.transpose(0, a)?.contiguous()?;
    let rows = moved.dim(0)?;
    let width = moved.elem_count() / rows.max(1);
    let v: Vec<f64> = crate::ops::f64s(&moved)?;
    let row = |i: usize| &v[i * width..(i + 1) * width];
    let cmp = |i: usize, j: usize| {
        row(i)
            .iter()
            .zip(row(j))
            .map(|(p, q)| p.total_cmp(q))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    // First occurrences, in input order.
    let mut firsts: Vec<usize> = Vec::new();
    let mut inverse = vec![0i64; rows];
    let mut counts: Vec<i64> = Vec::new();
    for (i, inv) in inverse.iter_mut().enumerate() {
        match firsts.iter().position(|&f| cmp(f, i).is_eq()) {
            Some(k) => {
                *inv = k as i64;
                counts[k] += 1;
            }
            None => {
                *inv = firsts.len() as i64;
                firsts.push(i);
                counts.push(1);
            }
        }
    }
    let mut order: Vec<usize> = (0..firsts.len()).collect();
    if sorted {
        order.sort_by(|&p, &q| cmp(firsts[p], firsts[q]));
    }
    let mut rank = vec![0i64; order.len()];
    for (new, &old) in order.iter().enumerate() {
        rank[old] = new as i64;
    }
    let picked: Vec<u32> = order.iter().map(|&k| firsts[k] as u32).collect();
    let n = picked.len();
    let y = moved
        .index_select(&Tensor::from_vec(picked, n, x.device())?, 0)?
        .transpose(0, a)?
        .contiguous()?;
    let dev = x.device();
    let ints = |v: Vec<i64>| {
        let len = v.len();
        Tensor::from_vec(v, len, dev)
    };
    Ok(vec![
        y,
        ints(order.iter().map(|&k| firsts[k] as i64).collect())?,
        ints(inverse.iter().map(|&k| rank[k as usize]).collect())?,
        ints(order.iter().map(|&k| counts[k]).collect())?,
    ])
}
