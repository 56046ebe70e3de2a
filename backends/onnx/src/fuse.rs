//! Planner rewrites that merge a node with the element-wise nodes after it, so their work
//! happens while the node's output is still in cache instead of as separate passes:
//!
//! * `Add(Conv(..), r)` → one `Conv` whose input 3 is the residual `r`, and `Relu(Conv(..))`
//!   → one `Conv` whose attribute [`RELU`] asks for the ReLU; together they merge ResNet's
//!   `Relu(Add(Conv, shortcut))`;
//! * `Add(MatMul(x, W), b)` with a constant 2-D `W` and constant 1-D `b` → one `MatMul`
//!   whose input 2 is the bias (every linear layer of a transformer export); a plain
//!   `Gemm(x, W, c)` with constant `W` and `c` (alpha and beta 1, `x` not transposed) →
//!   the same `MatMul`, `W` transposed once here when `transB` asks (image classifiers'
//!   last layer), so both run on the packed CPU kernel;
//! * chains of `Mul`/`Add`/`Div` by constants → one [`AFFINE`] node `x · S + T` (S, T the chain's
//!   constants combined by broadcasting, so the result is exactly the chain's), folded into
//!   the weights and bias of a Conv before it when S and T are per output channel, with a
//!   following `Relu` merged into it, or merged into a BatchNormalization before it
//!   (DenseNet's `BatchNormalization, Mul, Add, Relu` becomes one pass);
//! * `LayerNormalization(Add(a, b))` → one LayerNormalization with the residual `b` as
//!   input 3;
//! * attention's `Softmax(Add(x · s + t, mask))` (scores scaled by a scalar, then the mask)
//!   → one `Softmax` with the mask as input 1 and attributes [`SCALE`], [`SHIFT`];
//! * a per-channel affine (a BatchNormalization, with its ReLU) whose only reader is a
//!   Conv → that Conv with the affine's parameters as inputs 4.. ([`PRE_RELU`] for the ReLU), applied
//!   while the convolution gathers its input (DenseNet's pre-activation `BN, ReLU, Conv`);
//! * the exact GELU as exporters write it, `x · ½ · (1 + erf(x / √2))` (five element-wise
//!   nodes, in either order of the products) → one ONNX `Gelu` node, and `Gelu` of a linear
//!   layer's `MatMul` → that MatMul with attribute [`GELU`] (applied to each block of the
//!   product as it is finished, while in cache);
//! * rank-4 `Transpose` nodes before or after a `MatMul` → the MatMul reading or writing
//!   through the permutation ([`PERM_A`], [`PERM_B`], [`PERM_OUT`]): attention's heads
//!   without transposed copies;
//! * attention's `MatMul(Softmax(MatMul(q, k)), v)` (the Softmax fused as above or plain,
//!   the products with their folded transposes) → one [`ATTENTION`] node, run head by
//!   head with the scores in cache.
//!
//! A value is only fused away when the merged node was its single consumer and it is not a
//! graph output. The merged node takes the place of the last node of the pattern, where
//! every value it reads exists.
use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use candle_onnx::onnx::{attribute_proto::AttributeType, AttributeProto, NodeProto};

use crate::ops::CHANNEL_AFFINE;

/// Attribute of a fused `Conv` or [`AFFINE`]: apply ReLU to the result.
pub const RELU: &str = "kiln_relu";

/// Attribute of a fused `MatMul` (a linear layer with a constant weight): apply the exact
/// GELU to the result.
pub const GELU: &str = "kiln_gelu";

/// Attributes of a fused `Softmax(x · scale + shift + mask)` (mask = input 1).
pub const SCALE: &str = "kiln_scale";
/// See [`SCALE`].
pub const SHIFT: &str = "kiln_shift";

/// Attribute of a Conv with a per-channel affine on its input (inputs 4 and 5): apply ReLU
/// after the affine, before the convolution.
pub const PRE_RELU: &str = "kiln_pre_relu";

/// Attributes of a `MatMul` that reads input 0 / input 1 permuted, or writes its result
/// permuted: the rank-4 permutation of the `Transpose` folded in (attention's heads).
pub const PERM_A: &str = "kiln_perm_a";
/// See [`PERM_A`].
pub const PERM_B: &str = "kiln_perm_b";
/// See [`PERM_A`].
pub const PERM_OUT: &str = "kiln_perm_out";

/// `x · S + T` with constants S and T (inputs 1 and 2), broadcasting as `Mul` and `Add` do.
pub const AFFINE: &str = "KilnAffine";

