//! Writes the models `cargo xtask bench` compares against onnxruntime (and `cargo xtask test`
//! checks against it) into `<dir>`:
//!
//! * `bert_minilm.onnx` — a BERT encoder of all-MiniLM-L6-v2's shape (6 layers, hidden 384,
//!   12 heads, FFN 1536, vocabulary 30522) with seeded random weights, written the way
//!   PyTorch exports BERT: `input_ids` and `attention_mask` INT64 `[batch, sequence]`, word /
//!   position / token-type embeddings through `Gather`, reshape targets computed at run time
//!   (`Shape`/`Slice`/`Concat`), the mask through `Equal`/`Where`, GELU through `Erf`,
//!   `LayerNormalization`, `Softmax`. Output `last_hidden_state` `[batch, sequence, 384]`.
//! * `<light model>_dynbatch.onnx` for each ONNX light model given — the same graph with a
//!   symbolic batch dimension (a leading 1 in a constant `Reshape` target becomes 0, "copy
//!   the input's"), so the comparison can run at batch 8.
//!
//! * `<light model>_random_dynbatch.onnx` — the same, with seeded random weights in place
//!   of the light model's constant ones (every weight there is a `ConstantOfShape`, so its
//!   outputs are uniform and cannot show a wrong result) and without its final `Softmax`:
//!   the logits, for the test suite to compare with onnxruntime.
//!
//! `make_bench_models <dir> [light_model.onnx ...]`
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension::Value,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;

const HIDDEN: usize = 384;
const HEADS: usize = 12;
const LAYERS: usize = 6;
const FFN: usize = 1536;
const VOCAB: usize = 30522;
const MAX_POS: usize = 512;

/// A graph under construction: nodes, initializers and unique names.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    seed: u64,
    next: usize,
}

fn dim(v: Value) -> Dimension {
    Dimension {
        value: Some(v),
        ..Default::default()
    }
}

