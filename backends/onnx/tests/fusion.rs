//! The planner: its fusions (`fuse.rs`) change how many steps run, never the result (graphs
//! with the fused patterns are checked against candle-onnx's `simple_eval`), and `If` runs
//! the branch its condition picks.
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto, ValueInfoProto,
};
use kiln_onnx::plan::Plan;

fn info(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn init(name: &str, dims: &[i64], seed: usize) -> TensorProto {
    let n: i64 = dims.iter().product();
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: (0..n as usize)
            .map(|i| (((i + seed) * 37 % 23) as f32 - 11.0) / 10.0)
            .collect(),
        ..Default::default()
    }
}

fn pads(v: i64) -> AttributeProto {
    AttributeProto {
        name: "pads".into(),
        r#type: AttributeType::Ints as i32,
        ints: vec![v; 4],
        ..Default::default()
    }
}

fn model(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: &[&str],
    outputs: &[&str],
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            node: nodes,
            initializer: inits,
            input: inputs.iter().map(|n| info(n)).collect(),
            output: outputs.iter().map(|n| info(n)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn check(model: &ModelProto, inputs: HashMap<String, Tensor>, expect_ops: &[&str]) {
    let plan = Plan::new(model, &Device::Cpu).expect("plan");
    assert_eq!(plan.step_ops(), expect_ops, "planned steps");
    let got = plan.run(inputs.clone()).expect("run");
    let want = candle_onnx::simple_eval(model, inputs).expect("oracle");
    for (name, w) in want {
        let g = &got[&name];
        assert_eq!(g.dims(), w.dims(), "{name}");
        let diff = (g - &w)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        let scale = w
            .abs()
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("max");
        assert!(
            diff <= 1e-4 * (1.0 + scale),
            "{name}: max difference {diff}"
        );
    }
}

fn input(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("input")
}

#[test]
fn conv_with_affine_chain_residual_and_relu_runs_as_fused_convs() {
    // a = Relu(Conv(x) · s + t); y = Relu(Conv(a) + x); z = Relu(x · s2 + t2) (no conv).
    let nodes = vec![
        node("Conv", &["x", "w1", "b1"], "c1", vec![pads(1)]),
        node("Mul", &["c1", "s"], "m1", vec![]),
        node("Add", &["m1", "t"], "a1", vec![]),
        node("Relu", &["a1"], "r1", vec![]),
        node("Conv", &["r1", "w2"], "c2", vec![pads(1)]),
        node("Add", &["c2", "x"], "sum", vec![]),
        node("Relu", &["sum"], "y", vec![]),
        node("Mul", &["x", "s"], "m2", vec![]),
        node("Add", &["t", "m2"], "a2", vec![]),
        node("Relu", &["a2"], "z", vec![]),
    ];
    let inits = vec![
        init("w1", &[4, 4, 3, 3], 1),
        init("b1", &[4], 2),
        init("s", &[4, 1, 1], 3),
        init("t", &[1, 4, 1, 1], 4),
        init("w2", &[4, 4, 3, 3], 5),
    ];
    let m = model(nodes, inits, &["x"], &["y", "z"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 4, 6, 5]))]);
    check(&m, inputs, &["Conv", "Conv", "KilnAffine"]);
}

