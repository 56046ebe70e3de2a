//! Operators with CPU f32 fast paths — Conv (with what the planner fused into it), the
//! linear and batched MatMul, channel affine, LayerNormalization, masked softmax — and the
//! helper that hands the kernels their tensors' f32 data. Each falls back to candle for
//! other devices and types.
use candle_core::{bail, DType, Device, Layout, Result, Tensor, D};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::fuse;
use crate::ops::{opt, pad2d, req, Ctx};

/// The f32 data of a contiguous CPU tensor's storage; `None` for any other tensor.
pub fn f32_data<'a>(s: &'a candle_core::Storage, layout: &Layout) -> Option<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let (a, b) = layout.contiguous_offsets()?;
            v.get(a..b)
        }
        _ => None,
    }
}

/// An f32 CPU storage from where `layout` starts to its end (a view's data and whatever
/// follows it in the storage); `None` for other storages.
pub(crate) fn f32_from_start<'a>(
    s: &'a candle_core::Storage,
    layout: &Layout,
) -> Option<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            v.get(layout.start_offset()..)
        }
        _ => None,
    }
}

/// Whether `t` is an f32 tensor on the CPU (the fast kernels' domain).
pub(crate) fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Runs `f` on the f32 data of the given CPU tensors (made contiguous; an absent one is an
/// empty slice); `None` when a present tensor is not f32 on the CPU.
pub(crate) fn on_cpu_f32<R>(
    ts: &[Option<&Tensor>],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> Result<Option<R>> {
    if ts.iter().flatten().any(|t| !cpu_f32(t)) {
        return Ok(None);
    }
    let owned: Vec<Option<Tensor>> = ts
        .iter()
        .map(|t| t.map(|t| t.contiguous()).transpose())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = owned
        .iter()
        .map(|t| t.as_ref().map(|t| t.storage_and_layout()))
        .collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for g in &guards {
        match g {
            Some((g, l)) => match f32_data(g, l) {
                Some(v) => slices.push(v),
                None => return Ok(None),
            },
            None => slices.push(&[]),
        }
    }
    Ok(Some(f(&slices)))
}

/// `a [.., k] · b [k, n] (+ bias [n])` on the CPU kernels when everything is f32 on the CPU
/// and `b` is a matrix; `None` to let candle do it.
///
/// With `panels_n` set, `b` is the planner's packed form of a `[k, n]` weight
/// (`[n/16, k, 16]`, see `plan.rs`). With `gelu`, the exact GELU of the result.
pub(crate) fn linear(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    panels_n: Option<usize>,
    gelu: bool,
) -> Result<Option<Tensor>> {
    let want_rank = if panels_n.is_some() { 3 } else { 2 };
    if !(cpu_f32(a) && cpu_f32(b) && bias.is_none_or(cpu_f32))
        || a.rank() < 2
        || b.rank() != want_rank
    {
        return Ok(None);
    }
    let (k, n) = match panels_n {
        Some(n) => (b.dim(1)?, n),
        None => b.dims2()?,
    };
    if a.dim(D::Minus1)? != k || bias.is_some_and(|t| t.dims() != [n]) {
        return Ok(None);
    }
    let run = |s: &[&[f32]]| {
        let w = match panels_n {
            Some(_) => crate::cpu_kernels::Weight::Panels(s[1]),
            None => crate::cpu_kernels::Weight::Rows(s[1]),
        };
        crate::cpu_kernels::linear(s[0], w, bias.map(|_| s[2]), [k, n], gelu)
    };
    let mut dims = a.dims().to_vec();
    *dims.last_mut().unwrap_or(&mut 0) = n;
    on_cpu_f32(&[Some(a), Some(b), bias], run)?
        .map(|out| Tensor::from_vec(out, dims, &Device::Cpu))
        .transpose()
}

/// `x · scale + shift` per channel (dimension 1) on the CPU kernel, when all are f32 on the
/// CPU and `scale`/`shift` hold one value per channel or one in all; `None` otherwise.
pub(crate) fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
) -> Result<Option<Tensor>> {
    let c = x.dim(1)?;
    let fits = |t: &Tensor| cpu_f32(t) && (t.elem_count() == c || t.elem_count() == 1);
    if !(cpu_f32(x) && fits(scale) && fits(shift)) {
        return Ok(None);
    }
    let plane: usize = x.dims()[2..].iter().product();
    let run = |s: &[&[f32]]| crate::cpu_kernels::channel_affine(s[0], c, plane, s[1], s[2], relu);
    on_cpu_f32(&[Some(x), Some(scale), Some(shift)], run)?
        .map(|out| Tensor::from_vec(out, x.dims(), &Device::Cpu))
        .transpose()
}

/// LayerNormalization over the dimensions from `axis` on, with `scale` and `bias` of that
/// size, on the CPU kernel; `None` when the tensors do not fit it.
pub(crate) fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    axis: usize,
    scale: &Tensor,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Option<Tensor>> {
    let d: usize = x.dims()[axis..].iter().product();
    let fits = |t: &Tensor| cpu_f32(t) && t.elem_count() == d;
    if !(cpu_f32(x) && fits(scale) && bias.is_none_or(fits))
        || d == 0
        || residual.is_some_and(|r| r.dims() != x.dims())
    {
        return Ok(None);
    }
    let run = |s: &[&[f32]]| {
        let (res, b) = (residual.map(|_| s[3]), bias.map(|_| s[2]));
        crate::cpu_kernels::layer_norm(s[0], res, d, s[1], b, eps)
    };
    on_cpu_f32(&[Some(x), Some(scale), bias, residual], run)?
        .map(|out| Tensor::from_vec(out, x.dims(), &Device::Cpu))
        .transpose()
}

/// `a [.., m, k] · b [.., k, n]` with the same batch dimensions, on the CPU kernel (the
/// batch split over threads) when both are f32 on the CPU; `None` otherwise.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let r = a.rank();
    if !(cpu_f32(a) && cpu_f32(b))
        || r < 3
        || b.rank() != r
        || a.dims()[..r - 2] != b.dims()[..r - 2]
    {
        return Ok(None);
    }
    let (m, k) = (a.dims()[r - 2], a.dims()[r - 1]);
    let n = b.dims()[r - 1];
    if b.dims()[r - 2] != k {
        return Ok(None);
    }
    let batch: usize = a.dims()[..r - 2].iter().product();
    let run = |s: &[&[f32]]| crate::cpu_kernels::batched_matmul(s[0], s[1], batch, [m, k, n]);
    let mut dims = a.dims().to_vec();
    dims[r - 1] = n;
    on_cpu_f32(&[Some(a), Some(b)], run)?
        .map(|out| Tensor::from_vec(out, dims, &Device::Cpu))
        .transpose()
}