fn tensor_info(name: &str, ty: DataType, dims: Vec<Value>) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: ty as i32,
                shape: Some(TensorShapeProto {
                    dim: dims.into_iter().map(dim).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

impl Builder {
    /// Adds a node with one output and returns the output's name.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.next += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.next);
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{op}_{}", self.next),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn init(&mut self, name: &str, dims: &[usize], ty: DataType, raw: Vec<u8>) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: ty as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.into()
    }

    /// Seeded uniform weights in [-scale, scale).
    fn random(&mut self, name: &str, dims: &[usize], scale: f32) -> String {
        let n: usize = dims.iter().product();
        let mut raw = Vec::with_capacity(n * 4);
        for _ in 0..n {
            // 64-bit LCG (Knuth's MMIX constants); the top 24 bits as a fraction.
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (self.seed >> 40) as f32 / (1u64 << 24) as f32;
            raw.extend_from_slice(&((u * 2.0 - 1.0) * scale).to_le_bytes());
        }
        self.init(name, dims, DataType::Float, raw)
    }

    fn floats(&mut self, name: &str, dims: &[usize], v: f32) -> String {
        let n: usize = dims.iter().product();
        let raw = std::iter::repeat_n(v.to_le_bytes(), n).flatten().collect();
        self.init(name, dims, DataType::Float, raw)
    }

    fn int64s(&mut self, name: &str, v: &[i64]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.init(name, &[v.len()], DataType::Int64, raw)
    }

    fn scalar_i64(&mut self, name: &str, v: i64) -> String {
        self.init(name, &[], DataType::Int64, v.to_le_bytes().to_vec())
    }

    fn linear(&mut self, x: &str, name: &str, fan_in: usize, fan_out: usize) -> String {
        let w = self.random(&format!("{name}.weight"), &[fan_in, fan_out], 0.05);
        let b = self.random(&format!("{name}.bias"), &[fan_out], 0.02);
        let m = self.op("MatMul", &[x, &w], vec![]);
        self.op("Add", &[&m, &b], vec![])
    }

    fn layer_norm(&mut self, x: &str, name: &str) -> String {
        let g = self.floats(&format!("{name}.gamma"), &[HIDDEN], 1.0);
        let b = self.floats(&format!("{name}.beta"), &[HIDDEN], 0.0);
        self.op(
            "LayerNormalization",
            &[x, &g, &b],
            vec![int_attr("axis", -1), float_attr("epsilon", 1e-12)],
        )
    }

    /// `[b, s, HIDDEN]` → `[b, HEADS, s, d]` (or `[b, HEADS, d, s]` for keys).
    fn split_heads(&mut self, x: &str, batch_seq: &str, keys: bool) -> String {
        let heads = format!("heads_shape_{}", self.next);
        self.int64s(&heads, &[HEADS as i64, (HIDDEN / HEADS) as i64]);
        let target = self.op("Concat", &[batch_seq, &heads], vec![int_attr("axis", 0)]);
        let r = self.op("Reshape", &[x, &target], vec![]);
        let perm: &[i64] = if keys { &[0, 2, 3, 1] } else { &[0, 2, 1, 3] };
        self.op("Transpose", &[&r], vec![ints_attr("perm", perm)])
    }

    fn encoder_layer(&mut self, x: &str, mask_bias: &str, batch_seq: &str, l: usize) -> String {
        let p = format!("encoder.layer.{l}");
        let q = self.linear(x, &format!("{p}.attention.query"), HIDDEN, HIDDEN);
        let k = self.linear(x, &format!("{p}.attention.key"), HIDDEN, HIDDEN);
        let v = self.linear(x, &format!("{p}.attention.value"), HIDDEN, HIDDEN);
        let (q, k, v) = (
            self.split_heads(&q, batch_seq, false),
            self.split_heads(&k, batch_seq, true),
            self.split_heads(&v, batch_seq, false),
        );
        let scores = self.op("MatMul", &[&q, &k], vec![]);
        let scale = self.floats(&format!("{p}.scale"), &[], ((HIDDEN / HEADS) as f32).sqrt());
        let scores = self.op("Div", &[&scores, &scale], vec![]);
        let scores = self.op("Add", &[&scores, mask_bias], vec![]);
        let probs = self.op("Softmax", &[&scores], vec![int_attr("axis", -1)]);
        let ctx = self.op("MatMul", &[&probs, &v], vec![]);
        let ctx = self.op("Transpose", &[&ctx], vec![ints_attr("perm", &[0, 2, 1, 3])]);
        let hidden = format!("hidden_{}", self.next);
        self.int64s(&hidden, &[HIDDEN as i64]);
        let target = self.op("Concat", &[batch_seq, &hidden], vec![int_attr("axis", 0)]);
        let ctx = self.op("Reshape", &[&ctx, &target], vec![]);
        let attn = self.linear(&ctx, &format!("{p}.attention.output"), HIDDEN, HIDDEN);
        let res = self.op("Add", &[&attn, x], vec![]);
        let x1 = self.layer_norm(&res, &format!("{p}.attention.norm"));
        // GELU: x · ½ · (1 + erf(x / √2)).
        let h = self.linear(&x1, &format!("{p}.intermediate"), HIDDEN, FFN);
        let sqrt2 = self.floats(&format!("{p}.sqrt2"), &[], std::f32::consts::SQRT_2);
        let half = self.floats(&format!("{p}.half"), &[], 0.5);
        let one = self.floats(&format!("{p}.one"), &[], 1.0);
        let e = self.op("Div", &[&h, &sqrt2], vec![]);
        let e = self.op("Erf", &[&e], vec![]);
        let e = self.op("Add", &[&e, &one], vec![]);
        let hh = self.op("Mul", &[&h, &half], vec![]);
        let g = self.op("Mul", &[&hh, &e], vec![]);
        let o = self.linear(&g, &format!("{p}.output"), FFN, HIDDEN);
        let res = self.op("Add", &[&o, &x1], vec![]);
        self.layer_norm(&res, &format!("{p}.output.norm"))
    }
}

fn bert() -> ModelProto {
    let mut b = Builder {
        seed: 20261126,
        ..Default::default()
    };
    let word = b.random("embeddings.word", &[VOCAB, HIDDEN], 0.05);
    let pos = b.random("embeddings.position", &[MAX_POS, HIDDEN], 0.05);
    let types = b.random("embeddings.token_type", &[2, HIDDEN], 0.05);
    // Sequence length and [batch, sequence] from the input's shape, at run time.
    let shape = b.op("Shape", &["input_ids"], vec![]);
    let starts = b.int64s("slice_start", &[0]);
    let ends = b.int64s("slice_end", &[2]);
    let batch_seq = b.op("Slice", &[&shape, &starts, &ends], vec![]);
    let one_idx = b.scalar_i64("one_index", 1);
    let seq = b.op("Gather", &[&shape, &one_idx], vec![int_attr("axis", 0)]);
    let zero = b.scalar_i64("zero", 0);
    let step = b.scalar_i64("step", 1);
    let positions = b.op("Range", &[&zero, &seq, &step], vec![]);
    let positions = b.op("Unsqueeze", &[&positions, &starts], vec![]);
    let type_ids = b.op("ConstantOfShape", &[&shape], vec![]);
    let type_ids = b.op(
        "Cast",
        &[&type_ids],
        vec![int_attr("to", DataType::Int64 as i64)],
    );
    let we = b.op("Gather", &[&word, "input_ids"], vec![]);
    let pe = b.op("Gather", &[&pos, &positions], vec![]);
    let te = b.op("Gather", &[&types, &type_ids], vec![]);
    let e = b.op("Add", &[&we, &pe], vec![]);
    let e = b.op("Add", &[&e, &te], vec![]);
    let mut x = b.layer_norm(&e, "embeddings.norm");
    // Padding positions get -10000 before the softmax: Where(mask == 0, -1e4, 0).
    let axes = b.int64s("mask_axes", &[1, 2]);
    let m = b.op("Unsqueeze", &["attention_mask", &axes], vec![]);
    let z = b.scalar_i64("mask_zero", 0);
    let pad = b.op("Equal", &[&m, &z], vec![]);
    let neg = b.floats("mask_negative", &[], -10000.0);
    let nil = b.floats("mask_nil", &[], 0.0);
    let mask_bias = b.op("Where", &[&pad, &neg, &nil], vec![]);
    for l in 0..LAYERS {
        x = b.encoder_layer(&x, &mask_bias, &batch_seq, l);
    }
    b.nodes.push(NodeProto {
        op_type: "Identity".into(),
        name: "output".into(),
        input: vec![x],
        output: vec!["last_hidden_state".into()],
        ..Default::default()
    });
    let sym = |s: &str| Value::DimParam(s.into());
    ModelProto {
        ir_version: 8,
        producer_name: "kiln make_bench_models".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "bert_minilm".into(),
            node: b.nodes,
            initializer: b.inits,
            input: vec![
                tensor_info("input_ids", DataType::Int64, vec![sym("batch"), sym("seq")]),
                tensor_info(
                    "attention_mask",
                    DataType::Int64,
                    vec![sym("batch"), sym("seq")],
                ),
            ],
            output: vec![tensor_info(
                "last_hidden_state",
                DataType::Float,
                vec![sym("batch"), sym("seq"), Value::DimValue(HIDDEN as i64)],
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The model with a symbolic batch dimension (see the module docs).
fn dynamic_batch(mut model: ModelProto) -> ModelProto {
    let Some(graph) = model.graph.as_mut() else {
        return model;
    };
    let inits: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    for v in graph
        .input
        .iter_mut()
        .filter(|v| !inits.contains(&v.name))
        .chain(graph.output.iter_mut())
    {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(d) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
                d.value = Some(Value::DimParam("N".into()));
            }
        }
    }
    let targets: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Reshape")
        .filter_map(|n| n.input.get(1).cloned())
        .collect();
    for t in graph
        .initializer
        .iter_mut()
        .filter(|t| targets.contains(&t.name))
    {
        if t.int64_data.first() == Some(&1) {
            t.int64_data[0] = 0;
        } else if t.raw_data.len() >= 8 && t.raw_data[..8] == 1i64.to_le_bytes() {
            t.raw_data[..8].copy_from_slice(&0i64.to_le_bytes());
        }
    }
    model
}

/// Seeded random weights for every `ConstantOfShape` fed by a constant shape, scaled by what
/// reads them (He-uniform convolution and Gemm weights, BatchNormalization statistics near
/// the identity, small biases); the final `Softmax` is dropped so the logits are the output.
fn random_weights(mut model: ModelProto) -> ModelProto {
    let Some(graph) = model.graph.as_mut() else {
        return model;
    };
    let shape_of = |t: &TensorProto| -> Vec<i64> {
        if !t.int64_data.is_empty() {
            return t.int64_data.clone();
        }
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    };
    let shapes: std::collections::HashMap<String, Vec<i64>> = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Int64 as i32)
        .map(|t| (t.name.clone(), shape_of(t)))
        .collect();
    let mut seed = 20261126u64;
    let mut uniform = |lo: f32, hi: f32| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((seed >> 40) as f32 / (1u64 << 24) as f32)
    };
    let mut made = Vec::new();
    for node in graph.node.iter().filter(|n| n.op_type == "ConstantOfShape") {
        let (Some(dims), Some(out)) = (
            node.input.first().and_then(|i| shapes.get(i)),
            node.output.first(),
        ) else {
            continue;
        };
        let reader = graph
            .node
            .iter()
            .find_map(|n| n.input.iter().position(|i| i == out).map(|p| (n, p)));
        let fan_in = dims.iter().skip(1).product::<i64>().max(1) as f32;
        let (lo, hi) = match reader.map(|(n, p)| (n.op_type.as_str(), p)) {
            Some(("Conv", 1)) => (-(6.0 / fan_in).sqrt(), (6.0 / fan_in).sqrt()),
            Some(("Gemm", 1)) => (-(3.0 / fan_in).sqrt(), (3.0 / fan_in).sqrt()),
            Some(("BatchNormalization", 1)) => (0.8, 1.2),
            Some(("BatchNormalization", 4)) => (0.5, 1.5),
            _ => (-0.1, 0.1),
        };
        let n: i64 = dims.iter().product();
        let raw = (0..n).flat_map(|_| uniform(lo, hi).to_le_bytes()).collect();
        made.push(TensorProto {
            name: out.clone(),
            dims: dims.clone(),
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        });
    }
    let replaced: std::collections::HashSet<String> = made.iter().map(|t| t.name.clone()).collect();
    graph
        .node
        .retain(|n| !n.output.iter().any(|o| replaced.contains(o)));
    graph.initializer.extend(made);
    // The shapes the constants were made from are read by nothing now.
    let read: std::collections::HashSet<String> =
        graph.node.iter().flat_map(|n| n.input.clone()).collect();
    graph.initializer.retain(|t| read.contains(&t.name));
    graph.input.retain(|i| read.contains(&i.name));
    if let Some(at) = graph.node.iter().rposition(|n| n.op_type == "Softmax") {
        let softmax = graph.node.remove(at);
        if let (Some(out), Some(logits)) = (graph.output.first_mut(), softmax.input.first()) {
            out.name = logits.clone();
        }
    }
    model
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .ok_or("usage: make_bench_models <dir> [light.onnx ...]")?,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bert_minilm.onnx");
    std::fs::write(&path, bert().encode_to_vec())?;
    println!("wrote {}", path.display());
    for light in args {
        let light = std::path::PathBuf::from(light);
        let model = candle_onnx::read_file(&light)?;
        let stem = light
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model");
        let path = dir.join(format!("{stem}_random_dynbatch.onnx"));
        std::fs::write(
            &path,
            dynamic_batch(random_weights(model.clone())).encode_to_vec(),
        )?;
        println!("wrote {}", path.display());
        let path = dir.join(format!("{stem}_dynbatch.onnx"));
        std::fs::write(&path, dynamic_batch(model).encode_to_vec())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