#[test]
fn linear_layer_bias_is_fused_into_the_matmul() {
    let nodes = vec![
        node("MatMul", &["x", "w"], "mm", vec![]),
        node("Add", &["b", "mm"], "y", vec![]),
        // The product is also a graph output here, so it must not be fused away.
        node("MatMul", &["x", "w"], "kept", vec![]),
        node("Add", &["kept", "b"], "y2", vec![]),
    ];
    let inits = vec![init("w", &[7, 19], 1), init("b", &[19], 2)];
    let m = model(nodes, inits, &["x"], &["y", "kept", "y2"]);
    let inputs = HashMap::from([("x".to_string(), input(&[3, 5, 7]))]);
    check(&m, inputs, &["MatMul", "MatMul", "KilnAffine"]);
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

#[test]
fn plain_gemm_with_a_constant_weight_runs_as_a_packed_matmul() {
    // transB with a [n] bias, [k, n] with a [1, n] bias: each a MatMul; alpha ≠ 1 or a
    // bias of another shape stays a Gemm. (simple_eval, the oracle, needs a bias.)
    let alpha = AttributeProto {
        name: "alpha".into(),
        r#type: AttributeType::Float as i32,
        f: 0.5,
        ..Default::default()
    };
    let nodes = vec![
        node("Gemm", &["x", "wt", "b"], "y1", vec![attr_int("transB", 1)]),
        node("Gemm", &["x", "w", "b_row"], "y2", vec![]),
        node(
            "Gemm",
            &["x", "w", "b_col"],
            "y3",
            vec![attr_int("transB", 0)],
        ),
        node("Gemm", &["x", "w", "b"], "y4", vec![alpha]),
    ];
    let inits = vec![
        init("wt", &[19, 7], 1),
        init("w", &[7, 19], 2),
        init("b", &[19], 3),
        init("b_row", &[1, 19], 4),
        init("b_col", &[5, 1], 5),
    ];
    let m = model(nodes, inits, &["x"], &["y1", "y2", "y3", "y4"]);
    let inputs = HashMap::from([("x".to_string(), input(&[5, 7]))]);
    check(&m, inputs, &["MatMul", "MatMul", "Gemm", "Gemm"]);
}

#[test]
fn division_by_a_constant_joins_the_affine_chain() {
    // y = Erf(x) / d + t, over a rank-3 tensor (one scale and shift for all elements).
    let nodes = vec![
        node("Erf", &["x"], "e", vec![]),
        node("Div", &["e", "d"], "q", vec![]),
        node("Add", &["q", "t"], "y", vec![]),
    ];
    let inits = vec![init("d", &[], 3), init("t", &[1], 4)];
    let m = model(nodes, inits, &["x"], &["y"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 3, 33]))]);
    check(&m, inputs, &["Erf", "KilnAffine"]);
}

/// `BatchNormalization(x) → "bn"` over 4 channels, with its four parameter initializers.
fn batch_norm_4() -> (NodeProto, Vec<TensorProto>) {
    let mut var = init("var", &[4], 9);
    var.float_data.iter_mut().for_each(|v| *v = v.abs() + 0.5);
    let bn = node(
        "BatchNormalization",
        &["x", "gamma", "beta", "mean", "var"],
        "bn",
        vec![],
    );
    let inits = vec![
        init("gamma", &[4], 1),
        init("beta", &[4], 2),
        init("mean", &[4], 3),
        var,
    ];
    (bn, inits)
}

#[test]
fn batch_norm_then_channel_affine_and_relu_joins_the_conv() {
    // DenseNet's pre-activation: Relu(BN(x) · s + t), then a Conv, which applies it while
    // it gathers its input.
    let (bn, mut inits) = batch_norm_4();
    let nodes = vec![
        bn,
        node("Mul", &["bn", "s"], "m", vec![]),
        node("Add", &["m", "t"], "a", vec![]),
        node("Relu", &["a"], "r", vec![]),
        node("Conv", &["r", "w"], "y", vec![pads(0)]),
    ];
    inits.extend([
        init("s", &[4, 1, 1], 4),
        init("t", &[1, 4, 1, 1], 5),
        init("w", &[3, 4, 1, 1], 6),
    ]);
    let m = model(nodes, inits, &["x"], &["y"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 4, 5, 3]))]);
    check(&m, inputs, &["Conv"]);
    // A 3-D input: s and t are then not per channel, and the merged node must compute the
    // steps as written (the result broadcasts to [1, 4, 4, 3]).
    let inputs = HashMap::from([("x".to_string(), input(&[4, 4, 3]))]);
    check(&m, inputs, &["Conv"]);
    // BN, ReLU, then a padded 3×3 Conv: the padding stays zero (the affine is not applied
    // to it), on a map large enough for the many-pixel path and on a small one.
    let (bn, mut inits) = batch_norm_4();
    let nodes = vec![
        bn,
        node("Relu", &["bn"], "r", vec![]),
        node("Conv", &["r", "w", "b"], "y", vec![pads(1)]),
    ];
    inits.extend([init("w", &[20, 4, 3, 3], 6), init("b", &[20], 7)]);
    let m = model(nodes, inits, &["x"], &["y"]);
    for dims in [[2, 4, 20, 19], [1, 4, 5, 3]] {
        let inputs = HashMap::from([("x".to_string(), input(&dims))]);
        check(&m, inputs, &["Conv"]);
    }
}