/// `MatMul(a', b')` permuted by `perm_out`, where `a'` and `b'` are `a` and `b` permuted by
/// `perm_a` and `perm_b` (the planner folded the `Transpose` nodes around an attention
/// MatMul into it, `fuse.rs`): rank-4 f32 CPU tensors with equal batch dimensions, read
/// and written in place through strides. `None` when that does not apply (the caller
/// transposes explicitly).
pub(crate) fn permuted_matmul(
    a: &Tensor,
    b: &Tensor,
    [perm_a, perm_b, perm_out]: [Option<&[usize]>; 3],
) -> Result<Option<Tensor>> {
    let (pa, pb, po) = (
        perm_a.unwrap_or(&IDENTITY4),
        perm_b.unwrap_or(&IDENTITY4),
        perm_out.unwrap_or(&IDENTITY4),
    );
    if !([a, b].iter().all(|t| cpu_f32(t) && t.rank() == 4)
        && [pa, pb, po].iter().all(|p| is_perm4(p)))
    {
        return Ok(None);
    }
    let ((da, sa), (db, sb)) = (permuted_view(a, pa), permuted_view(b, pb));
    if da[..2] != db[..2] || da[3] != db[2] {
        return Ok(None);
    }
    let (m, k, n) = (da[2], da[3], db[3]);
    let (out_dims, lo) = permuted_output([da[0], da[1], m, n], po);
    let (la, lb) = (batch_layout(da, sa), batch_layout(db, sb));
    let len = out_dims.iter().product();
    let run = |s: &[&[f32]]| {
        crate::cpu_kernels::strided_batched_matmul(s[0], la, s[1], lb, lo, len, [m, k, n])
    };
    match on_cpu_f32(&[Some(a), Some(b)], run)?.flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, out_dims, &Device::Cpu)?)),
        None => Ok(None),
    }
}

