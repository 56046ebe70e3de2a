//! onnxruntime's `com.microsoft` operators that its transformer optimizer writes into
//! exported models. The planner rewrites `SkipLayerNormalization`, `BiasGelu`, `FastGelu`,
//! `Gelu`, `QuickGelu` and `FusedMatMul` into the standard operators they stand for, so
//! they run (and fuse) as those do; `Attention`, `EmbedLayerNormalization`,
//! `SkipSimplifiedLayerNormalization` and the default domain's `SimplifiedLayerNormalization`
//! (RMSNorm) run as themselves (`attention.rs`).
use candle_onnx::onnx::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};

use crate::attrs;

/// The domain of onnxruntime's contrib operators.
pub const DOMAIN: &str = "com.microsoft";

const SUPPORTED: &[&str] = &[
    "Attention",
    "BiasGelu",
    "EmbedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "FastGelu",
    "FusedMatMul",
    "Gelu",
    "QuickGelu",
    "SkipLayerNormalization",
    crate::text::TOKENIZER,
];

/// Whether `op` of the `com.microsoft` domain is implemented.
pub fn is_supported(op: &str) -> bool {
    SUPPORTED.contains(&op)
}

/// A standard node named after `base` with `suffix`.
fn node(base: &NodeProto, suffix: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{}::{suffix}", base.name),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A `Constant` scalar FLOAT named `output`.
fn scalar(base: &NodeProto, output: &str, v: f32) -> NodeProto {
    let mut c = node(base, output, "Constant", &[], &[output]);
    c.attribute.push(AttributeProto {
        name: "value".into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(TensorProto {
            data_type: 1,
            float_data: vec![v],
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// Input `i` of `n`, if given.
fn input(n: &NodeProto, i: usize) -> Option<&str> {
    n.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
}

/// Adds the optional `bias` to `x`: the name of the sum (or `x`) and its node.
fn with_bias(n: &NodeProto, x: &str, bias: Option<&str>, out: &mut Vec<NodeProto>) -> String {
    match bias {
        Some(b) => {
            let sum = format!("{}::biased", n.name);
            out.push(node(n, "bias", "Add", &[x, b], &[&sum]));
            sum
        }
        None => x.to_string(),
    }
}

/// `n` as standard operators.
fn expand_one(n: &NodeProto) -> Result<Vec<NodeProto>, String> {
    let mut out = Vec::new();
    let need = |i: usize| {
        input(n, i).ok_or_else(|| format!("{} node '{}' is missing input {i}", n.op_type, n.name))
    };
    let y = n.output.first().map(String::as_str).unwrap_or("");
    match n.op_type.as_str() {
        "Gelu" | "BiasGelu" | "FastGelu" => {
            let bias = if n.op_type == "Gelu" {
                None
            } else {
                input(n, 1)
            };
            let x = with_bias(n, need(0)?, bias, &mut out);
            let mut g = node(n, "gelu", "Gelu", &[&x], &[y]);
            if n.op_type == "FastGelu" {
                g.attribute.push(attrs::new_string("approximate", "tanh"));
            }
            out.push(g);
        }
        "QuickGelu" => {
            // x · sigmoid(alpha · x)
            let alpha = attrs::float(n, "alpha", 1.702);
            let (a, ax, s) = (
                format!("{}::alpha", n.name),
                format!("{}::ax", n.name),
                format!("{}::sig", n.name),
            );
            out.push(scalar(n, &a, alpha));
            out.push(node(n, "scale", "Mul", &[need(0)?, &a], &[&ax]));
            out.push(node(n, "sigmoid", "Sigmoid", &[&ax], &[&s]));
            out.push(node(n, "gate", "Mul", &[need(0)?, &s], &[y]));
        }
        "SkipLayerNormalization" => {
            // LayerNorm(input + skip + bias) · gamma + beta; output 3 is the sum.
            let summed = format!("{}::sum", n.name);
            let sum = match n.output.get(3).filter(|s| !s.is_empty()) {
                Some(s) => s.clone(),
                None => summed,
            };
            match input(n, 4) {
                Some(bias) => {
                    let t = format!("{}::skip_bias", n.name);
                    out.push(node(n, "skip_bias", "Add", &[need(1)?, bias], &[&t]));
                    out.push(node(n, "add", "Add", &[need(0)?, &t], &[&sum]));
                }
                None => out.push(node(n, "add", "Add", &[need(0)?, need(1)?], &[&sum])),
            }
            let beta = input(n, 3).unwrap_or("");
            let outs: Vec<&str> = n.output.iter().take(3).map(String::as_str).collect();
            let mut ln = node(
                n,
                "ln",
                "LayerNormalization",
                &[&sum, need(2)?, beta],
                &outs,
            );
            ln.attribute.push(attrs::new_float(
                "epsilon",
                attrs::float(n, "epsilon", 1e-12),
            ));
            out.push(ln);
        }
        "FusedMatMul" => {
            // alpha · op(A) · op(B), op transposing the last two dimensions.
            if attrs::int(n, "transBatchA", 0) != 0 || attrs::int(n, "transBatchB", 0) != 0 {
                return Err(format!(
                    "FusedMatMul node '{}': transBatchA/transBatchB are not supported",
                    n.name
                ));
            }
            let mut operands = Vec::new();
            for (i, flag) in [(0, "transA"), (1, "transB")] {
                let x = need(i)?;
                if attrs::int(n, flag, 0) == 0 {
                    operands.push(x.to_string());
                    continue;
                }
                let t = format!("{}::t{i}", n.name);
                out.push(node(n, flag, crate::ops::TRANSPOSE_LAST_TWO, &[x], &[&t]));
                operands.push(t);
            }
            let alpha = attrs::float(n, "alpha", 1.0);
            if alpha == 1.0 {
                out.push(node(n, "mm", "MatMul", &[&operands[0], &operands[1]], &[y]));
            } else {
                let (a, p) = (format!("{}::alpha", n.name), format!("{}::prod", n.name));
                out.push(node(
                    n,
                    "mm",
                    "MatMul",
                    &[&operands[0], &operands[1]],
                    &[&p],
                ));
                out.push(scalar(n, &a, alpha));
                out.push(node(n, "scale", "Mul", &[&p, &a], &[y]));
            }
        }
        other => return Err(format!("com.microsoft operator {other} is not supported")),
    }
    Ok(out)
}

/// The operators that run as themselves rather than being rewritten.
const KEPT: &[&str] = &[
    "Attention",
    "EmbedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    crate::text::TOKENIZER,
];

/// onnxruntime's contrib operator registered in the default ONNX domain (no standard
/// operator of that name exists); it runs through [`run`].
pub const SIMPLIFIED_LAYER_NORM: &str = "SimplifiedLayerNormalization";

/// Runs a kept `com.microsoft` node.
pub fn run(
    node: &NodeProto,
    ins: &[Option<candle_core::Tensor>],
) -> candle_core::Result<Vec<candle_core::Tensor>> {
    match node.op_type.as_str() {
        "Attention" => Ok(vec![crate::attention::attention(node, ins)?]),
        "EmbedLayerNormalization" => crate::attention::embed_layer_norm(node, ins),
        "SkipSimplifiedLayerNormalization" => {
            crate::attention::skip_simplified_layer_norm(node, ins)
        }
        SIMPLIFIED_LAYER_NORM => crate::attention::simplified_layer_norm(node, ins),
        other => candle_core::bail!("com.microsoft operator {other} is not supported"),
    }
}

/// Rewrites every `com.microsoft` node of `nodes` (but those in [`KEPT`]) into standard
/// operators, in place.
pub fn expand(nodes: Vec<NodeProto>) -> Result<Vec<NodeProto>, String> {
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        if n.domain == DOMAIN && !KEPT.contains(&n.op_type.as_str()) {
            out.extend(expand_one(&n)?);
        } else {
            out.push(n);
        }
    }
    Ok(out)
}