/// Attention's `MatMul(Softmax(MatMul(q, k) · scale + shift + mask), v)` as one node
/// (inputs `q, k, v[, mask]`; the Softmax's `axis`, [`SCALE`] and [`SHIFT`]; the products'
/// folded transposes as [`PERM_Q`], [`PERM_K`], [`PERM_V`] and [`PERM_OUT`]).
pub const ATTENTION: &str = "KilnAttention";
/// Attributes of an [`ATTENTION`] node: the permutations `q`, `k` and `v` are read through.
pub const PERM_Q: &str = "kiln_perm_q";
/// See [`PERM_Q`].
pub const PERM_K: &str = "kiln_perm_k";
/// See [`PERM_Q`].
pub const PERM_V: &str = "kiln_perm_v";

struct Graph<'a> {
    consumers: HashMap<String, usize>,
    producer: HashMap<String, usize>,
    outputs: HashSet<&'a str>,
}

impl Graph<'_> {
    /// The index of the node producing `value` if only one node reads it and it is no
    /// graph output.
    fn sole_producer(&self, value: &str) -> Option<usize> {
        if self.consumers.get(value) != Some(&1) || self.outputs.contains(value) {
            return None;
        }
        self.producer.get(value).copied()
    }
}

fn is_add(n: &NodeProto) -> bool {
    (n.op_type == "Add" || n.op_type == "Sum") && n.input.len() == 2 && n.output.len() == 1
}

fn graph<'a>(slots: &[Option<NodeProto>], graph_outputs: &'a [String]) -> Graph<'a> {
    let mut consumers: HashMap<String, usize> = HashMap::new();
    for n in slots.iter().flatten() {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *consumers.entry(i.clone()).or_default() += 1;
        }
    }
    Graph {
        consumers,
        producer: slots
            .iter()
            .enumerate()
            .filter_map(|(k, n)| n.as_ref().map(|n| (k, n)))
            .flat_map(|(k, n)| n.output.iter().map(move |o| (o.clone(), k)))
            .collect(),
        outputs: graph_outputs.iter().map(String::as_str).collect(),
    }
}

/// One rewrite: given the graph and a node, the merged node that replaces it and the
/// indices of the nodes it absorbed.
type Rewrite<'c> =
    dyn FnMut(&Graph, &[Option<NodeProto>], &NodeProto) -> Option<(NodeProto, Vec<usize>)> + 'c;

fn sweep(slots: &mut [Option<NodeProto>], graph_outputs: &[String], rewrite: &mut Rewrite<'_>) {
    let g = graph(slots, graph_outputs);
    for k in 0..slots.len() {
        let Some(n) = slots[k].clone() else { continue };
        if let Some((node, removed)) = rewrite(&g, slots, &n) {
            for r in removed {
                slots[r] = None;
            }
            slots[k] = Some(node);
        }
    }
}

/// Applies the rewrites in the module docs; new constants (folded weights, combined
/// scales) go into `constants`.
pub fn fuse(
    nodes: Vec<NodeProto>,
    constants: &mut HashMap<String, Tensor>,
    graph_outputs: &[String],
) -> Vec<NodeProto> {
    let mut slots: Vec<Option<NodeProto>> = nodes.into_iter().map(Some).collect();
    sweep(&mut slots, graph_outputs, &mut |_, _, n| {
        gemm_as_matmul(n, constants).map(|m| (m, Vec::new()))
    });
    // Linear layers first, so their bias Add is not taken for an affine chain.
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        is_add(n)
            .then(|| bias_into_matmul(g, s, n, constants))
            .flatten()
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        affine_chain(g, s, n, constants)
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        gelu(g, s, n, constants)
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        gelu_into_matmul(g, s, n, constants)
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        masked_softmax(g, s, n, constants)
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        add_into_layer_norm(g, s, n)
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        affine_into_conv(g, s, n, constants).or_else(|| affine_into_batch_norm(g, s, n, constants))
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        if n.op_type == "Relu" && n.input.len() == 1 {
            relu_chain(g, s, n)
        } else if is_add(n) {
            add_into_conv(g, s, n)
        } else {
            None
        }
    });
    sweep(&mut slots, graph_outputs, &mut |g, s, n| {
        affine_before_conv(g, s, n, constants)
    });
    sweep(&mut slots, graph_outputs, &mut transpose_into_matmul);
    sweep(&mut slots, graph_outputs, &mut transposes_into_matmul);
    sweep(&mut slots, graph_outputs, &mut attention);
    slots.into_iter().flatten().collect()
}