/// The fused attention of `fuse.rs` ([`fuse::ATTENTION`]): per head, `softmax(q · k ·
/// scale + shift + mask) · v` with `q`, `k`, `v` read through their permutations and the
/// result written through `perm_out` (rank-4 f32 CPU tensors; the softmax over the last
/// axis), each head's scores made, normalised and used while in cache. `None` where that
/// does not apply (the caller runs the three nodes).
pub(crate) fn fused_attention(
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
    [perm_q, perm_k, perm_v, perm_out]: [Option<&[usize]>; 4],
    (scale, shift): (f32, f32),
) -> Result<Option<Tensor>> {
    let perms = [perm_q, perm_k, perm_v, perm_out].map(|p| p.unwrap_or(&IDENTITY4));
    if !([q, k, v].iter().all(|t| cpu_f32(t) && t.rank() == 4)
        && mask.is_none_or(cpu_f32)
        && perms.iter().all(|p| is_perm4(p)))
    {
        return Ok(None);
    }
    let [(dq, sq), (dk, sk), (dv, sv)] =
        [(q, perms[0]), (k, perms[1]), (v, perms[2])].map(|(t, p)| permuted_view(t, p));
    if dq[..2] != dk[..2] || dq[..2] != dv[..2] || dq[3] != dk[2] || dk[3] != dv[2] {
        return Ok(None);
    }
    let [m, d, n, e] = [dq[2], dq[3], dk[3], dv[3]];
    let scores = [dq[0], dq[1], m, n];
    let rows = match mask.map(|m| mask_rows(&scores, m.dims())) {
        Some(None) => return Ok(None),
        rows => rows.flatten(),
    };
    let (out_dims, lo) = permuted_output([dq[0], dq[1], m, e], perms[3]);
    let layouts = [(dq, sq), (dk, sk), (dv, sv)].map(|(d, s)| batch_layout(d, s));
    let len = out_dims.iter().product();
    let run = |s: &[&[f32]]| {
        let mask = rows
            .as_ref()
            .map(|(offsets, inner)| (s[3], offsets.as_slice(), *inner));
        let a = crate::cpu_kernels::Attention {
            q: (s[0], layouts[0]),
            k: (s[1], layouts[1]),
            v: (s[2], layouts[2]),
            out: lo,
            dims: [m, d, n, e],
            scale,
            shift,
            mask,
        };
        crate::cpu_kernels::attention(&a, len)
    };
    match on_cpu_f32(&[Some(q), Some(k), Some(v), mask], run)?.flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, out_dims, &Device::Cpu)?)),
        None => Ok(None),
    }
}

/// The identity permutation of rank 4.
const IDENTITY4: [usize; 4] = [0, 1, 2, 3];

/// Whether `p` is a permutation of `0..4`.
fn is_perm4(p: &[usize]) -> bool {
    let mut seen = [false; 4];
    p.len() == 4
        && p.iter()
            .all(|&d| d < 4 && !std::mem::replace(&mut seen[d], true))
}

/// A rank-4 tensor read through permutation `p`: the permuted dims and, for each, its
/// stride in the tensor's contiguous buffer.
fn permuted_view(t: &Tensor, p: &[usize]) -> ([usize; 4], [usize; 4]) {
    let (d, s) = (t.dims(), crate::cpu_kernels::strides(t.dims()));
    (
        [d[p[0]], d[p[1]], d[p[2]], d[p[3]]],
        [s[p[0]], s[p[1]], s[p[2]], s[p[3]]],
    )
}

/// A batch of matrices of dims `[b0, b1, rows, columns]` with those strides.
fn batch_layout(d: [usize; 4], s: [usize; 4]) -> crate::cpu_kernels::MatrixBatch {
    crate::cpu_kernels::MatrixBatch {
        batch: [d[0], d[1]],
        strides: [s[0], s[1]],
        rs: s[2],
        cs: s[3],
    }
}

/// A product's `[b0, b1, m, n]` result written permuted by `po`: the dims of what is
/// written and where each matrix of the product lies in it.
fn permuted_output(
    logical: [usize; 4],
    po: &[usize],
) -> (Vec<usize>, crate::cpu_kernels::MatrixBatch) {
    // Logical axis po[i] has the result's contiguous stride i.
    let out_dims: Vec<usize> = po.iter().map(|&d| logical[d]).collect();
    let os = crate::cpu_kernels::strides(&out_dims);
    let mut so = [0usize; 4];
    for (i, &d) in po.iter().enumerate() {
        so[d] = os[i];
    }
    (out_dims, batch_layout(logical, so))
}