fn scalar_init(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![],
        data_type: DataType::Float as i32,
        float_data: vec![v],
        ..Default::default()
    }
}

#[test]
fn exact_gelu_written_out_becomes_one_gelu_node() {
    // y1 = (x · ½) · (1 + erf(x / √2)); y2 = (x · (erf(x · 1/√2) + 1)) · ½ — both GELU.
    let nodes = vec![
        node("Div", &["x", "sqrt2"], "d", vec![]),
        node("Erf", &["d"], "e", vec![]),
        node("Add", &["one", "e"], "a", vec![]),
        node("Mul", &["x", "half"], "h", vec![]),
        node("Mul", &["h", "a"], "y1", vec![]),
        node("Mul", &["x", "inv_sqrt2"], "d2", vec![]),
        node("Erf", &["d2"], "e2", vec![]),
        node("Add", &["e2", "one"], "a2", vec![]),
        node("Mul", &["x", "a2"], "m2", vec![]),
        node("Mul", &["m2", "half"], "y2", vec![]),
        // Not GELU (¼ instead of ½): left as it is.
        node("Div", &["x", "sqrt2"], "d3", vec![]),
        node("Erf", &["d3"], "e3", vec![]),
        node("Add", &["e3", "one"], "a3", vec![]),
        node("Mul", &["x", "quarter"], "h3", vec![]),
        node("Mul", &["h3", "a3"], "y3", vec![]),
    ];
    let inits = vec![
        scalar_init("sqrt2", std::f32::consts::SQRT_2),
        scalar_init("inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2),
        scalar_init("one", 1.0),
        scalar_init("half", 0.5),
        scalar_init("quarter", 0.25),
    ];
    let m = model(nodes, inits, &["x"], &["y1", "y2", "y3"]);
    let inputs = HashMap::from([("x".to_string(), input(&[3, 50]))]);
    check(
        &m,
        inputs,
        &[
            "Gelu",
            "Gelu",
            "KilnAffine",
            "Erf",
            "KilnAffine",
            "KilnAffine",
            "Mul",
        ],
    );
}

#[test]
fn gelu_of_a_linear_layer_runs_inside_the_matmul() {
    // y = GELU(x · W + b), written out; k = GELU(x · W) written out where x · W is also a
    // graph output, so that product stays and the GELU runs on its own.
    let gelu_of = |v: &str, tag: &str| {
        let n = |s: &str| format!("{s}_{tag}");
        vec![
            node("Div", &[v, "sqrt2"], &n("d"), vec![]),
            node("Erf", &[&n("d")], &n("e"), vec![]),
            node("Add", &[&n("e"), "one"], &n("a"), vec![]),
            node("Mul", &[v, "half"], &n("h"), vec![]),
            node("Mul", &[&n("h"), &n("a")], tag, vec![]),
        ]
    };
    let mut nodes = vec![
        node("MatMul", &["x", "w"], "mm", vec![]),
        node("Add", &["mm", "b"], "lin", vec![]),
        node("MatMul", &["x", "w"], "kept", vec![]),
    ];
    nodes.extend(gelu_of("lin", "y"));
    nodes.extend(gelu_of("kept", "k"));
    let inits = vec![
        init("w", &[24, 40], 1),
        init("b", &[40], 2),
        scalar_init("sqrt2", std::f32::consts::SQRT_2),
        scalar_init("one", 1.0),
        scalar_init("half", 0.5),
    ];
    let m = model(nodes, inits, &["x"], &["y", "kept", "k"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 37, 24]))]);
    check(&m, inputs, &["MatMul", "MatMul", "Gelu"]);

    // A rank-4 Transpose after the fused GELU folds into the same MatMul, whose output is
    // then written permuted.
    let mut nodes = vec![node("MatMul", &["x", "w"], "mm", vec![])];
    nodes.extend(gelu_of("mm", "g"));
    nodes.push(node("Transpose", &["g"], "t", vec![perm(&[0, 2, 1, 3])]));
    let inits = vec![
        init("w", &[24, 40], 1),
        scalar_init("sqrt2", std::f32::consts::SQRT_2),
        scalar_init("one", 1.0),
        scalar_init("half", 0.5),
    ];
    let m = model(nodes, inits, &["x"], &["t"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 3, 5, 24]))]);
    check(&m, inputs, &["MatMul"]);
}

