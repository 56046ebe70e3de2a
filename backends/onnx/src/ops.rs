//! ONNX operators on candle tensors. Every operator a graph uses is checked with
//! [`is_supported`] when the model loads, so an unknown one fails the load, never a request.
use candle_core::{bail, DType, Device, Result, Tensor, D};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::convert::onnx_dtype;
use crate::fuse;
use crate::ops_fast::{
    batched_matmul, channel_affine, conv, cpu_f32_op, fused_attention, gelu_exact, layer_norm,
    linear, masked_softmax, on_cpu_f32, permuted_matmul,
};

/// The column count of a MatMul whose weight the planner packed into panels ([`PANELS_N`]).
fn panels_n(node: &NodeProto) -> Option<usize> {
    attrs::has(node, PANELS_N).then(|| attrs::int(node, PANELS_N, 0) as usize)
}

/// Operators whose output is the multidirectional broadcast of their inputs: its size is
/// checked before they run ([`crate::size_guard`]).
const BROADCASTING: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Mod",
    "And",
    "Or",
    "Xor",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Where",
    "Max",
    "Min",
    "Mean",
    "Sum",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "PRelu",
];

/// Internal operator the planner puts in place of an inference BatchNormalization:
/// inputs x, `scale[C]`, `shift[C]` → x · scale + shift per channel (axis 1).
pub const CHANNEL_AFFINE: &str = "KilnChannelAffine";

/// Attribute of a `MatMul` whose weight (input 1) the planner packed into 16-column panels
/// for the CPU kernel: the weight's column count.
pub const PANELS_N: &str = "kiln_panels_n";
/// [`CHANNEL_AFFINE`] on `x` with the node's other inputs `params`: `x · scale + shift` per
/// channel (dimension 1), then ReLU if `relu`. The planner may have merged a following
/// per-channel affine into it (`params` 2–5, see fuse.rs), which a 4-D input has folded
/// into `params` 0–1 and any other input computes as written.
pub(crate) fn channel_affine_node(
    x: &Tensor,
    params: &[Option<Tensor>],
    relu: bool,
) -> Result<Tensor> {
    let p = |i: usize| {
        params.get(i).and_then(|t| t.as_ref()).ok_or_else(|| {
            candle_core::Error::Msg(format!("{CHANNEL_AFFINE}: input {} missing", i + 1))
        })
    };
    let per_dim1 = |t: &Tensor| -> Result<Tensor> {
        let shape: Vec<usize> = (0..x.rank())
            .map(|i| if i == 1 { x.dim(1).unwrap_or(1) } else { 1 })
            .collect();
        t.reshape(shape)
    };
    let r = if params.len() == 6 && x.rank() != 4 {
        let bn = x
            .broadcast_mul(&per_dim1(p(2)?)?)?
            .broadcast_add(&per_dim1(p(3)?)?)?;
        bn.broadcast_mul(p(4)?)?.broadcast_add(p(5)?)?
    } else {
        if x.rank() >= 2 {
            if let Some(r) = channel_affine(x, p(0)?, p(1)?, relu)? {
                return Ok(r);
            }
        }
        x.broadcast_mul(&per_dim1(p(0)?)?)?
            .broadcast_add(&per_dim1(p(1)?)?)?
    };
    if relu {
        r.relu()
    } else {
        Ok(r)
    }
}

/// Internal operator (from a `FusedMatMul` with `transA`/`transB`): its input with the
/// last two dimensions swapped.
pub const TRANSPOSE_LAST_TWO: &str = "KilnTransposeLastTwo";

/// Set by the planner on a QuantizeLinear: the ONNX element type of its zero point.
pub const ZERO_POINT_TYPE: &str = "kiln_zero_point_type";

/// Set by the planner on a Conv whose weight (input 1) it packed with
/// `cpu_conv::pack_weight` into a flat tensor: the weight's `[oc, ic, kh, kw]`.
pub const PACKED_CONV: &str = "kiln_packed_conv";

/// Operators this executor implements (default ONNX domain) besides the element-wise ones
/// in [`ELEMENTWISE`]; see [`is_supported`].
const SUPPORTED: &[&str] = &[
    "And",
    "ArgMax",
    "ArgMin",
    "CastLike",
    "Or",
    "Pad",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "Size",
    "Split",
    "Tile",
    "Xor",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Equal",
    "Expand",
    "Flatten",
    "Gather",
    "DFT",
    "STFT",
    "RoiAlign",
    "Unique",
    "AffineGrid",
    "MaxUnpool",
    "Col2Im",
    "ConvInteger",
    "QLinearConv",
    "GridSample",
    "DeformConv",
    "HannWindow",
    "MelWeightMatrix",
    "HammingWindow",
    "BlackmanWindow",
    "CenterCropPad",
    "Compress",
    "ReverseSequence",
    "Det",
    "If",
    "Loop",
    "SequenceMap",
    "Scan",
    "GRU",
    "LSTM",
    "RNN",
    "Einsum",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeLinear",
    "Shrink",
    "IsNaN",
    "PRelu",
    "InstanceNormalization",
    "GroupNormalization",
    "MeanVarianceNormalization",
    "DepthToSpace",
    "SpaceToDepth",
    "NonZero",
    "GatherND",
    "EyeLike",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "BitwiseNot",
    "BitShift",
    "LpPool",
    "ConvTranspose",
    "NegativeLogLikelihoodLoss",
    "SoftmaxCrossEntropyLoss",
    "DequantizeLinear",
    "NonMaxSuppression",
    "QuantizeLinear",
    "Scatter",
    "ScatterElements",
    "ScatterND",
    "CumSum",
    "Hardmax",
    "IsInf",
    "OneHot",
    "ReduceLogSum",
    "ReduceProd",
    "TopK",
    "Resize",
    "Upsample",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "Identity",
    "LayerNormalization",
    "GatherElements",
    "LRN",
    "Mod",
    "Trilu",
    "Less",
    "LessOrEqual",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Not",
    "Pow",
    "Range",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Reshape",
    "Shape",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Sum",
    "Transpose",
    "Unsqueeze",
    "Where",
];

pub(crate) fn req<'a>(ins: &'a [Option<Tensor>], i: usize, node: &NodeProto) -> Result<&'a Tensor> {
    match ins.get(i) {
        Some(Some(t)) => Ok(t),
        _ => bail!("{} node '{}' is missing input {i}", node.op_type, node.name),
    }
}

pub(crate) fn opt(ins: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    ins.get(i).and_then(Option::as_ref)
}

/// A tensor's values as f64 on the host (for the operators computed there; exact for every
/// integer up to 2^53).
pub fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// Host values shaped `dims`, as a tensor of `like`'s type on `like`'s device.
pub fn like<T: candle_core::WithDType>(
    v: Vec<T>,
    dims: impl Into<candle_core::Shape>,
    like: &Tensor,
) -> Result<Tensor> {
    Tensor::from_vec(v, dims, &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
}

/// A small tensor (shapes, axes, indices) as i64 values.
pub fn i64s(t: &Tensor) -> Result<Vec<i64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()
}

fn f64_scalar(t: &Tensor) -> Result<f64> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

pub fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    if a < 0 || a >= r.max(1) {
        bail!("axis {a} out of range for rank {rank}")
    }
    Ok(a as usize)
}