/// Where each row (along the last axis) of a tensor of `dims` finds its row of a mask of
/// `mask` dims broadcast to it, and the mask's step along that row (0 where it broadcasts
/// along it): `None` when it does not broadcast to `dims`.
fn mask_rows(dims: &[usize], mask: &[usize]) -> Option<(Vec<usize>, usize)> {
    let rank = dims.len();
    if rank == 0 || mask.len() > rank {
        return None;
    }
    // The mask's strides against the dimensions (0 where it broadcasts).
    let pad = rank - mask.len();
    let mut strides = vec![0usize; rank];
    let mut acc = 1;
    for i in (0..mask.len()).rev() {
        let (md, xd) = (mask[i], dims[pad + i]);
        if md != xd && md != 1 {
            return None;
        }
        strides[pad + i] = if md == 1 { 0 } else { acc };
        acc *= md;
    }
    let width = dims[rank - 1];
    let rows = dims.iter().product::<usize>() / width.max(1);
    let outer = &dims[..rank - 1];
    let offsets = (0..rows)
        .map(|mut r| {
            let mut off = 0;
            for (d, st) in outer.iter().zip(&strides).rev() {
                off += (r % d) * st;
                r /= d;
            }
            off
        })
        .collect();
    Some((offsets, strides[rank - 1]))
}

/// Softmax over the last axis of `x · scale + shift + mask` on the CPU kernel, when both
/// are f32 on the CPU and `mask` broadcasts to `x`'s shape; `None` otherwise.
pub(crate) fn masked_softmax(
    x: &Tensor,
    mask: &Tensor,
    scale: f32,
    shift: f32,
    over_x: bool,
) -> Result<Option<Tensor>> {
    if !(cpu_f32(x) && cpu_f32(mask)) || x.rank() == 0 {
        return Ok(None);
    }
    let width = x.dim(D::Minus1)?;
    let Some((offsets, inner)) = mask_rows(x.dims(), mask.dims()) else {
        return Ok(None);
    };
    // The planner's leave (in_place.rs) to write the result over x.
    let over = |x: &mut [f32], s: &[&[f32]]| {
        crate::cpu_kernels::masked_softmax_rows_in_place(
            x, width, scale, shift, s[0], &offsets, inner,
        )
    };
    if over_x && write_over(x, &[Some(mask)], over)? {
        return Ok(Some(x.clone()));
    }
    let run = |s: &[&[f32]]| {
        crate::cpu_kernels::masked_softmax_rows(s[0], width, scale, shift, s[1], &offsets, inner)
    };
    on_cpu_f32(&[Some(x), Some(mask)], run)?
        .map(|out| Tensor::from_vec(out, x.dims(), &Device::Cpu))
        .transpose()
}

/// Runs `f(target's data, others' data)` writing over `target` in place (through candle's
/// `InplaceOp1`, others' data as `on_cpu_f32` hands it); false, with nothing written, where
/// `target` is not one contiguous f32 CPU buffer apart from the others' (it is locked for
/// writing while they are read).
fn write_over(
    target: &Tensor,
    others: &[Option<&Tensor>],
    f: impl Fn(&mut [f32], &[&[f32]]),
) -> Result<bool> {
    if !cpu_f32(target) || !target.is_contiguous() || shares_memory(target, others) {
        return Ok(false);
    }
    let run = |s: &[&[f32]]| target.inplace_op1(&WriteOver { others: s, f: &f });
    match on_cpu_f32(others, run)? {
        Some(done) => done.map(|()| true),
        None => Ok(false),
    }
}

/// [`write_over`]'s operation on the target's storage.
struct WriteOver<'a, F> {
    others: &'a [&'a [f32]],
    f: &'a F,
}

impl<F: Fn(&mut [f32], &[&[f32]])> candle_core::InplaceOp1 for WriteOver<'_, F> {
    fn name(&self) -> &'static str {
        "kiln-write-over"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &Layout) -> Result<()> {
        let target = match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => v.get_mut(a..b),
            _ => None,
        };
        let Some(target) = target else {
            bail!("the tensor to write over is not one f32 buffer")
        };
        (self.f)(target, self.others);
        Ok(())
    }
}