fn perm(p: &[i64]) -> AttributeProto {
    AttributeProto {
        name: "perm".into(),
        r#type: AttributeType::Ints as i32,
        ints: p.to_vec(),
        ..Default::default()
    }
}

#[test]
fn attention_transposes_fold_into_the_matmuls() {
    // Heads as exports write them: q, k, v are [b, s, heads, d]; Qᵀ-style transposes in,
    // the context transposed back out. Batch 2, sequence 5, 3 heads of 4 (and a
    // transposed view of k read through packed panels); a Transpose with another reader
    // stays a node.
    let nodes = vec![
        node("Transpose", &["q"], "qh", vec![perm(&[0, 2, 1, 3])]),
        node("Transpose", &["k"], "kt", vec![perm(&[0, 2, 3, 1])]),
        node("MatMul", &["qh", "kt"], "scores", vec![]),
        node("Transpose", &["v"], "vh", vec![perm(&[0, 2, 1, 3])]),
        node("MatMul", &["scores", "vh"], "ctx", vec![]),
        node("Transpose", &["ctx"], "out", vec![perm(&[0, 2, 1, 3])]),
        node("Transpose", &["v"], "vt", vec![perm(&[0, 2, 3, 1])]),
        node("MatMul", &["vh", "vt"], "gram", vec![]),
        node("Identity", &["vh"], "vh_copy", vec![]),
    ];
    let m = model(
        nodes,
        vec![],
        &["q", "k", "v"],
        &["out", "scores", "gram", "vh_copy"],
    );
    let inputs = HashMap::from([
        ("q".to_string(), input(&[2, 5, 3, 4])),
        (
            "k".to_string(),
            input(&[2, 5, 3, 4]).affine(0.5, 0.25).expect("k"),
        ),
        (
            "v".to_string(),
            input(&[2, 5, 3, 4]).affine(-1.0, 0.5).expect("v"),
        ),
    ]);
    check(
        &m,
        inputs,
        &["MatMul", "Transpose", "MatMul", "MatMul", "Identity"],
    );
}

