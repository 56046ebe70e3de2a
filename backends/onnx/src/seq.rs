//! ONNX's sequence and optional values and their operators: `SequenceEmpty`,
//! `SequenceConstruct`, `SequenceInsert`, `SequenceAt`, `SequenceErase`, `SequenceLength`,
//! `SplitToSequence`, `ConcatFromSequence`, `Optional`, `OptionalHasElement`,
//! `OptionalGetElement` (and `Identity` on either). A graph holds them as [`Value`]s next to
//! its tensors; `If` and `Loop` carry them, and `SequenceMap` (in `control`) maps a body
//! over them. Triton has no type for them, so they live inside a graph: a served model's
//! inputs and outputs stay tensors.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;

/// A value of a graph: a tensor, a sequence of tensors, or an optional value.
#[derive(Debug, Clone)]
pub enum Value {
    /// A tensor.
    Tensor(Tensor),
    /// A sequence of tensors.
    Sequence(Vec<Tensor>),
    /// An optional value, empty or holding one.
    Optional(Option<Box<Value>>),
}

impl Value {
    /// The tensor this value is (or an optional holds); `None` for an empty optional.
    /// A sequence is an error naming `what`.
    pub fn tensor(&self, what: &str) -> Result<Option<Tensor>> {
        match self {
            Value::Tensor(t) => Ok(Some(t.clone())),
            Value::Optional(None) => Ok(None),
            Value::Optional(Some(v)) => v.tensor(what),
            Value::Sequence(_) => bail!("{what} is a sequence, where a tensor is expected"),
        }
    }

    fn sequence(&self, what: &str) -> Result<&[Tensor]> {
        match self {
            Value::Sequence(s) => Ok(s),
            Value::Optional(Some(v)) => v.sequence(what),
            _ => bail!("{what} is not a sequence"),
        }
    }
}

/// The operators of this module.
const OPS: &[&str] = &[
    "SequenceEmpty",
    "SequenceConstruct",
    "SequenceInsert",
    "SequenceAt",
    "SequenceErase",
    "SequenceLength",
    "SplitToSequence",
    "ConcatFromSequence",
    "Optional",
    "OptionalHasElement",
    "OptionalGetElement",
];

/// Whether `op` (default domain) is one of this module's.
pub fn handles(op: &str) -> bool {
    OPS.contains(&op)
}

/// A position in a sequence of `len` (negative counts from the end); `len` itself is
/// allowed where `end_ok` (an insertion at the end).
fn position(p: Option<&Tensor>, len: usize, end_ok: bool, default: i64) -> Result<usize> {
    let p = match p {
        Some(t) => t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?[0],
        None => default,
    };
    let n = len as i64;
    let q = if p < 0 { p + n } else { p };
    let hi = if end_ok { n } else { n - 1 };
    if q < 0 || q > hi {
        bail!("position {p} is out of range for a sequence of {len}")
    }
    Ok(q as usize)
}