/// Whether `t`'s f32 CPU buffer shares memory with any of `others`' (conservatively true
/// for a tensor that is not f32 on the CPU).
pub(crate) fn shares_memory(t: &Tensor, others: &[Option<&Tensor>]) -> bool {
    let span = |t: &Tensor| {
        let (st, _) = t.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Some(v.as_ptr_range()),
            _ => None,
        }
    };
    let Some(a) = span(t) else {
        return true;
    };
    others.iter().flatten().any(|o| match span(o) {
        Some(b) => a.start < b.end && b.start < a.end,
        None => true,
    })
}

/// The exact (erf) GELU: on the CPU kernel for f32 on the CPU, else candle's.
pub(crate) fn gelu_exact(x: &Tensor) -> Result<Tensor> {
    match cpu_f32_op(x, crate::cpu_kernels::gelu)? {
        Some(r) => Ok(r),
        None => x.gelu_erf(),
    }
}

/// `f` on the data of an f32 CPU tensor (same shape out); `None` for other tensors.
pub(crate) fn cpu_f32_op(x: &Tensor, f: impl Fn(&[f32]) -> Vec<f32>) -> Result<Option<Tensor>> {
    on_cpu_f32(&[Some(x)], |s| f(s[0]))?
        .map(|out| Tensor::from_vec(out, x.dims(), &Device::Cpu))
        .transpose()
}

/// A 1-D convolution as a 2-D one of height 1 (attributes and tensors gain a unit axis).
pub(crate) fn conv1d(node: &NodeProto, ins: &[Option<Tensor>], ctx: &Ctx<'_>) -> Result<Tensor> {
    let mut two = node.clone();
    for a in two.attribute.iter_mut() {
        a.ints = match a.name.as_str() {
            "pads" if a.ints.len() == 2 => vec![0, a.ints[0], 0, a.ints[1]],
            "strides" | "dilations" if a.ints.len() == 1 => vec![1, a.ints[0]],
            "kernel_shape" if a.ints.len() == 1 => vec![1, a.ints[0]],
            _ => std::mem::take(&mut a.ints),
        };
    }
    let ins2: Vec<Option<Tensor>> = ins
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            // X, W and a fused residual are [n, c, l]; the bias stays [c].
            Some(t) if i != 2 => t.unsqueeze(2).map(Some),
            other => Ok(other.clone()),
        })
        .collect::<Result<_>>()?;
    conv(&two, &ins2, ctx)?.squeeze(2)
}

/// Elements from one image to the next of a rank-4 view of the first channels of a wider
/// batch (each image one contiguous run, the runs further apart than their length), with
/// the whole of the last image's stride inside its storage; `None` for other tensors.
fn channel_prefix(x: &Tensor) -> Option<usize> {
    let (d, s) = (x.dims(), x.stride());
    if x.rank() != 4 || d[0] < 2 || x.is_contiguous() {
        return None;
    }
    let plane = d[2] * d[3];
    let inner = s[1] == plane && s[2] == d[3] && s[3] == 1;
    let (st, layout) = x.storage_and_layout();
    let len = f32_from_start(&st, layout)?.len();
    (inner && s[0] > d[1] * plane && d[0] * s[0] <= len).then_some(s[0])
}