#[test]
fn scaled_masked_softmax_is_one_node() {
    // Attention: Softmax(scores / 4 + mask) with the mask broadcast over heads and queries,
    // and a softmax over the mask added first (other order), for a 3-D mask too.
    let axis = attr_int("axis", -1);
    let nodes = vec![
        node("Div", &["scores", "four"], "scaled", vec![]),
        node("Add", &["scaled", "mask"], "biased", vec![]),
        node("Softmax", &["biased"], "p", vec![axis.clone()]),
        node("Add", &["mask3", "scores"], "b2", vec![]),
        node("Softmax", &["b2"], "p2", vec![axis]),
    ];
    let inits = vec![scalar_init("four", 4.0)];
    let m = model(nodes, inits, &["scores", "mask", "mask3"], &["p", "p2"]);
    let inputs = HashMap::from([
        ("scores".to_string(), input(&[2, 3, 5, 7])),
        ("mask".to_string(), input(&[2, 1, 1, 7])),
        ("mask3".to_string(), input(&[3, 1, 7])),
    ]);
    check(&m, inputs, &["Softmax", "Softmax"]);
}

#[test]
fn if_runs_the_branch_the_condition_picks_reading_outer_values() {
    let branch = |op: &str, c: &str| GraphProto {
        node: vec![node(op, &["x", c], "out", vec![])],
        output: vec![info("out")],
        ..Default::default()
    };
    let g = |name: &str, graph: GraphProto| AttributeProto {
        name: name.into(),
        r#type: AttributeType::Graph as i32,
        g: Some(graph),
        ..Default::default()
    };
    let nodes = vec![
        node("Relu", &["x0"], "x", vec![]),
        node(
            "If",
            &["cond"],
            "y",
            vec![
                g("then_branch", branch("Add", "one")),
                g("else_branch", branch("Mul", "two")),
            ],
        ),
    ];
    let inits = vec![scalar_init("one", 1.0), scalar_init("two", 2.0)];
    let m = model(nodes, inits, &["cond", "x0"], &["y"]);
    let plan = Plan::new(&m, &Device::Cpu).expect("plan");
    let x = Tensor::new(&[-1f32, 2.0, 3.0], &Device::Cpu).expect("x");
    for (cond, want) in [(1u8, [1f32, 3.0, 4.0]), (0u8, [0f32, 4.0, 6.0])] {
        let inputs = HashMap::from([
            (
                "cond".to_string(),
                Tensor::new(&[cond], &Device::Cpu).expect("cond"),
            ),
            ("x0".to_string(), x.clone()),
        ]);
        let y = plan.run(inputs).expect("run")["y"]
            .to_vec1::<f32>()
            .expect("y");
        assert_eq!(y, want, "cond {cond}");
    }
}

#[test]
fn loop_carries_values_and_stacks_scan_outputs() {
    // acc_{i+1} = acc_i + step (an outer value), for M = 4 iterations; scan = acc each time.
    let body = GraphProto {
        node: vec![
            node("Identity", &["cond_in"], "cond_out", vec![]),
            node("Add", &["acc_in", "step"], "acc_out", vec![]),
            node("Identity", &["acc_out"], "scan", vec![]),
        ],
        input: vec![info("i"), info("cond_in"), info("acc_in")],
        output: vec![info("cond_out"), info("acc_out"), info("scan")],
        ..Default::default()
    };
    let mut lp = node(
        "Loop",
        &["m", "", "acc0"],
        "acc",
        vec![AttributeProto {
            name: "body".into(),
            r#type: AttributeType::Graph as i32,
            g: Some(body),
            ..Default::default()
        }],
    );
    lp.output = vec!["acc".into(), "scans".into()];
    let m = model(
        vec![lp],
        vec![scalar_init("step", 0.5)],
        &["m", "acc0"],
        &["acc", "scans"],
    );
    let plan = Plan::new(&m, &Device::Cpu).expect("plan");
    let inputs = HashMap::from([
        ("m".to_string(), Tensor::new(4i64, &Device::Cpu).expect("m")),
        (
            "acc0".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("acc0"),
        ),
    ]);
    let out = plan.run(inputs).expect("run");
    assert_eq!(out["acc"].to_vec1::<f32>().expect("acc"), [3.0, 4.0]);
    let scans = out["scans"].to_vec2::<f32>().expect("scans");
    assert_eq!(scans, [[1.5, 2.5], [2.0, 3.0], [2.5, 3.5], [3.0, 4.0]]);
}