/// Where an [`ATTENTION`] node's attributes come from: (part, the attribute there, its name
/// on the fused node), the parts being the scores' MatMul (0), the Softmax (1) and the
/// MatMul with `v` (2). Read one way to fuse and the other to split again.
const ATTENTION_ATTRS: [(usize, &str, &str); 7] = [
    (0, PERM_A, PERM_Q),
    (0, PERM_B, PERM_K),
    (1, "axis", "axis"),
    (1, SCALE, SCALE),
    (1, SHIFT, SHIFT),
    (2, PERM_B, PERM_V),
    (2, PERM_OUT, PERM_OUT),
];

/// `MatMul(Softmax(MatMul(q, k) [· scale + shift + mask]), v)`, the products reading and
/// writing through folded transposes → one [`ATTENTION`] node `(q, k, v[, mask])`: per
/// head, the scores, their softmax and the product with `v` while the scores are in
/// cache, instead of three passes over every head's scores.
fn attention(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    let plain_matmul = |m: &NodeProto| {
        m.op_type == "MatMul"
            && m.input.len() == 2
            && m.output.len() == 1
            && !crate::attrs::has(m, GELU)
    };
    if !plain_matmul(n) || crate::attrs::has(n, PERM_A) {
        return None;
    }
    let s = g.sole_producer(&n.input[0])?;
    let softmax = slots[s]
        .as_ref()
        .filter(|x| x.op_type == "Softmax" && (1..=2).contains(&x.input.len()))?;
    let q = g.sole_producer(&softmax.input[0])?;
    let scores = slots[q]
        .as_ref()
        .filter(|m| plain_matmul(m) && !crate::attrs::has(m, PERM_OUT))?;
    let parts = [scores, softmax, n];
    let mut input = vec![
        scores.input[0].clone(),
        scores.input[1].clone(),
        n.input[1].clone(),
    ];
    input.extend(softmax.input.get(1).cloned());
    let attribute = ATTENTION_ATTRS
        .iter()
        .filter_map(|&(part, from, to)| renamed(parts[part], from, to))
        .collect();
    let node = NodeProto {
        op_type: ATTENTION.into(),
        name: n.name.clone(),
        input,
        output: n.output.clone(),
        attribute,
        ..Default::default()
    };
    Some((node, vec![s, q]))
}

/// `node`'s attribute `from`, named `to`.
fn renamed(node: &NodeProto, from: &str, to: &str) -> Option<AttributeProto> {
    node.attribute
        .iter()
        .find(|a| a.name == from)
        .map(|a| AttributeProto {
            name: to.into(),
            ..a.clone()
        })
}

/// The three nodes an [`ATTENTION`] node stands for, reading `scores` and `probs` between
/// them: the scores' MatMul, the Softmax and the MatMul with `v` (for running them one by
/// one where the fused kernel does not apply).
pub fn attention_parts(node: &NodeProto) -> [NodeProto; 3] {
    let (scores, probs) = (
        format!("{}::scores", node.name),
        format!("{}::probs", node.name),
    );
    let mut softmax_in = vec![scores.clone()];
    softmax_in.extend(node.input.get(3).cloned());
    let output = node.output.first().cloned().unwrap_or_default();
    let ops = ["MatMul", "Softmax", "MatMul"];
    let inputs = [
        node.input[..2].to_vec(),
        softmax_in,
        vec![probs.clone(), node.input[2].clone()],
    ];
    let outputs = [scores, probs, output];
    std::array::from_fn(|i| NodeProto {
        op_type: ops[i].into(),
        name: node.name.clone(),
        input: inputs[i].clone(),
        output: vec![outputs[i].clone()],
        attribute: ATTENTION_ATTRS
            .iter()
            .filter(|&&(p, _, _)| p == i)
            .filter_map(|&(_, to, from)| renamed(node, from, to))
            .collect(),
        ..Default::default()
    })
}

/// Whether the planner folded a `Transpose` into this `MatMul` ([`PERM_A`] and others).
pub fn permutes(node: &NodeProto) -> bool {
    node.attribute
        .iter()
        .any(|a| [PERM_A, PERM_B, PERM_OUT].contains(&a.name.as_str()))
}

/// The permutation of a `Transpose` with an explicit rank-4 `perm`.
fn rank4_perm(n: &NodeProto) -> Option<Vec<i64>> {
    if n.op_type != "Transpose" || n.input.len() != 1 || n.output.len() != 1 {
        return None;
    }
    crate::attrs::ints(n, "perm").filter(|p| p.len() == 4)
}