/// Broadcasts both tensors to their common (numpy) shape.
fn broadcast_pair(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = a
        .shape()
        .broadcast_shape_binary_op(b.shape(), "broadcast")?;
    Ok((a.broadcast_as(shape.clone())?, b.broadcast_as(shape)?))
}

pub(crate) fn softmax(x: &Tensor, axis: usize, log: bool) -> Result<Tensor> {
    if axis + 1 == x.rank() {
        let width = x.dim(axis)?;
        let run = |s: &[&[f32]]| crate::cpu_kernels::softmax_rows(s[0], width, log);
        if let Some(out) = on_cpu_f32(&[Some(x)], run)? {
            return Tensor::from_vec(out, x.dims(), &Device::Cpu);
        }
    }
    let m = x.max_keepdim(axis)?;
    let e = x.broadcast_sub(&m)?;
    let s = e.exp()?.sum_keepdim(axis)?;
    if log {
        e.broadcast_sub(&s.log()?)
    } else {
        e.exp()?.broadcast_div(&s)
    }
}

fn axes_of(node: &NodeProto, ins: &[Option<Tensor>], input: usize) -> Result<Option<Vec<i64>>> {
    Ok(match opt(ins, input) {
        Some(t) => Some(i64s(t)?),
        None => attrs::ints(node, "axes"),
    })
}

fn reduce(node: &NodeProto, ins: &[Option<Tensor>], x: &Tensor) -> Result<Tensor> {
    let keep = attrs::int(node, "keepdims", 1) != 0;
    let axes = match axes_of(node, ins, 1)? {
        Some(a) if !a.is_empty() => a,
        _ if attrs::int(node, "noop_with_empty_axes", 0) != 0 => return Ok(x.clone()),
        _ => (0..x.rank() as i64).collect(),
    };
    let mut axes: Vec<usize> = axes
        .iter()
        .map(|&a| axis(a, x.rank()))
        .collect::<Result<_>>()?;
    axes.sort_unstable();
    axes.dedup();
    let op = node.op_type.as_str();
    if op == "ReduceProd" {
        return crate::ops_more::reduce_prod(x, &axes, keep);
    }
    let mut y = match op {
        "ReduceSumSquare" | "ReduceL2" => x.sqr()?,
        "ReduceL1" => x.abs()?,
        "ReduceLogSumExp" => x.exp()?,
        _ => x.clone(),
    };
    for &a in axes.iter().rev() {
        if y.dim(a)? == 0 && matches!(op, "ReduceMax" | "ReduceMin") {
            // An empty set reduces to the identity: -inf for Max, +inf for Min (the type's
            // extreme for integers).
            let mut dims = y.dims().to_vec();
            dims[a] = 1;
            let v = if op == "ReduceMax" {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
            y = Tensor::full(v, dims, y.device())?.to_dtype(y.dtype())?;
            continue;
        }
        y = match op {
            "ReduceMean" => y.mean_keepdim(a)?,
            "ReduceMax" => y.max_keepdim(a)?,
            "ReduceMin" => y.min_keepdim(a)?,
            _ => y.sum_keepdim(a)?,
        };
    }
    y = match op {
        "ReduceL2" => y.sqrt()?,
        "ReduceLogSumExp" | "ReduceLogSum" => y.log()?,
        _ => y,
    };
    if !keep {
        for &a in axes.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

fn reshape(x: &Tensor, spec: &[i64], allow_zero: bool) -> Result<Tensor> {
    let dims = x.dims();
    let mut out: Vec<i64> = spec
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d == 0 && !allow_zero {
                dims.get(i).map_or(0, |&v| v as i64)
            } else {
                d
            }
        })
        .collect();
    if let Some(pos) = out.iter().position(|&d| d == -1) {
        let known: i64 = out.iter().filter(|&&d| d != -1).product();
        out[pos] = if known == 0 {
            0
        } else {
            x.elem_count() as i64 / known
        };
    }
    x.reshape(out.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>())
}

fn gather(x: &Tensor, idx: &Tensor, ax: usize) -> Result<Tensor> {
    let n = x.dim(ax)? as i64;
    let flat: Vec<i64> = i64s(idx)?
        .iter()
        .map(|&i| if i < 0 { i + n } else { i })
        .collect();
    let ids = Tensor::from_vec(
        flat.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        flat.len(),
        x.device(),
    )?;
    let picked = x.index_select(&ids, ax)?;
    let mut shape: Vec<usize> = x.dims()[..ax].to_vec();
    shape.extend_from_slice(idx.dims());
    shape.extend_from_slice(&x.dims()[ax + 1..]);
    picked.reshape(shape)
}

fn slice(node: &NodeProto, ins: &[Option<Tensor>], x: &Tensor) -> Result<Tensor> {
    let (starts, ends) = match (opt(ins, 1), opt(ins, 2)) {
        (Some(s), Some(e)) => (i64s(s)?, i64s(e)?),
        _ => (
            attrs::ints(node, "starts").unwrap_or_default(),
            attrs::ints(node, "ends").unwrap_or_default(),
        ),
    };
    let axes = match opt(ins, 3) {
        Some(a) => i64s(a)?,
        None => attrs::ints(node, "axes").unwrap_or_else(|| (0..starts.len() as i64).collect()),
    };
    let steps = match opt(ins, 4) {
        Some(s) => i64s(s)?,
        None => vec![1; starts.len()],
    };
    let mut y = x.clone();
    for (k, &a) in axes.iter().enumerate() {
        let a = axis(a, x.rank())?;
        let n = y.dim(a)? as i64;
        let step = steps.get(k).copied().unwrap_or(1);
        if step == 0 {
            bail!("Slice: a step of 0 is not allowed")
        }
        let (start, end) = (
            starts.get(k).copied().unwrap_or(0),
            ends.get(k).copied().unwrap_or(i64::MAX),
        );
        // ONNX's clamping: [0, n] for a positive step, [-1, n-1] (start [0, n-1]) otherwise.
        let shift = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
        if step == 1 {
            let (s, e) = (shift(start).clamp(0, n), shift(end).clamp(0, n));
            y = y.narrow(a, s as usize, (e - s).max(0) as usize)?;
            continue;
        }
        let idx: Vec<u32> = if step > 0 {
            let (s, e) = (shift(start).clamp(0, n), shift(end).clamp(0, n));
            (s..e).step_by(step as usize).map(|i| i as u32).collect()
        } else {
            let (s, e) = (shift(start).clamp(0, n - 1), shift(end).clamp(-1, n - 1));
            let mut v = Vec::new();
            let mut i = s;
            while i > e {
                v.push(i as u32);
                i += step;
            }
            v
        };
        let len = idx.len();
        y = y.index_select(&Tensor::from_vec(idx, len, y.device())?, a)?;
    }
    Ok(y)
}

fn pad(node: &NodeProto, ins: &[Option<Tensor>], x: &Tensor) -> Result<Tensor> {
    let mode = attrs::string(node, "mode", "constant");
    if !matches!(mode.as_str(), "constant" | "edge" | "reflect" | "wrap") {
        bail!("Pad: mode '{mode}' is not one of constant, edge, reflect, wrap")
    }
    let pads = match opt(ins, 1) {
        Some(p) => i64s(p)?,
        None => attrs::ints(node, "pads").unwrap_or_default(),
    };
    let value = match opt(ins, 2) {
        Some(v) if v.elem_count() > 0 => f64_scalar(v)?,
        _ => attrs::float(node, "value", 0.0) as f64,
    };
    let axes: Vec<usize> = match opt(ins, 3) {
        Some(a) => i64s(a)?
            .iter()
            .map(|&a| axis(a, x.rank()))
            .collect::<Result<_>>()?,
        None => (0..x.rank()).collect(),
    };
    let n = axes.len();
    if pads.len() != 2 * n {
        bail!("Pad: expected {} pads, got {}", 2 * n, pads.len())
    }
    let mut dims = x.dims().to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let d = (dims[a] as i64)
            .saturating_add(pads[k])
            .saturating_add(pads[k + n]);
        dims[a] = d.max(0) as usize;
    }
    crate::size_guard::check(&dims, x.dtype().size_in_bytes())?;
    // Zero padding of (x - value), then + value, pads with `value`.
    let shifted = value != 0.0;
    let mut y = if shifted {
        x.affine(1.0, -value)?
    } else {
        x.clone()
    };
    for (k, &a) in axes.iter().enumerate() {
        let (lo, hi) = (pads[k], pads[k + n]);
        if lo < 0 {
            y = y.narrow(a, (-lo) as usize, y.dim(a)? - (-lo) as usize)?;
        }
        if hi < 0 {
            y = y.narrow(a, 0, y.dim(a)? - (-hi) as usize)?;
        }
        y = if mode == "constant" {
            y.pad_with_zeros(a, lo.max(0) as usize, hi.max(0) as usize)?
        } else {
            crate::ops_more::pad_mode(&y, a, lo.max(0) as usize, hi.max(0) as usize, &mode)?
        };
    }
    if shifted {
        y = y.affine(1.0, value)?;
    }
    Ok(y)
}