#[test]
fn residual_add_joins_the_layer_norm_after_it() {
    let nodes = || {
        vec![
            node("Add", &["a", "b"], "sum", vec![]),
            node("LayerNormalization", &["sum", "g", "beta"], "y", vec![]),
        ]
    };
    let inits = || vec![init("g", &[6], 1), init("beta", &[6], 2)];
    let fused = model(nodes(), inits(), &["a", "b"], &["y"]);
    // The sum is also a graph output here, so it stays a separate Add.
    let plain = model(nodes(), inits(), &["a", "b"], &["y", "sum"]);
    let inputs = HashMap::from([
        ("a".to_string(), input(&[2, 3, 6])),
        (
            "b".to_string(),
            input(&[2, 3, 6]).affine(0.5, 1.0).expect("b"),
        ),
    ]);
    let (pf, pp) = (
        Plan::new(&fused, &Device::Cpu).expect("plan"),
        Plan::new(&plain, &Device::Cpu).expect("plan"),
    );
    assert_eq!(pf.step_ops(), ["LayerNormalization"]);
    assert_eq!(pp.step_ops(), ["Add", "LayerNormalization"]);
    let (yf, yp) = (
        &pf.run(inputs.clone()).expect("run")["y"],
        &pp.run(inputs).expect("run")["y"],
    );
    let diff = (yf - yp)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>());
    assert!(diff.expect("diff") < 1e-5);
}

/// Two ResNet blocks: the first adds its input (another Conv's output, read by the block's
/// first Conv too), the second a projection of its input; both residual Convs may write
/// over their residual (in_place.rs), which must not change any result, including a
/// residual that is also a graph output (not overwritten).
#[test]
fn residual_blocks_written_over_their_residual_match_the_oracle() {
    let nodes = vec![
        node("Conv", &["x", "w0", "b0"], "c0", vec![pads(1)]),
        node("Relu", &["c0"], "r0", vec![]),
        // Block 1: identity shortcut r0.
        node("Conv", &["r0", "w1", "b1"], "c1", vec![pads(1)]),
        node("Relu", &["c1"], "a1", vec![]),
        node("Conv", &["a1", "w2"], "c2", vec![pads(1)]),
        node("Add", &["c2", "r0"], "s1", vec![]),
        node("Relu", &["s1"], "y1", vec![]),
        // Block 2: projection shortcut p (a 1×1 Conv of y1).
        node("Conv", &["y1", "wp"], "p", vec![pads(0)]),
        node("Conv", &["y1", "w3", "b3"], "c3", vec![pads(1)]),
        node("Relu", &["c3"], "a3", vec![]),
        node("Conv", &["a3", "w4"], "c4", vec![pads(1)]),
        node("Add", &["p", "c4"], "s2", vec![]),
        node("Relu", &["s2"], "y2", vec![]),
        // Block 3: its shortcut y2 is also a graph output, so it must stay as it was.
        node("Conv", &["y2", "w1", "b1"], "c5", vec![pads(1)]),
        node("Relu", &["c5"], "a5", vec![]),
        node("Conv", &["a5", "w2"], "c6", vec![pads(1)]),
        node("Add", &["c6", "y2"], "y3", vec![]),
    ];
    let inits = vec![
        init("w0", &[8, 3, 3, 3], 1),
        init("b0", &[8], 2),
        init("w1", &[8, 8, 3, 3], 3),
        init("b1", &[8], 4),
        init("w2", &[8, 8, 3, 3], 5),
        init("wp", &[8, 8, 1, 1], 6),
        init("w3", &[8, 8, 3, 3], 7),
        init("b3", &[8], 8),
        init("w4", &[8, 8, 3, 3], 9),
    ];
    let m = model(nodes, inits, &["x"], &["y2", "y3"]);
    let inputs = HashMap::from([("x".to_string(), input(&[2, 3, 9, 7]))]);
    check(&m, inputs, &["Conv"; 8]);
}