/// `Transpose(MatMul(a, b))` (rank 4) → the MatMul writing its result permuted
/// ([`PERM_OUT`]): attention's heads merged back into `[b, s, heads, d]` as they are
/// computed.
fn transpose_into_matmul(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    let perm = rank4_perm(n)?;
    let k = g.sole_producer(&n.input[0])?;
    let mm = slots[k].as_ref()?;
    if mm.op_type != "MatMul" || mm.input.len() != 2 || crate::attrs::has(mm, PERM_OUT) {
        return None;
    }
    let mut merged = mm.clone();
    merged.output = n.output.clone();
    merged
        .attribute
        .push(crate::attrs::new_ints(PERM_OUT, perm));
    Some((merged, vec![k]))
}

/// `MatMul(Transpose(a), Transpose(b))` (rank-4 permutations, either or both) → the MatMul
/// reading `a` and `b` permuted ([`PERM_A`], [`PERM_B`]): attention's query, key and
/// value heads read from `[b, s, heads, d]` without transposed copies.
fn transposes_into_matmul(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    if n.op_type != "MatMul" || n.input.len() != 2 {
        return None;
    }
    let mut merged = n.clone();
    let mut removed = Vec::new();
    for (i, attr) in [(0, PERM_A), (1, PERM_B)] {
        let Some(t) = g.sole_producer(&n.input[i]) else {
            continue;
        };
        let Some((tp, perm)) = slots[t].as_ref().and_then(|tp| Some((tp, rank4_perm(tp)?))) else {
            continue;
        };
        if crate::attrs::has(n, attr) {
            continue;
        }
        merged.input[i] = tp.input[0].clone();
        merged.attribute.push(crate::attrs::new_ints(attr, perm));
        removed.push(t);
    }
    (!removed.is_empty()).then_some((merged, removed))
}

/// `Conv(ChannelAffine(x))` → `Conv(x)` with the affine's other inputs as inputs 4.. (its
/// per-channel scale and shift first; inputs 2 and 3, bias and residual, left empty where
/// absent) and its ReLU as [`PRE_RELU`]. Only for one f32 value per input channel of a
/// 2-D convolution's weight.
fn affine_before_conv(
    g: &Graph,
    slots: &[Option<NodeProto>],
    conv: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    if conv.op_type != "Conv" || conv.input.len() > 4 || conv.input.len() < 2 {
        return None;
    }
    let p = g.sole_producer(&conv.input[0])?;
    let affine = slots[p].as_ref().filter(|a| {
        a.op_type == CHANNEL_AFFINE
            && (a.input.len() == 3 || a.input.len() == 7)
            && a.output.len() == 1
    })?;
    let (s, t) = (
        constants.get(&affine.input[1])?,
        constants.get(&affine.input[2])?,
    );
    let w = constants.get(&conv.input[1])?;
    let groups = conv
        .attribute
        .iter()
        .find(|a| a.name == "group")
        .map_or(1, |a| a.i.max(1) as usize);
    let (_, icg, _, _) = w.dims4().ok()?;
    let c = icg * groups;
    let f32 = candle_core::DType::F32;
    if s.dims() != [c] || t.dims() != [c] || s.dtype() != f32 || t.dtype() != f32 {
        return None;
    }
    let mut node = conv.clone();
    node.input[0] = affine.input[0].clone();
    node.input.resize(4, String::new());
    node.input.extend(affine.input[1..].iter().cloned());
    let relu = affine.attribute.iter().any(|a| a.name == RELU && a.i != 0);
    node.attribute
        .push(crate::attrs::new_int(PRE_RELU, relu as i64));
    Some((node, vec![p]))
}

/// A constant usable in an affine chain: f32 and at most one dimension above 1.
fn affine_constant<'t>(constants: &'t HashMap<String, Tensor>, name: &str) -> Option<&'t Tensor> {
    constants.get(name).filter(|t| {
        t.dtype() == candle_core::DType::F32 && t.dims().iter().filter(|&&d| d > 1).count() <= 1
    })
}

fn affine_node(like: &NodeProto, x: &str, s: String, t: String) -> NodeProto {
    NodeProto {
        op_type: AFFINE.into(),
        name: like.name.clone(),
        input: vec![x.into(), s, t],
        output: like.output.clone(),
        ..Default::default()
    }
}