/// Conv, plus what the planner fused into it (`fuse.rs`): input 3 a residual added to the
/// output, attribute `kiln_relu` a ReLU applied last.
pub(crate) fn conv(node: &NodeProto, ins: &[Option<Tensor>], ctx: &Ctx<'_>) -> Result<Tensor> {
    let x = req(ins, 0, node)?;
    let w = req(ins, 1, node)?;
    // A weight the planner packed (plan.rs), with its own shape.
    let packed = match attrs::ints(node, crate::ops::PACKED_CONV).as_deref() {
        Some(&[oc, icg, kh, kw]) => Some([oc as usize, icg as usize, kh as usize, kw as usize]),
        _ => None,
    };
    // A per-channel affine (and ReLU) on the input, fused by the planner (inputs 4..,
    // fuse.rs): gathered with the patches when the fast path takes it, else applied first.
    let pre_relu = attrs::int(node, fuse::PRE_RELU, 0) != 0;
    if ins.len() > 4 {
        let c = if x.rank() == 4 { x.dim(1)? } else { 0 };
        let fits = |i: usize| {
            opt(ins, i).is_some_and(|t| cpu_f32(t) && (t.elem_count() == c || t.elem_count() == 1))
        };
        if !(cpu_f32(x) && fits(4) && fits(5)) {
            let x = crate::ops::channel_affine_node(x, &ins[4..], pre_relu)?;
            let mut plain = vec![Some(x)];
            plain.extend(ins[1..4].iter().cloned());
            return conv(node, &plain, ctx);
        }
    }
    if x.rank() == 3 && w.rank() == 3 {
        return conv1d(node, ins, ctx);
    }
    if x.rank() != 4 || (w.rank() != 4 && packed.is_none()) {
        bail!("Conv: only 1-D and 2-D convolutions are supported")
    }
    let (oc, icg, kh, kw) = match packed {
        Some([oc, icg, kh, kw]) => (oc, icg, kh, kw),
        None => w.dims4()?,
    };
    let (b, ic, h, wd) = x.dims4()?;
    // Strides, dilations and pads (explicit or from auto_pad) as ONNX defines them.
    let win = crate::pool::window(node, &[h, wd], Some(vec![kh, kw]))?;
    let strides: Vec<i64> = win.stride.iter().map(|&v| v as i64).collect();
    let dil: Vec<i64> = win.dilation.iter().map(|&v| v as i64).collect();
    let p = vec![win.pads[0].0, win.pads[1].0, win.pads[0].1, win.pads[1].1];
    let groups = attrs::int(node, "group", 1) as usize;
    if groups == 0 || ic != icg * groups || oc % groups != 0 {
        bail!("Conv: {ic} input channels do not match the weight's {icg} × {groups} groups")
    }
    let bias = opt(ins, 2);
    let mut residual = opt(ins, 3);
    let mut relu = attrs::int(node, fuse::RELU, 0) != 0;
    let pre = opt(ins, 4).zip(opt(ins, 5));
    let mut y = None;
    if cpu_f32(x) && cpu_f32(w) && p.len() == 4 && strides.len() == 2 && dil.len() == 2 {
        let geo = crate::cpu_conv::Conv2d {
            input: [b, ic, h, wd],
            out_channels: oc,
            kernel: [kh, kw],
            stride: [strides[0] as usize, strides[1] as usize],
            dilation: [dil[0] as usize, dil[1] as usize],
            pads: [p[0], p[1], p[2], p[3]],
            groups,
        };
        let Some([oh, ow]) = geo.out_hw() else {
            bail!("Conv: the kernel is larger than the padded input")
        };
        // A residual of exactly the output's shape is where the products accumulate.
        let res = residual.filter(|r| cpu_f32(r) && r.dims() == [b, oc, oh, ow]);
        let fused_relu = relu && (residual.is_none() || res.is_some());
        let parts = ConvParts {
            packed: packed.is_some(),
            bias: bias.is_some(),
            residual: res.is_some(),
            relu: fused_relu,
            pre: pre.map(|_| pre_relu),
        };
        let slices = [
            Some(x),
            Some(w),
            bias,
            res,
            pre.map(|p| p.0),
            pre.map(|p| p.1),
        ];
        // The planner's leave (in_place.rs) to write the result over the residual.
        let over = res.filter(|_| attrs::int(node, crate::in_place::IN_PLACE, 0) != 0);
        if let Some(r) = over {
            if conv_over(&geo, r, &slices, parts, ctx.threads)? {
                residual = None;
                relu &= !fused_relu;
                y = Some(r.clone());
            }
        }
        // A dense block's features at batch > 1 (append.rs): the first channels of a wider
        // batch, read in place by a pointwise convolution that applies an affine as it
        // gathers its input (DenseNet's BN, ReLU, 1×1 Conv), instead of copied first.
        let pointwise = [kh, kw] == [1, 1]
            && geo.stride == [1, 1]
            && geo.pads == [0; 4]
            && groups == 1
            && pre.is_some()
            && res.is_none();
        let image = channel_prefix(x).filter(|_| pointwise);
        let storage = image.map(|_| x.storage_and_layout());
        let in_place = storage.as_ref().and_then(|(s, l)| f32_from_start(s, l));
        if y.is_none() {
            let mut slices = slices;
            if in_place.is_some() {
                slices[0] = None;
            }
            let run = |s: &[&[f32]]| {
                let (wt, mut f) = parts.of(s);
                if let Some(p) = f.pre.as_mut() {
                    p.image = in_place.and(image);
                }
                geo.run(in_place.unwrap_or(s[0]), wt, &f, ctx.threads)
            };
            if let Some(out) = on_cpu_f32(&slices, run)? {
                if res.is_some() {
                    residual = None;
                }
                relu &= !fused_relu;
                y = Some(Tensor::from_vec(out, (b, oc, oh, ow), &Device::Cpu)?);
            }
        }
    }
    let mut y = match y {
        Some(y) => y,
        None => {
            if strides[0] != strides[1] || dil[0] != dil[1] {
                bail!("Conv: different strides or dilations per axis are not supported")
            }
            let x = match pre {
                Some(_) => crate::ops::channel_affine_node(x, &ins[4..], pre_relu)?,
                None => x.clone(),
            };
            let (x, pad) = if p[0] == p[1] && p[1] == p[2] && p[2] == p[3] {
                (x.clone(), p[0])
            } else {
                (pad2d(&x, &p)?, 0)
            };
            let dense;
            let w = match packed {
                Some(dims) => {
                    let flat =
                        crate::cpu_conv::unpack_weight(&w.to_vec1::<f32>()?, oc, icg, kh * kw);
                    dense =
                        Tensor::from_vec(flat, dims.to_vec(), w.device())?.to_dtype(x.dtype())?;
                    &dense
                }
                None => w,
            };
            let y = x.conv2d(w, pad, strides[0] as usize, dil[0] as usize, groups)?;
            match bias {
                Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
                None => y,
            }
        }
    };
    if let Some(r) = residual {
        y = y.broadcast_add(r)?;
    }
    if relu {
        y = y.relu()?;
    }
    Ok(y)
}