/// Attention's scores, made by a MatMul and read only by the masked Softmax, are written
/// over by it (in_place.rs): the results must not change, for a mask per query row (the
/// softmax is a graph output, so it stays a node); with a mask per key, the scores'
/// MatMul, the Softmax and the product with `v` run as one attention node.
#[test]
fn masked_softmax_written_over_its_scores_matches_the_oracle() {
    let axis = attr_int("axis", -1);
    let nodes = vec![
        node("MatMul", &["q", "k"], "s", vec![]),
        node("Div", &["s", "four"], "scaled", vec![]),
        node("Add", &["scaled", "mask"], "biased", vec![]),
        node("Softmax", &["biased"], "p", vec![axis.clone()]),
        node("MatMul", &["p", "v"], "o", vec![]),
        node("MatMul", &["q", "k"], "s2", vec![]),
        node("Add", &["s2", "rows"], "b2", vec![]),
        node("Softmax", &["b2"], "p2", vec![axis]),
    ];
    let inits = vec![scalar_init("four", 4.0)];
    let m = model(nodes, inits, &["q", "k", "v", "mask", "rows"], &["o", "p2"]);
    let inputs = HashMap::from([
        ("q".to_string(), input(&[2, 3, 5, 4])),
        ("k".to_string(), input(&[2, 3, 4, 7])),
        ("v".to_string(), input(&[2, 3, 7, 6])),
        ("mask".to_string(), input(&[2, 1, 1, 7])),
        ("rows".to_string(), input(&[2, 3, 5, 1])),
    ]);
    let ops = ["KilnAttention", "MatMul", "Softmax"];
    check(&m, inputs, &ops);
}

/// Attention as exports write it, the scores' MatMul, Softmax and MatMul with `v` (fuse.rs:
/// one node, each head's scores used while in cache): heads read through transposes and
/// the context written back through one, scaled and masked per key; no mask or scale, the
/// softmax's axis given as 3; and a softmax over another axis (the node runs its three
/// parts). Queries 5 long, keys 7, heads of 4 and values of 6, so no two sizes are equal.
#[test]
fn attention_heads_run_as_one_node_matching_the_oracle() {
    let last = attr_int("axis", -1);
    let nodes = vec![
        node("Transpose", &["q"], "qh", vec![perm(&[0, 2, 1, 3])]),
        node("Transpose", &["k"], "kt", vec![perm(&[0, 2, 3, 1])]),
        node("MatMul", &["qh", "kt"], "s", vec![]),
        node("Div", &["s", "two"], "scaled", vec![]),
        node("Add", &["scaled", "mask"], "biased", vec![]),
        node("Softmax", &["biased"], "p", vec![last]),
        node("Transpose", &["v"], "vh", vec![perm(&[0, 2, 1, 3])]),
        node("MatMul", &["p", "vh"], "c", vec![]),
        node("Transpose", &["c"], "out", vec![perm(&[0, 2, 1, 3])]),
        node("MatMul", &["q2", "k2"], "s2", vec![]),
        node("Softmax", &["s2"], "p2", vec![attr_int("axis", 3)]),
        node("MatMul", &["p2", "v2"], "out2", vec![]),
        node("MatMul", &["q2", "k2"], "s3", vec![]),
        node("Softmax", &["s3"], "p3", vec![attr_int("axis", 2)]),
        node("MatMul", &["p3", "v2"], "out3", vec![]),
    ];
    let inits = vec![scalar_init("two", 2.0)];
    let names = ["q", "k", "v", "mask", "q2", "k2", "v2"];
    let m = model(nodes, inits, &names, &["out", "out2", "out3"]);
    let dims: [&[usize]; 7] = [
        &[2, 5, 3, 4],
        &[2, 7, 3, 4],
        &[2, 7, 3, 6],
        &[2, 1, 1, 7],
        &[2, 3, 5, 4],
        &[2, 3, 4, 7],
        &[2, 3, 7, 6],
    ];
    let inputs = names
        .iter()
        .zip(dims)
        .enumerate()
        .map(|(i, (n, d))| {
            let t = input(d).affine(1.0 / (i + 1) as f64, 0.1 * i as f64);
            (n.to_string(), t.expect("input"))
        })
        .collect();
    check(&m, inputs, &["KilnAttention"; 3]);
}