/// `Mul(x, c)` / `Add(x, c)` → an affine node, merged with an affine node producing `x`.
fn affine_chain(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &mut HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    if !matches!(n.op_type.as_str(), "Mul" | "Add" | "Div")
        || n.input.len() != 2
        || n.output.len() != 1
    {
        return None;
    }
    let (x, c) = if affine_constant(constants, &n.input[1]).is_some() {
        (&n.input[0], &n.input[1])
    } else if n.op_type != "Div" && affine_constant(constants, &n.input[0]).is_some() {
        (&n.input[1], &n.input[0])
    } else {
        return None;
    };
    if constants.contains_key(x) {
        return None; // both constant: folded already
    }
    let mut cv = affine_constant(constants, c)?.clone();
    if n.op_type == "Div" {
        cv = cv.recip().ok()?; // x / c = x · (1 / c)
    }
    let prev = g.sole_producer(x).and_then(|p| {
        slots[p]
            .as_ref()
            .filter(|a| a.op_type == AFFINE && a.attribute.is_empty())
            .map(|a| (p, a))
    });
    let one = || Tensor::ones((), candle_core::DType::F32, cv.device());
    let zero = || Tensor::zeros((), candle_core::DType::F32, cv.device());
    let (input, s0, t0, removed) = match prev {
        Some((p, a)) => (
            a.input[0].clone(),
            constants.get(&a.input[1])?.clone(),
            constants.get(&a.input[2])?.clone(),
            vec![p],
        ),
        None => (x.clone(), one().ok()?, zero().ok()?, vec![]),
    };
    // (x·S + T)·c = x·(S·c) + T·c ; (x·S + T) + c = x·S + (T + c)
    let (s1, t1) = if n.op_type != "Add" {
        (s0.broadcast_mul(&cv).ok()?, t0.broadcast_mul(&cv).ok()?)
    } else {
        (s0, t0.broadcast_add(&cv).ok()?)
    };
    let (sn, tn) = (
        format!("{}::affine_s", n.output[0]),
        format!("{}::affine_t", n.output[0]),
    );
    constants.insert(sn.clone(), s1);
    constants.insert(tn.clone(), t1);
    Some((affine_node(n, &input, sn, tn), removed))
}

/// The per-output-channel values of an affine constant for a Conv with `oc` output
/// channels (shapes `[]`, `[1]`, `[oc,1,1]`, `[1,oc,1,1]`), as `[oc]`.
fn per_channel(t: &Tensor, oc: usize) -> Option<Tensor> {
    let dims = t.dims();
    let ok = match dims.len() {
        0 => true,
        1 => dims[0] == 1,
        3 => dims[1] == 1 && dims[2] == 1 && (dims[0] == oc || dims[0] == 1),
        4 => dims[0] == 1 && dims[2] == 1 && dims[3] == 1 && (dims[1] == oc || dims[1] == 1),
        _ => false,
    };
    if !ok {
        return None;
    }
    t.flatten_all()
        .ok()?
        .broadcast_as(oc)
        .ok()?
        .contiguous()
        .ok()
}

/// `Softmax(Add(p, mask))`, `p` optionally a scalar affine `x · s + t`: one Softmax node
/// reading `x` and `mask` (it keeps Softmax's own attributes, so its axis semantics).
fn masked_softmax(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    if n.op_type != "Softmax" || n.input.len() != 1 {
        return None;
    }
    let a = g.sole_producer(&n.input[0])?;
    let add = slots[a].as_ref().filter(|x| is_add(x))?;
    let mut removed = vec![a];
    let (mut x, mut mask) = (add.input[0].clone(), add.input[1].clone());
    let (mut s, mut t) = (1.0, 0.0);
    for (side, other) in [(0, 1), (1, 0)] {
        let Some(k) = g.sole_producer(&add.input[side]) else {
            continue;
        };
        let Some(aff) = slots[k]
            .as_ref()
            .filter(|x| x.op_type == AFFINE && x.attribute.is_empty())
        else {
            continue;
        };
        let (Some(sv), Some(tv)) = (
            scalar(constants, &aff.input[1]),
            scalar(constants, &aff.input[2]),
        ) else {
            continue;
        };
        (x, mask, s, t) = (aff.input[0].clone(), add.input[other].clone(), sv, tv);
        removed.push(k);
        break;
    }
    let float = |name: &str, f: f32| AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    };
    let mut node = n.clone();
    node.input = vec![x, mask];
    node.attribute.push(float(SCALE, s));
    node.attribute.push(float(SHIFT, t));
    Some((node, removed))
}

/// `LayerNormalization(Add(a, b), scale, bias)` → one LayerNormalization of `a` with `b` as
/// input 3, added as the rows are read (transformers' residual connections).
fn add_into_layer_norm(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    if n.op_type != "LayerNormalization" || n.input.len() > 3 {
        return None;
    }
    let k = g.sole_producer(&n.input[0])?;
    let add = slots[k].as_ref().filter(|a| is_add(a))?;
    let mut node = n.clone();
    node.input.resize(3, String::new());
    node.input[0] = add.input[0].clone();
    node.input.push(add.input[1].clone());
    Some((node, vec![k]))
}