/// Which of a Conv's inputs `on_cpu_f32` hands over (x, weight, bias, residual, and the
/// input affine's scale and shift, in that order) and what is fused.
#[derive(Clone, Copy)]
struct ConvParts {
    packed: bool,
    bias: bool,
    residual: bool,
    relu: bool,
    /// The input affine, with its ReLU or not.
    pre: Option<bool>,
}

impl ConvParts {
    /// The weight and fused work over `on_cpu_f32`'s slices.
    fn of<'a>(self, s: &[&'a [f32]]) -> (crate::cpu_conv::Weight<'a>, crate::cpu_conv::Fused<'a>) {
        let wt = if self.packed {
            crate::cpu_conv::Weight::Packed(s[1])
        } else {
            crate::cpu_conv::Weight::Dense(s[1])
        };
        let f = crate::cpu_conv::Fused {
            bias: self.bias.then_some(s[2]),
            residual: self.residual.then_some(s[3]),
            relu: self.relu,
            pre: self.pre.map(|relu| crate::cpu_conv::PreAffine {
                scale: s[4],
                shift: s[5],
                relu,
                image: None,
            }),
        };
        (wt, f)
    }
}

/// Runs the convolution with its result written over the residual `r` (`slices` as for
/// [`ConvParts`], the residual among them); false, with nothing written, where
/// [`write_over`] cannot.
fn conv_over(
    geo: &crate::cpu_conv::Conv2d,
    r: &Tensor,
    slices: &[Option<&Tensor>; 6],
    parts: ConvParts,
    threads: usize,
) -> Result<bool> {
    let mut others = *slices;
    others[3] = None;
    let over = |acc: &mut [f32], s: &[&[f32]]| {
        let (weight, fused) = parts.of(s);
        let fused = crate::cpu_conv::Fused {
            residual: None,
            ..fused
        };
        geo.run_over(s[0], weight, &fused, threads, acc)
    };
    write_over(r, &others, over)
}