fn split(node: &NodeProto, ins: &[Option<Tensor>], x: &Tensor) -> Result<Vec<Tensor>> {
    let a = axis(attrs::int(node, "axis", 0), x.rank())?;
    let n = x.dim(a)?;
    let count = node.output.len().max(1);
    let sizes: Vec<usize> = match opt(ins, 1) {
        Some(s) => i64s(s)?.iter().map(|&v| v.max(0) as usize).collect(),
        None => match attrs::ints(node, "split") {
            Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
            None => {
                let chunk = n.div_ceil(count);
                (0..count)
                    .map(|i| chunk.min(n.saturating_sub(i * chunk)))
                    .collect()
            }
        },
    };
    let mut at = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for s in sizes {
        out.push(x.narrow(a, at, s)?);
        at += s;
    }
    Ok(out)
}

/// A 2-D pooling of f32 `x` (NCHW) on the CPU kernel (`cpu_kernels::Pool2d`) with the
/// kernel, strides and pads of [`pool_params`]; `None` when `x` is not f32 on the CPU or
/// the window does not fit.
fn pool2d_on_cpu(
    x: &Tensor,
    (k, s, p): (&[usize], &[usize], &[usize]),
    run: impl FnOnce(&crate::cpu_kernels::Pool2d, &[f32]) -> Vec<f32>,
) -> Result<Option<Tensor>> {
    let (b, c, h, w) = x.dims4()?;
    let pool = crate::cpu_kernels::Pool2d {
        planes: b * c,
        hw: [h, w],
        kernel: [k[0], k[1]],
        stride: [s[0], s[1]],
        pads: [p[0], p[1], p[2], p[3]],
    };
    let Some([oh, ow]) = pool.out_hw() else {
        return Ok(None);
    };
    on_cpu_f32(&[Some(x)], |v| run(&pool, v[0]))?
        .map(|out| Tensor::from_vec(out, (b, c, oh, ow), &Device::Cpu))
        .transpose()
}

fn pool_params(node: &NodeProto, x: &Tensor) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    if x.rank() != 4 {
        bail!("{}: only 2-D pooling (NCHW) is supported", node.op_type)
    }
    let k: Vec<usize> = attrs::ints(node, "kernel_shape")
        .unwrap_or_default()
        .iter()
        .map(|&v| v as usize)
        .collect();
    let s: Vec<usize> = attrs::ints(node, "strides")
        .unwrap_or_else(|| vec![1, 1])
        .iter()
        .map(|&v| v as usize)
        .collect();
    let p: Vec<usize> = attrs::ints(node, "pads")
        .unwrap_or_else(|| vec![0; 4])
        .iter()
        .map(|&v| v as usize)
        .collect();
    if k.len() != 2 || s.len() != 2 || p.len() != 4 {
        bail!("{}: expected 2-D kernel_shape/strides/pads", node.op_type)
    }
    if attrs::string(node, "auto_pad", "NOTSET") != "NOTSET"
        || attrs::int(node, "ceil_mode", 0) != 0
    {
        bail!("{}: auto_pad and ceil_mode are not supported", node.op_type)
    }
    Ok((k, s, p))
}

pub(crate) fn pad2d(x: &Tensor, p: &[usize]) -> Result<Tensor> {
    x.pad_with_zeros(2, p[0], p[2])?
        .pad_with_zeros(3, p[1], p[3])
}

fn constant(node: &NodeProto) -> Result<Tensor> {
    if let Some(t) = attrs::tensor(node, "value") {
        return crate::convert::tensor_from_proto(t);
    }
    if attrs::has(node, "value_float") {
        return Tensor::new(attrs::float(node, "value_float", 0.0), &Device::Cpu);
    }
    if attrs::has(node, "value_int") {
        return Tensor::new(attrs::int(node, "value_int", 0), &Device::Cpu);
    }
    if let Some(v) = attrs::ints(node, "value_ints") {
        return Tensor::new(v, &Device::Cpu);
    }
    if let Some(a) = node.attribute.iter().find(|a| a.name == "value_floats") {
        return Tensor::new(a.floats.clone(), &Device::Cpu);
    }
    bail!(
        "Constant node '{}' has no supported value attribute",
        node.name
    )
}

/// Whether this executor implements ONNX operator `op` (default domain).
pub fn is_supported(op: &str) -> bool {
    SUPPORTED.contains(&op) || ELEMENTWISE.contains(&op)
}

/// One-input element-wise operators computed by candle's float-only unary functions.
const ELEMENTWISE: &[&str] = &[
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Sin",
    "Cos",
    "Tan",
    "Tanh",
    "Erf",
    "Relu",
    "Sigmoid",
    "Sign",
    "Softplus",
    "Softsign",
    "LeakyRelu",
    "Elu",
    "Selu",
    "HardSigmoid",
    "HardSwish",
    "Mish",
    "Gelu",
    "Round",
    "Asin",
    "Acos",
    "Atan",
    "Sinh",
    "Cosh",
    "Asinh",
    "Acosh",
    "Atanh",
    "Celu",
    "ThresholdedRelu",
];

/// Model-wide facts an operator may depend on.
pub struct Ctx<'a> {
    /// The device tensors live on.
    pub dev: &'a Device,
    /// Opset version of the default ONNX domain.
    pub opset: i64,
    /// Threads the CPU kernels may use.
    pub threads: usize,
}