/// The value of a one-element f32 constant.
fn scalar(constants: &HashMap<String, Tensor>, name: &str) -> Option<f32> {
    let t = constants.get(name)?;
    if t.elem_count() != 1 || t.dtype() != candle_core::DType::F32 {
        return None;
    }
    t.flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()?
        .first()
        .copied()
}

/// The input `x` of `n` if it is an affine node `x · s + t` with scalar `s` and `t`.
fn affine_input(
    constants: &HashMap<String, Tensor>,
    n: &NodeProto,
    s: f32,
    t: f32,
) -> Option<String> {
    if n.op_type != AFFINE || !n.attribute.is_empty() {
        return None;
    }
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    (close(scalar(constants, &n.input[1])?, s) && close(scalar(constants, &n.input[2])?, t))
        .then(|| n.input[0].clone())
}

/// [`affine_input`] of the node in slot `k`.
fn scalar_affine(
    constants: &HashMap<String, Tensor>,
    slots: &[Option<NodeProto>],
    k: usize,
    s: f32,
    t: f32,
) -> Option<String> {
    affine_input(constants, slots[k].as_ref()?, s, t)
}

/// `1 + erf(h / √2)` produced by sole-consumer nodes: returns `h` and the nodes.
fn one_plus_erf(
    g: &Graph,
    constants: &HashMap<String, Tensor>,
    slots: &[Option<NodeProto>],
    value: &str,
) -> Option<(String, Vec<usize>)> {
    let add = g.sole_producer(value)?;
    let e = g.sole_producer(&scalar_affine(constants, slots, add, 1.0, 1.0)?)?;
    let erf = slots[e].as_ref().filter(|n| n.op_type == "Erf")?;
    let div = g.sole_producer(&erf.input[0])?;
    let h = scalar_affine(constants, slots, div, std::f32::consts::FRAC_1_SQRT_2, 0.0)?;
    Some((h, vec![add, e, div]))
}

/// GELU: `Mul(Affine(h, ½, 0), 1 + erf(h/√2))` or `Affine(Mul(h, 1 + erf(h/√2)), ½, 0)`.
fn gelu(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    let node = |h: String| NodeProto {
        op_type: "Gelu".into(),
        name: n.name.clone(),
        input: vec![h],
        output: n.output.clone(),
        ..Default::default()
    };
    if n.op_type == "Mul" && n.input.len() == 2 {
        for (side, other) in [(0, 1), (1, 0)] {
            let Some((h, mut removed)) = one_plus_erf(g, constants, slots, &n.input[side]) else {
                continue;
            };
            // The other factor is ½·h (an affine node) or h itself, halved afterwards.
            let half = g.sole_producer(&n.input[other]);
            if let Some(k) =
                half.filter(|&k| scalar_affine(constants, slots, k, 0.5, 0.0).as_ref() == Some(&h))
            {
                removed.push(k);
                return Some((node(h), removed));
            }
        }
        return None;
    }
    // Affine(Mul(h, 1 + erf(h/√2)), ½, 0)
    let m = g.sole_producer(&affine_input(constants, n, 0.5, 0.0)?)?;
    let mul = slots[m]
        .as_ref()
        .filter(|x| x.op_type == "Mul" && x.input.len() == 2)?;
    for (side, other) in [(0, 1), (1, 0)] {
        if let Some((h, mut removed)) = one_plus_erf(g, constants, slots, &mul.input[side]) {
            if mul.input[other] == h {
                removed.push(m);
                return Some((node(h), removed));
            }
        }
    }
    None
}

/// `Gelu(MatMul(x, W[, b]))` (the exact GELU) with a constant 2-D `W` → that MatMul with
/// [`GELU`] (a transformer's feed-forward up-projection).
fn gelu_into_matmul(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    if n.op_type != "Gelu"
        || n.input.len() != 1
        || crate::attrs::string(n, "approximate", "none") != "none"
    {
        return None;
    }
    let m = g.sole_producer(&n.input[0])?;
    let mm = slots[m].as_ref().filter(|x| {
        x.op_type == "MatMul"
            && (2..=3).contains(&x.input.len())
            && x.output.len() == 1
            && x.attribute.is_empty()
    })?;
    if constants.get(&mm.input[1])?.rank() != 2 {
        return None;
    }
    let mut node = mm.clone();
    node.attribute.push(crate::attrs::new_int(GELU, 1));
    node.output = n.output.clone();
    Some((node, vec![m]))
}