/// A dense block's chain of Concats (append.rs: each writes only its new channels after
/// the earlier ones, in one buffer) gives the oracle's results at batch 1 and 2, also for
/// a chain value read again after later links appended to its buffer (by a 3×3 Conv, and
/// by a BN, ReLU, 1×1 Conv bottleneck that reads it in place), for a chain whose first
/// link reserves room and one that must grow its buffer.
#[test]
fn dense_block_concat_chains_match_the_oracle() {
    let axis = attr_int("axis", 1);
    let mut var7 = init("v7", &[7], 10);
    var7.float_data.iter_mut().for_each(|v| *v = v.abs() + 0.5);
    let nodes = vec![
        node("Conv", &["x", "w1"], "k1", vec![pads(1)]),
        node("Concat", &["x", "k1"], "c1", vec![axis.clone()]),
        node("Relu", &["c1"], "r1", vec![]),
        node("Conv", &["r1", "w2"], "k2", vec![pads(1)]),
        node("Concat", &["c1", "k2"], "c2", vec![axis.clone()]),
        node("Conv", &["c2", "w3"], "k3", vec![pads(1)]),
        node("Concat", &["c2", "k3"], "c3", vec![axis.clone()]),
        // Read after c2 and c3 were written into c1's buffer.
        node("Conv", &["c1", "w4"], "late", vec![pads(1)]),
        // DenseNet's bottleneck on c2 after c3 was appended: BN, ReLU, 1×1 Conv, which
        // reads the chain's view in place at batch 2 (each image's channels apart).
        node(
            "BatchNormalization",
            &["c2", "g7", "b7", "m7", "v7"],
            "bn2",
            vec![],
        ),
        node("Relu", &["bn2"], "br2", vec![]),
        node("Conv", &["br2", "w5", "b5"], "bottleneck", vec![pads(0)]),
        // A second chain whose parts are no Convs: its buffer grows as it goes.
        node("Relu", &["c3"], "p1", vec![]),
        node("Concat", &["c3", "p1"], "d1", vec![axis.clone()]),
        node("Sigmoid", &["d1"], "p2", vec![]),
        node("Concat", &["d1", "p2"], "d2", vec![axis.clone()]),
        node("Tanh", &["d2"], "p3", vec![]),
        node("Concat", &["d2", "p3", "x"], "d3", vec![axis]),
    ];
    let inits = vec![
        init("w1", &[2, 3, 3, 3], 1),
        init("w2", &[2, 5, 3, 3], 2),
        init("w3", &[3, 7, 3, 3], 3),
        init("w4", &[4, 5, 3, 3], 4),
        init("w5", &[4, 7, 1, 1], 5),
        init("b5", &[4], 6),
        init("g7", &[7], 7),
        init("b7", &[7], 8),
        init("m7", &[7], 9),
        var7,
    ];
    let m = model(nodes, inits, &["x"], &["late", "bottleneck", "d3"]);
    let ops = [
        "Conv", "Concat", "Relu", "Conv", "Concat", "Conv", "Concat", "Conv", "Conv", "Relu",
        "Concat", "Sigmoid", "Concat", "Tanh", "Concat",
    ];
    for batch in [1, 2] {
        let inputs = HashMap::from([("x".to_string(), input(&[batch, 3, 5, 6]))]);
        check(&m, inputs, &ops);
    }
}