/// Runs one node. `ins` follows the node's inputs (`None` for an omitted optional one).
/// BatchNormalization with `training_mode`: normalized with the batch's own mean and
/// (population) variance over every axis but the channels; also returns the running
/// statistics updated by `momentum` (`running · momentum + batch · (1 − momentum)`).
fn batch_norm_training(
    node: &NodeProto,
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<Vec<Tensor>> {
    let momentum = attrs::float(node, "momentum", 0.9) as f64;
    let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
    let xf = x.to_dtype(DType::F64)?;
    let batch_mean = xf.mean_keepdim(axes.as_slice())?;
    let centred = xf.broadcast_sub(&batch_mean)?;
    let batch_var = centred.sqr()?.mean_keepdim(axes.as_slice())?;
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let y = centred
        .broadcast_div(&(&batch_var + eps)?.sqrt()?)?
        .broadcast_mul(&f(scale)?)?
        .broadcast_add(&f(bias)?)?
        .to_dtype(x.dtype())?;
    let running = |old: &Tensor, batch: &Tensor| -> Result<Tensor> {
        (f(old)? * momentum)?
            .add(&(batch * (1.0 - momentum))?)?
            .flatten_all()?
            .to_dtype(old.dtype())
    };
    Ok(vec![
        y,
        running(mean, &batch_mean)?,
        running(var, &batch_var)?,
    ])
}

pub fn run(node: &NodeProto, ins: &[Option<Tensor>], ctx: &Ctx<'_>) -> Result<Vec<Tensor>> {
    let dev = ctx.dev;
    let op = node.op_type.as_str();
    // candle's element-wise functions exist for floats only (on integers they panic):
    // integer inputs (shape arithmetic, ONNX's integer Abs/Neg/Sign/Relu) go through f64,
    // exact for every integer a shape or index holds, and back.
    if ELEMENTWISE.contains(&op) {
        if let Some(x) = ins
            .first()
            .and_then(|t| t.as_ref())
            .filter(|t| !t.dtype().is_float())
        {
            let dt = x.dtype();
            let wide = [Some(x.to_dtype(DType::F64)?)];
            return run(node, &wide, ctx)?
                .into_iter()
                .map(|t| {
                    if t.dtype() == DType::F64 {
                        t.to_dtype(dt)
                    } else {
                        Ok(t)
                    }
                })
                .collect();
        }
    }
    if BROADCASTING.contains(&op) {
        crate::size_guard::check_broadcast(ins)?;
    }
    let x = || req(ins, 0, node);
    let y = || req(ins, 1, node);
    let out = match op {
        "Add" => x()?.broadcast_add(y()?)?,
        "Sub" => x()?.broadcast_sub(y()?)?,
        "Mul" => x()?.broadcast_mul(y()?)?,
        "Div" => x()?.broadcast_div(y()?)?,
        "Pow" => {
            let x = x()?;
            let (a, b) = broadcast_pair(&x.to_dtype(DType::F64)?, &y()?.to_dtype(DType::F64)?)?;
            // |a|^b, negated where a < 0 and b is odd; b = 0 gives 1 (also for a = 0).
            let mag = (b.clone() * a.abs()?.log()?)?.exp()?;
            let odd = ((&b / 2.0)?.floor()? * 2.0)?.ne(&b)?;
            let flip = a.lt(0.0)?.mul(&odd)?;
            let sign = (flip.to_dtype(DType::F64)? * -2.0)? + 1.0;
            let r = mag.mul(&sign?)?;
            let one = Tensor::ones_like(&r)?;
            b.eq(0.0)?.where_cond(&one, &r)?.to_dtype(x.dtype())?
        }
        "Equal" => x()?.broadcast_eq(y()?)?,
        "Less" => x()?.broadcast_lt(y()?)?,
        "LessOrEqual" => x()?.broadcast_le(y()?)?,
        "Greater" => x()?.broadcast_gt(y()?)?,
        "GreaterOrEqual" => x()?.broadcast_ge(y()?)?,
        "Not" => x()?.eq(0u8)?,
        "Where" => {
            let c = x()?;
            let (a, b) = broadcast_pair(y()?, req(ins, 2, node)?)?;
            let shape = c.shape().broadcast_shape_binary_op(a.shape(), "Where")?;
            c.broadcast_as(shape.clone())?
                .where_cond(&a.broadcast_as(shape.clone())?, &b.broadcast_as(shape)?)?
        }
        "Sum" | "Max" | "Min" | "Mean" => {
            let mut acc = x()?.clone();
            for t in ins.iter().skip(1).flatten() {
                acc = match op {
                    "Max" => acc.broadcast_maximum(t)?,
                    "Min" => acc.broadcast_minimum(t)?,
                    _ => acc.broadcast_add(t)?,
                };
            }
            if op == "Mean" {
                (acc / ins.iter().flatten().count() as f64)?
            } else {
                acc
            }
        }
        "Identity" => x()?.clone(),
        "Dropout" => {
            // Inference: the input unchanged and an all-true mask.
            let x = x()?;
            return Ok(vec![
                x.clone(),
                Tensor::ones(x.dims(), DType::U8, x.device())?,
            ]);
        }
        "Abs" => x()?.abs()?,
        "Neg" => x()?.neg()?,
        "Exp" => x()?.exp()?,
        "Log" => x()?.log()?,
        "Sqrt" => x()?.sqrt()?,
        "Reciprocal" => x()?.recip()?,
        "Floor" => x()?.floor()?,
        "Ceil" => x()?.ceil()?,
        "Sin" => x()?.sin()?,
        "Cos" => x()?.cos()?,
        "Tanh" => x()?.tanh()?,
        "Erf" => {
            let x = x()?;
            let erf = |v: &[f32]| crate::cpu_kernels::map_par(v, candle_core::cpu::erf::erf_f32);
            match cpu_f32_op(x, erf)? {
                Some(r) => r,
                None => x.erf()?,
            }
        }
        "Relu" => x()?.relu()?,
        "Sigmoid" => (x()?.neg()?.exp()? + 1.0)?.recip()?,
        "Gelu" => {
            let x = x()?;
            if attrs::string(node, "approximate", "none") == "tanh" {
                x.gelu()?
            } else {
                gelu_exact(x)?
            }
        }
        "LeakyRelu" => {
            let a = attrs::float(node, "alpha", 0.01) as f64;
            let x = x()?;
            x.relu()?.sub(&(x.neg()?.relu()? * a)?)?
        }
        "Elu" => {
            let a = attrs::float(node, "alpha", 1.0) as f64;
            let x = x()?;
            x.relu()?.add(&((x.minimum(0.0)?.exp()? - 1.0)? * a)?)?
        }
        "HardSigmoid" => {
            let a = attrs::float(node, "alpha", 0.2) as f64;
            let b = attrs::float(node, "beta", 0.5) as f64;
            x()?.affine(a, b)?.clamp(0.0, 1.0)?
        }
        "Clip" => {
            let mut t = x()?.clone();
            let lo = match opt(ins, 1) {
                Some(v) => Some(f64_scalar(v)?),
                None => attrs::has(node, "min").then(|| attrs::float(node, "min", 0.0) as f64),
            };
            let hi = match opt(ins, 2) {
                Some(v) => Some(f64_scalar(v)?),
                None => attrs::has(node, "max").then(|| attrs::float(node, "max", 0.0) as f64),
            };
            if let Some(lo) = lo {
                t = t.maximum(lo)?;
            }
            if let Some(hi) = hi {
                t = t.minimum(hi)?;
            }
            t
        }
        "Softmax" | "LogSoftmax" => {
            let x = x()?;
            // Fused by the planner: softmax of x · scale + shift + mask (fuse.rs).
            let pre;
            let x = match opt(ins, 1) {
                Some(mask) => {
                    let scale = attrs::float(node, fuse::SCALE, 1.0);
                    let shift = attrs::float(node, fuse::SHIFT, 0.0);
                    let last = if ctx.opset < 13 {
                        axis(attrs::int(node, "axis", 1), x.rank())? + 1 == x.rank()
                    } else {
                        axis(attrs::int(node, "axis", -1), x.rank())? + 1 == x.rank()
                    };
                    if last {
                        let over_x = attrs::int(node, crate::in_place::IN_PLACE, 0) != 0;
                        if let Some(r) = masked_softmax(x, mask, scale, shift, over_x)? {
                            return Ok(vec![r]);
                        }
                    }
                    pre = x.affine(scale as f64, shift as f64)?.broadcast_add(mask)?;
                    &pre
                }
                None => x,
            };
            if ctx.opset < 13 {
                // Before opset 13: flatten to 2-D at `axis` (default 1), softmax the rows.
                let a = axis(attrs::int(node, "axis", 1), x.rank())?;
                let outer: usize = x.dims()[..a].iter().product();
                let flat = x.reshape((outer, x.elem_count() / outer.max(1)))?;
                softmax(&flat, 1, op == "LogSoftmax")?.reshape(x.dims())?
            } else {
                let a = axis(attrs::int(node, "axis", -1), x.rank())?;
                softmax(x, a, op == "LogSoftmax")?
            }
        }
        "LRN" => {
            // y = x / (bias + alpha / size * sum of x^2 over `size` neighbouring channels)^beta
            let x = x()?;
            let size = attrs::int(node, "size", 1).max(1) as usize;
            let alpha = attrs::float(node, "alpha", 1e-4) as f64;
            let beta = attrs::float(node, "beta", 0.75) as f64;
            let bias = attrs::float(node, "bias", 1.0) as f64;
            let c = x.dim(1)?;
            let sq = x
                .sqr()?
                .pad_with_zeros(1, (size - 1) / 2, size.div_ceil(2) - 1)?;
            let mut acc = sq.narrow(1, 0, c)?;
            for k in 1..size {
                acc = (acc + sq.narrow(1, k, c)?)?;
            }
            let denom = acc.affine(alpha / size as f64, bias)?.powf(beta)?;
            x.div(&denom)?
        }
        "MatMul" if attrs::has(node, fuse::GELU) => {
            // A linear layer with its GELU fused by the planner (fuse.rs): applied block by
            // block on the CPU kernel, else (and when a Transpose was folded in too) after
            // the plain product.
            if !fuse::permutes(node) {
                if let Some(r) = linear(x()?, y()?, opt(ins, 2), panels_n(node), true)? {
                    return Ok(vec![r]);
                }
            }
            let mut plain = node.clone();
            plain.attribute.retain(|a| a.name != fuse::GELU);
            let r = run(&plain, ins, ctx)?;
            let r = r
                .first()
                .ok_or_else(|| candle_core::Error::Msg("MatMul produced no output".into()))?;
            gelu_exact(r)?
        }
        "MatMul" => {
            let (a, b) = (x()?, y()?);
            let perm = |name| {
                attrs::ints(node, name).map(|p| p.iter().map(|&d| d as usize).collect::<Vec<_>>())
            };
            let perms = [fuse::PERM_A, fuse::PERM_B, fuse::PERM_OUT].map(perm);
            if perms.iter().any(Option::is_some) {
                // Transposes folded in by the planner (fuse.rs): read and written through
                // strides on the CPU; elsewhere the transposes run first.
                let [pa, pb, po] = [0, 1, 2].map(|i| perms[i].as_deref());
                if let Some(r) = permuted_matmul(a, b, [pa, pb, po])? {
                    return Ok(vec![r]);
                }
                let a = pa.map_or(Ok(a.clone()), |p| a.permute(p))?;
                let b = pb.map_or(Ok(b.clone()), |p| b.permute(p))?;
                let mut plain = node.clone();
                plain.attribute.clear(); // a MatMul has no attributes of its own
                let r = run(&plain, &[Some(a.contiguous()?), Some(b.contiguous()?)], ctx)?;
                let r = r
                    .into_iter()
                    .next()
                    .ok_or_else(|| candle_core::Error::Msg("MatMul produced no output".into()))?;
                return Ok(vec![match po {
                    Some(p) => r.permute(p)?.contiguous()?,
                    None => r,
                }]);
            }
            let bias = opt(ins, 2); // fused by the planner (fuse.rs)
            let panels_n = panels_n(node);
            if let Some(r) = linear(a, b, bias, panels_n, false)? {
                return Ok(vec![r]);
            }
            if bias.is_none() && panels_n.is_none() {
                if let Some(r) = batched_matmul(a, b)? {
                    return Ok(vec![r]);
                }
            }
            // Packed weight, other input: back to [k, n] for candle.
            let unpacked;
            let b = match panels_n {
                Some(n) => {
                    let (p, k, w) = b.dims3()?;
                    unpacked = b.permute((1, 0, 2))?.reshape((k, p * w))?.narrow(1, 0, n)?;
                    &unpacked
                }
                None => b,
            };
            let a2 = if a.rank() == 1 {
                a.unsqueeze(0)?
            } else {
                a.clone()
            };
            let b2 = if b.rank() == 1 {
                b.unsqueeze(1)?
            } else {
                b.clone()
            };
            let mut r = a2.broadcast_matmul(&b2)?;
            if b.rank() == 1 {
                r = r.squeeze(D::Minus1)?;
            }
            if a.rank() == 1 {
                r = r.squeeze(r.rank().saturating_sub(if b.rank() == 1 { 1 } else { 2 }))?;
            }
            match bias {
                Some(bias) => r.broadcast_add(bias)?,
                None => r,
            }
        }
        "Gemm" => {
            let mut a = x()?.clone();
            let mut b = y()?.clone();
            if attrs::int(node, "transA", 0) != 0 {
                a = a.t()?;
            }
            if attrs::int(node, "transB", 0) != 0 {
                b = b.t()?;
            }
            let mut r = (a.matmul(&b)? * attrs::float(node, "alpha", 1.0) as f64)?;
            if let Some(c) = opt(ins, 2) {
                r = r.broadcast_add(&(c * attrs::float(node, "beta", 1.0) as f64)?)?;
            }
            r
        }
        "Reshape" => reshape(x()?, &i64s(y()?)?, attrs::int(node, "allowzero", 0) != 0)?,
        "Flatten" => {
            let x = x()?;
            let a = attrs::int(node, "axis", 1);
            let a = if a < 0 { a + x.rank() as i64 } else { a } as usize;
            let outer: usize = x.dims()[..a].iter().product();
            x.reshape((outer, x.elem_count() / outer.max(1)))?
        }
        "Transpose" => {
            let x = x()?;
            let perm: Vec<usize> = match attrs::ints(node, "perm") {
                Some(p) => p.iter().map(|&v| v as usize).collect(),
                None => (0..x.rank()).rev().collect(),
            };
            let dims = x.dims().to_vec();
            let out_dims: Vec<usize> = perm.iter().filter_map(|&p| dims.get(p).copied()).collect();
            let tiled =
                |s: &[&[f32]]| crate::cpu_kernels::transpose_moving_last(s[0], &dims, &perm);
            match on_cpu_f32(&[Some(x)], tiled)?.flatten() {
                Some(v) => Tensor::from_vec(v, out_dims, &Device::Cpu)?,
                None => x.permute(perm)?.contiguous()?,
            }
        }
        "Squeeze" => {
            let x = x()?;
            let axes = match axes_of(node, ins, 1)? {
                Some(a) => a
                    .iter()
                    .map(|&a| axis(a, x.rank()))
                    .collect::<Result<Vec<_>>>()?,
                None => (0..x.rank()).filter(|&i| x.dims()[i] == 1).collect(),
            };
            let dims: Vec<usize> = x
                .dims()
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect();
            x.reshape(dims)?
        }
        "Unsqueeze" => {
            let x = x()?;
            let axes = axes_of(node, ins, 1)?.unwrap_or_default();
            let rank = x.rank() + axes.len();
            let mut axes: Vec<usize> =
                axes.iter().map(|&a| axis(a, rank)).collect::<Result<_>>()?;
            axes.sort_unstable();
            let mut dims = x.dims().to_vec();
            for a in axes {
                dims.insert(a, 1);
            }
            x.reshape(dims)?
        }
        "Concat" => {
            let concat = |ts: &[&Tensor]| -> Result<Tensor> {
                let first = ts
                    .first()
                    .copied()
                    .ok_or_else(|| candle_core::Error::Msg("Concat without inputs".into()))?;
                let a = axis(attrs::int(node, "axis", 0), first.rank())?;
                match crate::ops_fast::concat_f32(ts, a, ctx.threads)? {
                    Some(t) => Ok(t),
                    None => Tensor::cat(ts, a),
                }
            };
            // A link of a dense block's chain (append.rs).
            if crate::append::in_chain(node) {
                return crate::append::run(node, ins, concat);
            }
            concat(&ins.iter().flatten().collect::<Vec<_>>())?
        }
        "Gather" => {
            let x = x()?;
            gather(x, y()?, axis(attrs::int(node, "axis", 0), x.rank())?)?
        }
        "Shape" => {
            let dims: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let r = dims.len() as i64;
            let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let s = norm(attrs::int(node, "start", 0));
            let e = norm(attrs::int(node, "end", r));
            Tensor::new(&dims[s..e.max(s)], dev)?
        }
        "Cast" if crate::lowbit::handles(attrs::int(node, "to", 1) as i32) => {
            let to = attrs::int(node, "to", 1) as i32;
            crate::lowbit::cast(x()?, to, attrs::int(node, "saturate", 1) != 0)?
        }
        "Cast" => {
            let to = attrs::int(node, "to", 1) as i32;
            let d = onnx_dtype(to).ok_or_else(|| {
                candle_core::Error::Msg(format!("Cast to ONNX type {to} is not supported"))
            })?;
            x()?.to_dtype(d)?
        }
        "Slice" => slice(node, ins, x()?)?,
        "Constant" => constant(node)?.to_device(dev)?,
        "ConstantOfShape" => {
            let dims: Vec<usize> = i64s(x()?)?.iter().map(|&d| d.max(0) as usize).collect();
            let v = match attrs::tensor(node, "value") {
                Some(t) => crate::convert::tensor_from_proto(t)?,
                None => Tensor::new(&[0f32], &Device::Cpu)?,
            };
            crate::size_guard::check(&dims, v.dtype().size_in_bytes())?;
            v.flatten_all()?
                .to_device(dev)?
                .broadcast_as(dims)?
                .contiguous()?
        }
        "Expand" => {
            let x = x()?;
            let want: Vec<usize> = i64s(y()?)?.iter().map(|&d| d.max(0) as usize).collect();
            let dims = crate::size_guard::broadcast_dims([x.dims(), &want[..]]);
            crate::size_guard::check(&dims, x.dtype().size_in_bytes())?;
            let shape = x
                .shape()
                .broadcast_shape_binary_op(&candle_core::Shape::from(want), "Expand")?;
            x.broadcast_as(shape)?.contiguous()?
        }
        "Range" => {
            let (s, l, d) = (x()?, y()?, req(ins, 2, node)?);
            let (s0, l0, d0) = (f64_scalar(s)?, f64_scalar(l)?, f64_scalar(d)?);
            let n = ((l0 - s0) / d0).ceil().max(0.0) as usize;
            crate::size_guard::check(&[n], 8)?;
            let v: Vec<f64> = (0..n).map(|i| s0 + i as f64 * d0).collect();
            Tensor::new(v, dev)?.to_dtype(s.dtype())?
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceSumSquare" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSumExp" | "ReduceLogSum" | "ReduceProd" => {
            reduce(node, ins, x()?)?
        }
        "CastLike" => x()?.to_dtype(y()?.dtype())?,
        "Size" => Tensor::new(x()?.elem_count() as i64, dev)?,
        "And" => x()?.broadcast_mul(y()?)?.ne(0u8)?,
        "Or" => x()?.broadcast_add(y()?)?.ne(0u8)?,
        "Xor" => x()?.broadcast_ne(y()?)?,
        "Sign" => x()?.sign()?,
        "Softplus" => (x()?.exp()? + 1.0)?.log()?,
        "Softsign" => x()?.broadcast_div(&(x()?.abs()? + 1.0)?)?,
        "Selu" => {
            let a = attrs::float(node, "alpha", 1.673_263_2) as f64;
            let g = attrs::float(node, "gamma", 1.050_701) as f64;
            let x = x()?;
            ((x.relu()? + ((x.minimum(0.0)?.exp()? - 1.0)? * a)?)? * g)?
        }
        "ArgMax" | "ArgMin" => {
            let x = x()?;
            let a = axis(attrs::int(node, "axis", 0), x.rank())?;
            if attrs::int(node, "select_last_index", 0) != 0 {
                let keep = attrs::int(node, "keepdims", 1) != 0;
                return Ok(vec![crate::ops_more::arg_last(op, x, a, keep)?]);
            }
            let r = if op == "ArgMax" {
                x.argmax_keepdim(a)?
            } else {
                x.argmin_keepdim(a)?
            };
            let r = r.to_dtype(DType::I64)?;
            if attrs::int(node, "keepdims", 1) != 0 {
                r
            } else {
                r.squeeze(a)?
            }
        }
        "Tile" => {
            let reps: Vec<usize> = i64s(y()?)?.iter().map(|&r| r.max(0) as usize).collect();
            let x = x()?;
            let dims: Vec<usize> = x
                .dims()
                .iter()
                .zip(&reps)
                .map(|(&d, &r)| d.saturating_mul(r))
                .collect();
            crate::size_guard::check(&dims, x.dtype().size_in_bytes())?;
            x.repeat(reps)?
        }
        "Pad" => pad(node, ins, x()?)?,
        "Split" => return split(node, ins, x()?),
        "LayerNormalization" => {
            // Input 3: a residual the planner fused in (`Add` before it, fuse.rs).
            let residual = opt(ins, 3);
            let a = axis(attrs::int(node, "axis", -1), x()?.rank())?;
            let eps = attrs::float(node, "epsilon", 1e-5) as f64;
            // Only the normalised output wanted: one parallel pass per row on the CPU.
            if node.output.iter().skip(1).all(|o| o.is_empty()) {
                if let Some(r) = layer_norm(x()?, residual, a, y()?, opt(ins, 2), eps as f32)? {
                    return Ok(vec![r]);
                }
            }
            let summed;
            let x = match residual {
                Some(r) => {
                    summed = x()?.broadcast_add(r)?;
                    &summed
                }
                None => x()?,
            };
            let mut mean = x.clone();
            for d in a..x.rank() {
                mean = mean.mean_keepdim(d)?;
            }
            let c = x.broadcast_sub(&mean)?;
            let mut var = c.sqr()?;
            for d in a..x.rank() {
                var = var.mean_keepdim(d)?;
            }
            let inv_std = (var + eps)?.sqrt()?.recip()?;
            let mut yv = c.broadcast_mul(&inv_std)?.broadcast_mul(y()?)?;
            if let Some(b) = opt(ins, 2) {
                yv = yv.broadcast_add(b)?;
            }
            return Ok(vec![yv, mean, inv_std]);
        }
        "BatchNormalization" => {
            let x = x()?;
            let shape: Vec<usize> = (0..x.rank())
                .map(|i| if i == 1 { x.dim(1).unwrap_or(1) } else { 1 })
                .collect();
            let p = |i: usize| -> Result<Tensor> { req(ins, i, node)?.reshape(shape.clone()) };
            let eps = attrs::float(node, "epsilon", 1e-5) as f64;
            let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
            if attrs::int(node, "training_mode", 0) != 0 {
                return batch_norm_training(node, x, &scale, &bias, &mean, &var, eps);
            }
            x.broadcast_sub(&mean)?
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&scale)?
                .broadcast_add(&bias)?
        }
        "Conv" => conv(node, ins, ctx)?,
        "Resize" | "Upsample" => crate::resize::resize(node, ins, ctx.opset)?,
        "ConvTranspose" => crate::conv_transpose::conv_transpose(node, x()?, y()?, opt(ins, 2))?,
        "Round" => crate::ops_more::round_half_even(x()?)?,
        "HannWindow" | "HammingWindow" | "BlackmanWindow" => {
            crate::ops_more::window_fn(node, x()?)?
        }
        "CenterCropPad" => crate::ops_more::center_crop_pad(node, x()?, y()?)?,
        "Compress" => crate::ops_more::compress(node, x()?, y()?)?,
        "ReverseSequence" => crate::ops_more::reverse_sequence(node, x()?, y()?)?,
        "Det" => crate::ops_more::det(x()?)?,
        "DFT" => crate::spectral::dft(node, ins, ctx.opset)?,
        "STFT" => crate::spectral::stft(node, ins)?,
        "MelWeightMatrix" => crate::spectral::mel_weight_matrix(node, ins)?.to_device(dev)?,
        "Unique" => return crate::ops_more::unique(node, x()?),
        "Tan" | "Asin" | "Acos" | "Atan" | "Sinh" | "Cosh" | "Asinh" | "Acosh" | "Atanh"
        | "HardSwish" | "Mish" | "Celu" | "Shrink" => match crate::ops_nn::unary(node, x()?)? {
            Some(t) => t,
            None => bail!("{op}: no implementation"),
        },
        "IsNaN" => crate::ops_nn::is_nan(x()?)?,
        "PRelu" => crate::ops_nn::prelu(x()?, y()?)?,
        "InstanceNormalization" => {
            crate::ops_nn::instance_norm(node, x()?, y()?, req(ins, 2, node)?)?
        }
        "GroupNormalization" => crate::ops_nn::group_norm(node, x()?, y()?, req(ins, 2, node)?)?,
        "MeanVarianceNormalization" => crate::ops_nn::mvn(node, x()?)?,
        "DepthToSpace" | "SpaceToDepth" => crate::ops_nn::depth_space(node, x()?)?,
        "NonZero" => crate::ops_nn::non_zero(x()?)?,
        "GatherND" => crate::ops_nn::gather_nd(node, x()?, y()?)?,
        "EyeLike" => crate::ops_nn::eye_like(node, x()?)?,
        "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" | "BitShift" => {
            crate::ops_nn::bitwise(node, x()?, Some(y()?))?
        }
        "BitwiseNot" => crate::ops_nn::bitwise(node, x()?, None)?,
        "LpPool" => crate::ops_nn::lp_pool(node, x()?)?,
        "GridSample" => crate::ops_spatial::grid_sample(node, x()?, y()?)?,
        "DeformConv" => crate::deform::deform_conv(node, ins)?,
        "AffineGrid" => crate::ops_spatial::affine_grid(node, x()?, y()?)?,
        "RoiAlign" => crate::ops_spatial::roi_align(node, x()?, y()?, req(ins, 2, node)?)?,
        "MaxUnpool" => crate::ops_spatial::max_unpool(node, x()?, y()?, opt(ins, 2))?,
        "Col2Im" => crate::ops_spatial::col2im(node, x()?, y()?, req(ins, 2, node)?)?,
        "Scatter" | "ScatterElements" => {
            crate::ops_index::scatter_elements(node, x()?, y()?, req(ins, 2, node)?)?
        }
        "ScatterND" => crate::ops_index::scatter_nd(node, x()?, y()?, req(ins, 2, node)?)?,
        "NonMaxSuppression" => crate::ops_index::non_max_suppression(node, ins)?,
        "NegativeLogLikelihoodLoss" => crate::ops_index::nll_loss(node, ins)?,
        "SoftmaxCrossEntropyLoss" => return crate::ops_index::softmax_cross_entropy(node, ins),
        "QuantizeLinear" => crate::ops_index::quantize(node, ins)?,
        "MatMulInteger" => crate::ops_index::matmul_integer(ins)?,
        "ConvInteger" => crate::ops_index::conv_integer(node, ins, ctx)?,
        "QLinearConv" => crate::ops_index::qlinear_conv(node, ins, ctx)?,
        "RNN" | "GRU" | "LSTM" => return crate::rnn::recurrent(node, ins),
        "Einsum" => {
            let operands: Vec<Tensor> = ins.iter().flatten().cloned().collect();
            crate::einsum::einsum(&attrs::string(node, "equation", ""), &operands)?
        }
        "QLinearMatMul" => crate::ops_index::qlinear_matmul(ins)?,
        "DynamicQuantizeLinear" => return crate::ops_index::dynamic_quantize(x()?),
        "DequantizeLinear" => crate::ops_index::dequantize(node, ins)?,
        "IsInf" => crate::ops_more::is_inf(node, x()?)?,
        "ThresholdedRelu" => crate::ops_more::thresholded_relu(node, x()?)?,
        "CumSum" => crate::ops_more::cumsum(node, x()?, y()?)?,
        "Hardmax" => crate::ops_more::hardmax(node, x()?, ctx.opset)?,
        "OneHot" => crate::ops_more::one_hot(node, ins)?,
        "TopK" => return crate::ops_more::top_k(node, x()?, y()?),
        "GatherElements" => {
            let x = x()?;
            let a = axis(attrs::int(node, "axis", 0), x.rank())?;
            let idx = y()?.to_dtype(DType::I64)?;
            let n = x.dim(a)? as f64;
            // Negative indices count from the end.
            let fixed = idx.ge(0i64)?.where_cond(&idx, &idx.affine(1.0, n)?)?;
            x.contiguous()?
                .gather(&fixed.to_dtype(DType::U32)?.contiguous()?, a)?
        }
        "Mod" => {
            let x = x()?;
            let (a, b) = broadcast_pair(&x.to_dtype(DType::F64)?, &y()?.to_dtype(DType::F64)?)?;
            let q = a.div(&b)?;
            // fmod=1: C fmod (truncated quotient); fmod=0: Python's mod (floored quotient).
            let q = if attrs::int(node, "fmod", 0) != 0 {
                q.sign()?.mul(&q.abs()?.floor()?)?
            } else {
                q.floor()?
            };
            a.sub(&b.mul(&q)?)?.to_dtype(x.dtype())?
        }
        "Trilu" => {
            let x = x()?;
            let k = match opt(ins, 1) {
                Some(t) => i64s(t)?.first().copied().unwrap_or(0),
                None => 0,
            };
            let (r, c) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
            let rows = Tensor::arange(0i64, r as i64, dev)?.reshape((r, 1))?;
            let cols = Tensor::arange(0i64, c as i64, dev)?.reshape((1, c))?;
            let diff = cols.broadcast_sub(&rows)?; // j - i
            let keep = if attrs::int(node, "upper", 1) != 0 {
                diff.ge(k)?
            } else {
                diff.le(k)?
            };
            let zeros = Tensor::zeros_like(x)?;
            keep.broadcast_as(x.shape())?.where_cond(x, &zeros)?
        }
        fuse::ATTENTION => {
            // Attention's scores, softmax and product with v (fuse.rs): one kernel on the
            // CPU where the softmax runs along the scores' last axis, else the three nodes.
            let (q, k, v) = (x()?, y()?, req(ins, 2, node)?);
            let mask = opt(ins, 3);
            let perm = |name| {
                attrs::ints(node, name).map(|p| p.iter().map(|&d| d as usize).collect::<Vec<_>>())
            };
            let perms = [fuse::PERM_Q, fuse::PERM_K, fuse::PERM_V, fuse::PERM_OUT].map(perm);
            let default_axis = if ctx.opset < 13 { 1 } else { -1 };
            let last = q.rank() == 4 && axis(attrs::int(node, "axis", default_axis), 4)? == 3;
            if last {
                let scale = attrs::float(node, fuse::SCALE, 1.0);
                let shift = attrs::float(node, fuse::SHIFT, 0.0);
                let perms = perms.each_ref().map(|p| p.as_deref());
                if let Some(r) = fused_attention([q, k, v], mask, perms, (scale, shift))? {
                    return Ok(vec![r]);
                }
            }
            let [scores, softmax, product] = fuse::attention_parts(node);
            let first = |r: Vec<Tensor>| {
                r.into_iter().next().ok_or_else(|| {
                    candle_core::Error::Msg(format!("attention node '{}': no output", node.name))
                })
            };
            let s = first(run(&scores, &[Some(q.clone()), Some(k.clone())], ctx)?)?;
            let p = first(run(&softmax, &[Some(s), mask.cloned()], ctx)?)?;
            return run(&product, &[Some(p), Some(v.clone())], ctx);
        }
        fuse::AFFINE => {
            let (x, scale, shift) = (x()?, y()?, req(ins, 2, node)?);
            let relu = attrs::int(node, fuse::RELU, 0) != 0;
            // Per channel of an NCHW tensor: one pass on the CPU.
            let per_channel = |t: &Tensor| {
                let d = t.dims();
                x.rank() == 4
                    && d.len() <= 4
                    && d.iter()
                        .rev()
                        .enumerate()
                        .all(|(i, &v)| v == 1 || (i == 2 && v == x.dims()[1]))
            };
            if x.rank() == 4 && per_channel(scale) && per_channel(shift) {
                if let Some(r) = channel_affine(x, scale, shift, relu)? {
                    return Ok(vec![r]);
                }
            }
            if scale.elem_count() == 1
                && shift.elem_count() == 1
                && scale.rank() <= x.rank()
                && shift.rank() <= x.rank()
            {
                // One scale and shift for all: the whole tensor is one channel.
                let flat = x.reshape((1, 1, x.elem_count()))?;
                if let Some(r) = channel_affine(&flat, scale, shift, relu)? {
                    return Ok(vec![r.reshape(x.dims())?]);
                }
            }
            let r = x.broadcast_mul(scale)?.broadcast_add(shift)?;
            if relu {
                r.relu()?
            } else {
                r
            }
        }
        TRANSPOSE_LAST_TWO => {
            let x = x()?;
            let r = x.rank();
            if r < 2 {
                bail!("{TRANSPOSE_LAST_TWO}: input of rank {r}")
            }
            x.transpose(r - 2, r - 1)?.contiguous()?
        }
        CHANNEL_AFFINE => {
            let relu = attrs::int(node, fuse::RELU, 0) != 0;
            channel_affine_node(x()?, &ins[1..], relu)?
        }
        "MaxPool" => {
            let x = x()?;
            let dilated = attrs::ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1));
            let indices = node.output.get(1).is_some_and(|o| !o.is_empty());
            // 2-D without dilation, ceil_mode or auto_pad: the fast kernels; anything else
            // (1-D, 3-D, SAME padding, ...) the general pooling.
            let (k, s, p) = match pool_params(node, x) {
                Ok(params) if !dilated && !indices => params,
                _ => return crate::pool::pool(node, x),
            };
            if let Some(t) = pool2d_on_cpu(x, (&k, &s, &p), |pool, v| pool.max(v))? {
                return Ok(vec![t]);
            }
            // Zero padding is neutral after shifting every value to >= 0.
            let lo = x
                .min_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .min(0.0);
            let shifted = (x - lo)?;
            (pad2d(&shifted, &p)?.max_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))? + lo)?
        }
        "AveragePool" => {
            let x = x()?;
            let dilated = attrs::ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1));
            let (k, s, p) = match pool_params(node, x) {
                Ok(params) if !dilated => params,
                _ => return crate::pool::pool(node, x),
            };
            let include_pad = attrs::int(node, "count_include_pad", 0) != 0;
            let average =
                |pool: &crate::cpu_kernels::Pool2d, v: &[f32]| pool.average(v, include_pad);
            if let Some(t) = pool2d_on_cpu(x, (&k, &s, &p), average)? {
                return Ok(vec![t]);
            }
            let avg = pad2d(x, &p)?.avg_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))?;
            if p.iter().any(|&v| v != 0) && !include_pad {
                // Average over the real elements only: divide by the share of them per window.
                let ones = Tensor::ones((1, 1, x.dim(2)?, x.dim(3)?), x.dtype(), x.device())?;
                let share = pad2d(&ones, &p)?.avg_pool2d_with_stride((k[0], k[1]), (s[0], s[1]))?;
                avg.broadcast_div(&share)?
            } else {
                avg
            }
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let mut t = x()?.clone();
            for d in (2..t.rank()).rev() {
                t = if op == "GlobalMaxPool" {
                    t.max_keepdim(d)?
                } else {
                    t.mean_keepdim(d)?
                };
            }
            t
        }
        other => bail!("unsupported ONNX operator '{other}'"),
    };
    Ok(vec![out])
}