/// For an affine node with nothing fused into it yet: the node producing its input, when
/// the affine node is that value's only reader.
fn affine_source(g: &Graph, n: &NodeProto) -> Option<usize> {
    if n.op_type != AFFINE || !n.attribute.is_empty() {
        return None;
    }
    g.sole_producer(&n.input[0])
}

/// `Affine(ChannelAffine(x, s, t), S, T)` (a BatchNormalization followed by a per-channel
/// `Mul`/`Add`, as DenseNet exports have) → one `ChannelAffine(x, s·S, t·S + T)` when S and
/// T are per channel of a 4-D tensor. The merged node keeps `s, t, S, T` as inputs 3–6:
/// on an input that is not 4-D (where S and T would not be per channel) it computes the
/// two steps as written.
fn affine_into_batch_norm(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &mut HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    let p = affine_source(g, n)?;
    let bn = slots[p]
        .as_ref()
        // (It keeps the BatchNormalization's own attributes, such as epsilon.)
        .filter(|b| {
            b.op_type == CHANNEL_AFFINE
                && b.input.len() == 3
                && !b.attribute.iter().any(|a| a.name == RELU)
        })?;
    let (s, t) = (constants.get(&bn.input[1])?, constants.get(&bn.input[2])?);
    let c = s.elem_count();
    if s.dtype() != candle_core::DType::F32 || s.dims() != [c] || t.dims() != [c] {
        return None;
    }
    let big_s = per_channel(constants.get(&n.input[1])?, c)?;
    let big_t = per_channel(constants.get(&n.input[2])?, c)?;
    let scale = s.mul(&big_s).ok()?;
    let shift = t.mul(&big_s).ok()?.add(&big_t).ok()?;
    let (sn, tn) = (
        format!("{}::merged_scale", n.output[0]),
        format!("{}::merged_shift", n.output[0]),
    );
    constants.insert(sn.clone(), scale);
    constants.insert(tn.clone(), shift);
    let mut merged = bn.clone();
    merged.input = vec![
        bn.input[0].clone(),
        sn,
        tn,
        bn.input[1].clone(),
        bn.input[2].clone(),
        n.input[1].clone(),
        n.input[2].clone(),
    ];
    merged.output = n.output.clone();
    Some((merged, vec![p]))
}

/// `Affine(Conv(x, W, b), S, T)` → `Conv(x, W·S, b·S + T)` when S and T are per channel.
fn affine_into_conv(
    g: &Graph,
    slots: &[Option<NodeProto>],
    n: &NodeProto,
    constants: &mut HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    let c = affine_source(g, n)?;
    let conv = unfused_conv(slots, c).filter(|c| c.input.len() <= 3)?;
    let w = constants.get(conv.input.get(1)?)?;
    let oc = w.dim(0).ok()?;
    let s = per_channel(constants.get(&n.input[1])?, oc)?
        .to_dtype(w.dtype())
        .ok()?;
    let t = per_channel(constants.get(&n.input[2])?, oc)?
        .to_dtype(w.dtype())
        .ok()?;
    let mut wshape = vec![1usize; w.rank()];
    wshape[0] = oc;
    let w2 = w.broadcast_mul(&s.reshape(wshape).ok()?).ok()?;
    let b2 = match conv.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => constants.get(b)?.mul(&s).ok()?.add(&t).ok()?,
        None => t,
    };
    let (wn, bn) = (
        format!("{}::affine_w", n.output[0]),
        format!("{}::affine_b", n.output[0]),
    );
    constants.insert(wn.clone(), w2);
    constants.insert(bn.clone(), b2);
    let mut merged = conv.clone();
    merged.input = vec![merged.input[0].clone(), wn, bn];
    merged.output = n.output.clone();
    Some((merged, vec![c]))
}

/// An integer attribute (the planner's flags).
fn with_relu(mut conv: NodeProto) -> NodeProto {
    conv.attribute.push(crate::attrs::new_int(RELU, 1));
    conv
}

/// A node of type `op` that has no ReLU fused yet.
fn without_relu<'s>(slots: &'s [Option<NodeProto>], k: usize, op: &str) -> Option<&'s NodeProto> {
    slots[k].as_ref().filter(|c| {
        c.op_type == op && c.output.len() == 1 && !c.attribute.iter().any(|a| a.name == RELU)
    })
}

fn unfused_conv(slots: &[Option<NodeProto>], k: usize) -> Option<&NodeProto> {
    without_relu(slots, k, "Conv")
}