/// Runs one sequence or optional operator (or `Identity` on a non-tensor value).
pub fn run(node: &NodeProto, ins: &[Option<Value>], dev: &Device) -> Result<Vec<Value>> {
    let op = node.op_type.as_str();
    let get = |i: usize| ins.get(i).and_then(Option::as_ref);
    let need = |i: usize| {
        get(i).ok_or_else(|| candle_core::Error::Msg(format!("{op}: input {i} is missing")))
    };
    let tensor = |i: usize| -> Result<Option<Tensor>> {
        get(i)
            .map(|v| v.tensor(&format!("{op} input {i}")))
            .transpose()
            .map(Option::flatten)
    };
    let seq = |i: usize| -> Result<Vec<Tensor>> {
        Ok(need(i)?.sequence(&format!("{op} input {i}"))?.to_vec())
    };
    Ok(vec![match op {
        "Identity" => need(0)?.clone(),
        "SequenceEmpty" => Value::Sequence(Vec::new()),
        "SequenceConstruct" => Value::Sequence(
            (0..ins.len())
                .map(|i| {
                    tensor(i)?.ok_or_else(|| {
                        candle_core::Error::Msg(format!("{op}: input {i} is missing"))
                    })
                })
                .collect::<Result<_>>()?,
        ),
        "SequenceInsert" => {
            let mut s = seq(0)?;
            let t = tensor(1)?
                .ok_or_else(|| candle_core::Error::Msg(format!("{op}: no tensor to insert")))?;
            let at = position(tensor(2)?.as_ref(), s.len(), true, s.len() as i64)?;
            s.insert(at, t);
            Value::Sequence(s)
        }
        "SequenceAt" => {
            let s = seq(0)?;
            let at = position(tensor(1)?.as_ref(), s.len(), false, 0)?;
            Value::Tensor(s[at].clone())
        }
        "SequenceErase" => {
            let mut s = seq(0)?;
            let at = position(tensor(1)?.as_ref(), s.len(), false, -1)?;
            s.remove(at);
            Value::Sequence(s)
        }
        "SequenceLength" => Value::Tensor(Tensor::new(seq(0)?.len() as i64, dev)?),
        "SplitToSequence" => {
            let x = tensor(0)?.ok_or_else(|| candle_core::Error::Msg(format!("{op}: no input")))?;
            Value::Sequence(split(node, &x, tensor(1)?.as_ref())?)
        }
        "ConcatFromSequence" => Value::Tensor(concat(node, &seq(0)?)?),
        "Optional" => Value::Optional(get(0).map(|v| Box::new(v.clone()))),
        "OptionalHasElement" => {
            let has = match get(0) {
                None | Some(Value::Optional(None)) => false,
                Some(_) => true,
            };
            Value::Tensor(Tensor::new(has as u8, dev)?)
        }
        "OptionalGetElement" => match need(0)? {
            Value::Optional(None) => bail!("OptionalGetElement: the optional is empty"),
            Value::Optional(Some(v)) => (**v).clone(),
            v => v.clone(),
        },
        _ => bail!("{op} is not a sequence operator"),
    }])
}

/// SplitToSequence: `x` cut along `axis` into pieces of 1 (squeezed unless `keepdims`), of
/// the scalar `split` (the last may be shorter), or of the sizes `split` lists.
fn split(node: &NodeProto, x: &Tensor, sizes: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let a = crate::ops::axis(attrs::int(node, "axis", 0), x.rank())?;
    let n = x.dims()[a];
    let (lens, squeeze) = match sizes {
        None => (vec![1; n], attrs::int(node, "keepdims", 1) == 0),
        Some(s) => {
            let v = s.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            let lens: Vec<usize> = if s.rank() == 0 {
                let k = v[0].max(1) as usize;
                (0..n).step_by(k).map(|i| k.min(n - i)).collect()
            } else {
                v.iter().map(|&l| l.max(0) as usize).collect()
            };
            if lens.iter().sum::<usize>() != n {
                bail!("SplitToSequence: split sizes {lens:?} do not add up to {n}")
            }
            (lens, false)
        }
    };
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for l in lens {
        let piece = x.narrow(a, at, l)?;
        out.push(if squeeze { piece.squeeze(a)? } else { piece });
        at += l;
    }
    Ok(out)
}

/// ConcatFromSequence: the tensors joined along `axis`, or stacked on a new one (`new_axis`).
fn concat(node: &NodeProto, s: &[Tensor]) -> Result<Tensor> {
    let Some(first) = s.first() else {
        bail!("ConcatFromSequence: the sequence is empty")
    };
    let new_axis = attrs::int(node, "new_axis", 0) != 0;
    let a = crate::ops::axis(
        attrs::int(node, "axis", 0),
        first.rank() + new_axis as usize,
    )?;
    if new_axis {
        Tensor::stack(s, a)
    } else {
        Tensor::cat(s, a)
    }
}