/// `Concat` of f32 CPU tensors along `axis`, the copies spread over `threads` (DenseNet
/// concatenates every layer's features with all before it: a memory-bound copy that one
/// core cannot saturate). `None` when not all are f32 on the CPU with equal other dims;
/// candle's `cat` handles those (and reports mismatched shapes).
pub(crate) fn concat_f32(ts: &[&Tensor], axis: usize, threads: usize) -> Result<Option<Tensor>> {
    let Some(first) = ts.first() else {
        return Ok(None);
    };
    let dims = first.dims();
    let same = |t: &&Tensor| {
        t.rank() == dims.len()
            && t.dims()
                .iter()
                .zip(dims)
                .enumerate()
                .all(|(i, (a, b))| i == axis || a == b)
    };
    if axis >= dims.len() || !ts.iter().all(same) {
        return Ok(None);
    }
    let inner: usize = dims[axis + 1..].iter().product();
    let outer: usize = dims[..axis].iter().product();
    // Elements each input adds to one outer index, and where they start in its row.
    let widths: Vec<usize> = ts.iter().map(|t| t.dims()[axis] * inner).collect();
    let row: usize = widths.iter().sum();
    let starts: Vec<usize> = widths
        .iter()
        .scan(0, |acc, &w| {
            let s = *acc;
            *acc += w;
            Some(s)
        })
        .collect();
    let all: Vec<Option<&Tensor>> = ts.iter().map(|&t| Some(t)).collect();
    let out = on_cpu_f32(&all, |srcs| {
        let len = outer * row;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = crate::sgemm::SharedOut(out.as_mut_ptr());
        // Runs of at most 64 Ki elements: (input, outer index, offset in the run, length).
        const PIECE: usize = 64 * 1024;
        let pieces: Vec<(usize, usize, usize, usize)> = (0..outer)
            .flat_map(|o| (0..ts.len()).map(move |i| (o, i)))
            .flat_map(|(o, i)| {
                let w = widths[i];
                (0..w)
                    .step_by(PIECE)
                    .map(move |at| (i, o, at, PIECE.min(w - at)))
            })
            .collect();
        let copy = |&(i, o, at, n): &(usize, usize, usize, usize)| {
            let from = &srcs[i][o * widths[i] + at..][..n];
            // SAFETY: each piece is its own part of one output row.
            unsafe {
                std::ptr::copy_nonoverlapping(from.as_ptr(), dst.at(o * row + starts[i] + at), n)
            };
        };
        if threads > 1 && pieces.len() > 1 {
            use rayon::prelude::*;
            pieces.par_iter().for_each(copy);
        } else {
            pieces.iter().for_each(copy);
        }
        // SAFETY: every (outer index, input) run was copied, covering the whole output.
        unsafe { out.set_len(len) };
        out
    })?;
    let mut shape = dims.to_vec();
    shape[axis] = ts.iter().map(|t| t.dims()[axis]).sum();
    out.map(|v| Tensor::from_vec(v, shape, &Device::Cpu))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], seed: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7 + seed) % 19) as f32 / 4.0 - 2.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    /// Against explicit permutes and candle's matmul, for attention's three layouts (query
    /// · keyᵀ, probabilities · value with the result permuted back) and a transposed left
    /// side, which the strided kernel leaves to the caller.
    #[test]
    fn permuted_products_match_explicit_transposes() {
        if !crate::sgemm::available() {
            eprintln!("no AVX2/FMA on this CPU: the strided kernel does not run; skipped");
            return;
        }
        let (q, k) = (tensor(&[2, 7, 3, 5], 1), tensor(&[2, 7, 3, 5], 2));
        let p = tensor(&[2, 3, 7, 7], 3);
        type Case<'t> = (&'t Tensor, &'t Tensor, [Option<&'t [usize]>; 3]);
        let cases: [Case; 3] = [
            (&q, &k, [Some(&[0, 2, 1, 3]), Some(&[0, 2, 3, 1]), None]),
            (&p, &q, [None, Some(&[0, 2, 1, 3]), Some(&[0, 2, 1, 3])]),
            (&q, &p, [Some(&[0, 2, 3, 1]), None, None]),
        ];
        for (i, (a, b, perms)) in cases.into_iter().enumerate() {
            let permute = |t: &Tensor, p: Option<&[usize]>| match p {
                Some(p) => t.permute(p).and_then(|t| t.contiguous()),
                None => Ok(t.clone()),
            };
            let want = permute(a, perms[0])
                .and_then(|a| a.matmul(&permute(b, perms[1])?))
                .and_then(|r| permute(&r, perms[2]))
                .expect("reference");
            let got = permuted_matmul(a, b, perms).expect("runs");
            // The same with k = 0: zeros of the product's shape.
            if i == 0 {
                let (qe, ke) = (tensor(&[2, 7, 3, 0], 1), tensor(&[2, 7, 3, 0], 2));
                let empty = permuted_matmul(&qe, &ke, perms)
                    .expect("runs")
                    .expect("k = 0");
                assert_eq!(empty.dims(), &[2, 3, 7, 7]);
                let sum = empty.abs().and_then(|t| t.sum_all()?.to_scalar::<f32>());
                assert_eq!(sum.expect("sum"), 0.0);
            }
            if i == 2 {
                assert!(
                    got.is_none(),
                    "a transposed left side is left to the caller"
                );
                continue;
            }
            let got = got.expect("strided path");
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let diff = (&got - &want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert!(diff < 1e-4, "case {i}: max difference {diff}");
        }
    }
}