/// `Relu(Conv)` or `Relu(Affine)`; the Conv may already hold a residual (the Add came
/// first).
fn relu_chain(
    g: &Graph,
    slots: &[Option<NodeProto>],
    relu: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    let p = g.sole_producer(&relu.input[0])?;
    let prev = unfused_conv(slots, p)
        .or_else(|| without_relu(slots, p, AFFINE))
        .or_else(|| without_relu(slots, p, CHANNEL_AFFINE))?;
    let mut node = with_relu(prev.clone());
    node.output = relu.output.clone();
    Some((node, vec![p]))
}

/// `Add(Conv, r)` → `Conv` with residual `r`, producing the Add's output.
fn add_into_conv(
    g: &Graph,
    slots: &[Option<NodeProto>],
    add: &NodeProto,
) -> Option<(NodeProto, Vec<usize>)> {
    for (side, other) in [(0, 1), (1, 0)] {
        let Some(c) = g.sole_producer(&add.input[side]) else {
            continue;
        };
        let Some(conv) = unfused_conv(slots, c).filter(|c| c.input.len() <= 3) else {
            continue;
        };
        if add.input[other] == add.input[side] {
            continue;
        }
        let mut node = conv.clone();
        node.input.resize(3, String::new());
        node.input.push(add.input[other].clone());
        node.output = add.output.clone();
        return Some((node, vec![c]));
    }
    None
}

/// `Gemm(x, W, c)` as `MatMul(x, W')` with bias `c` (see the module docs): `W'` is the
/// constant f32 `W`, transposed when `transB` is set; `c`, when there is one, a constant
/// of `n` values (`[n]` or `[1, n]`, taken as `[n]`).
fn gemm_as_matmul(gemm: &NodeProto, constants: &mut HashMap<String, Tensor>) -> Option<NodeProto> {
    use crate::attrs::{float, int};
    if gemm.op_type != "Gemm"
        || int(gemm, "transA", 0) != 0
        || float(gemm, "alpha", 1.0) != 1.0
        || float(gemm, "beta", 1.0) != 1.0
        || gemm.output.len() != 1
    {
        return None;
    }
    let w = constants.get(gemm.input.get(1)?)?.clone();
    if w.rank() != 2 || w.dtype() != candle_core::DType::F32 {
        return None;
    }
    let trans_b = int(gemm, "transB", 0) != 0;
    let n = w.dims()[usize::from(!trans_b)];
    let bias = match gemm.input.get(2).filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let t = constants.get(c)?;
            if t.dtype() != candle_core::DType::F32 {
                return None;
            }
            if t.dims() == [n] {
                Some(c.clone())
            } else if t.dims() == [1, n] {
                let (name, t) = (format!("{c}::row"), t.reshape(n).ok()?);
                constants.insert(name.clone(), t);
                Some(name)
            } else {
                return None;
            }
        }
    };
    let weight = if trans_b {
        let name = format!("{}::t", gemm.input[1]);
        if !constants.contains_key(&name) {
            let t = w.t().and_then(|t| t.contiguous()).ok()?;
            constants.insert(name.clone(), t);
        }
        name
    } else {
        gemm.input[1].clone()
    };
    let mut mm = gemm.clone();
    mm.op_type = "MatMul".into();
    mm.attribute.clear();
    mm.input = [gemm.input[0].clone(), weight]
        .into_iter()
        .chain(bias)
        .collect();
    Some(mm)
}

/// `Add(MatMul(x, W), b)` with constant 2-D `W` and constant `b` of `W`'s column count.
fn bias_into_matmul(
    g: &Graph,
    slots: &[Option<NodeProto>],
    add: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Option<(NodeProto, Vec<usize>)> {
    for (side, other) in [(0, 1), (1, 0)] {
        let Some(m) = g.sole_producer(&add.input[side]) else {
            continue;
        };
        let Some(mm) = slots[m]
            .as_ref()
            .filter(|n| n.op_type == "MatMul" && n.input.len() == 2)
        else {
            continue;
        };
        let (Some(w), Some(b)) = (
            constants.get(&mm.input[1]),
            constants.get(&add.input[other]),
        ) else {
            continue;
        };
        if w.rank() != 2 || b.rank() != 1 || b.dims()[0] != w.dims()[1] || b.dtype() != w.dtype() {
            continue;
        }
        let mut node = mm.clone();
        node.input.push(add.input[other].clone());
        node.output = add.output.clone();
        return Some((node, vec![m]));
    }
    None
}
