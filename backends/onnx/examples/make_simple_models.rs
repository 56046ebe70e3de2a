//! Writes Triton's `simple` model as ONNX (OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 -
//! INPUT1, INT32 [batch, 16]) to `<repository>/{simple,simple_dynamic_batch}/1/model.onnx`,
//! and Triton's example `simple_sequence` (OUTPUT = INPUT + START where READY, else 0) and
//! `simple_dyna_sequence` (the same plus the correlation id at END) to
//! `<repository>/simple_{dyna_,}sequence/1/model.onnx`,
//! and, given a second folder, the STRING test models built the way Triton's QA generator
//! builds its ONNX ones (`<folder>/*.onnx`, see `tests/python/test_onnx_strings.py`) and a
//! model whose weight is external data (`<folder>/external_add/`) and one with a scalar
//! output (`scalar_sum.onnx`), an identity over every type (`identity_all_types.onnx`) and
//! `ai.onnx.ml` preprocessing, linear models and tree ensembles (`ml_*.onnx`), and
//! onnxruntime's `com.microsoft` operators (`ms_contrib.onnx`, `ms_attention.onnx`), and a
//! scikit-learn-style text pipeline (`text_pipeline.onnx`) and sequences inside a graph
//! (`seq_pipeline.onnx`), and a `Scan` (`scan_rows.onnx`), and two accumulators whose
//! running sum Triton keeps as implicit state (`state_*.onnx`), and a model for ragged
//! batching (`ragged_sum.onnx`), and one whose outputs' sizes the request decides
//! (`sized_by_request.onnx`).
//! Run by `cargo xtask gen-onnx`; the files are committed.
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension::Value,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;

/// A graph input or output: `dims` with `None` for a symbolic dimension.
fn tensor(name: &str, elem_type: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = |d: &Option<i64>| Dimension {
        value: Some(match d {
            Some(n) => Value::DimValue(*n),
            None => Value::DimParam("batch".into()),
        }),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto {
                    dim: dims.iter().map(dim).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{output}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// `Cast` of `input` to `to`.
fn cast(input: &str, output: &str, to: DataType) -> NodeProto {
    let mut n = node("Cast", &[input], output);
    n.attribute.push(int("to", to as i64));
    n
}

/// An attribute of `kind` named `name`, with no value yet.
fn attr(name: &str, kind: AttributeType) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: kind as i32,
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        i,
        ..attr(name, AttributeType::Int)
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        f,
        ..attr(name, AttributeType::Float)
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..attr(name, AttributeType::Ints)
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        floats: v.to_vec(),
        ..attr(name, AttributeType::Floats)
    }
}

fn text(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: v.as_bytes().to_vec(),
        ..attr(name, AttributeType::String)
    }
}

fn texts(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..attr(name, AttributeType::Strings)
    }
}

const ML: &str = "ai.onnx.ml";
const MS: &str = "com.microsoft";

/// A node of `domain`, named after its operator and first output.
fn domain_node(
    domain: &str,
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outputs[0]),
        domain: domain.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

/// A FLOAT initializer shaped `dims` whose element `i` is `f(i)`.
fn float_init(name: &str, dims: Vec<i64>, f: impl Fn(usize) -> f32) -> TensorProto {
    let n: i64 = dims.iter().product();
    TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        dims,
        float_data: (0..n as usize).map(f).collect(),
        ..Default::default()
    }
}

/// `m` also importing `domain` at `version`.
fn with_opset(mut m: ModelProto, domain: &str, version: i64) -> ModelProto {
    m.opset_import.push(OperatorSetIdProto {
        domain: domain.into(),
        version,
    });
    m
}

fn model(
    name: &str,
    opset: i64,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        producer_name: "kiln make_simple_models".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            name: name.into(),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: initializers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

const BATCH_16: &[Option<i64>] = &[None, Some(16)];

fn simple() -> ModelProto {
    let int32 = |n| tensor(n, DataType::Int32, BATCH_16);
    model(
        "simple",
        13,
        vec![
            node("Add", &["INPUT0", "INPUT1"], "OUTPUT0"),
            node("Sub", &["INPUT0", "INPUT1"], "OUTPUT1"),
        ],
        vec![int32("INPUT0"), int32("INPUT1")],
        vec![int32("OUTPUT0"), int32("OUTPUT1")],
        vec![],
    )
}

/// Triton QA's `onnx_object_object_<out1>`: STRING inputs cast to INT32, added and
/// subtracted; OUTPUT0 cast back to STRING, OUTPUT1 to `out1`.
fn string_add_sub(out1: DataType) -> ModelProto {
    let string = |n| tensor(n, DataType::String, BATCH_16);
    model(
        "string_add_sub",
        13,
        vec![
            cast("INPUT0", "_INPUT0", DataType::Int32),
            cast("INPUT1", "_INPUT1", DataType::Int32),
            node("Add", &["_INPUT0", "_INPUT1"], "CAST0"),
            node("Sub", &["_INPUT0", "_INPUT1"], "CAST1"),
            cast("CAST0", "OUTPUT0", DataType::String),
            cast("CAST1", "OUTPUT1", out1),
        ],
        vec![string("INPUT0"), string("INPUT1")],
        vec![string("OUTPUT0"), tensor("OUTPUT1", out1, BATCH_16)],
        vec![],
    )
}

/// Triton QA's `onnx_zero_1_object`: OUTPUT0 = Identity(INPUT0), STRING [batch, any].
fn string_identity() -> ModelProto {
    let t = |n| tensor(n, DataType::String, &[None, None]);
    model(
        "string_identity",
        13,
        vec![node("Identity", &["INPUT0"], "OUTPUT0")],
        vec![t("INPUT0")],
        vec![t("OUTPUT0")],
        vec![],
    )
}

/// Class ids to labels: LABEL = Gather(["cat", "dog", "bird"], ID) and IS_DOG = (LABEL ==
/// "dog"), ID INT64 [batch]; a STRING initializer and a STRING constant.
fn string_labels() -> ModelProto {
    let labels = TensorProto {
        name: "labels".into(),
        data_type: DataType::String as i32,
        dims: vec![3],
        string_data: vec![b"cat".to_vec(), b"dog".to_vec(), b"bird".to_vec()],
        ..Default::default()
    };
    let mut dog = node("Constant", &[], "dog");
    dog.attribute.push(AttributeProto {
        t: Some(TensorProto {
            data_type: DataType::String as i32,
            string_data: vec![b"dog".to_vec()],
            ..Default::default()
        }),
        ..attr("value", AttributeType::Tensor)
    });
    let mut gather = node("Gather", &["labels", "ID"], "LABEL");
    gather.attribute.push(int("axis", 0));
    // Opset 19: Equal on strings.
    model(
        "string_labels",
        19,
        vec![gather, dog, node("Equal", &["LABEL", "dog"], "IS_DOG")],
        vec![tensor("ID", DataType::Int64, &[None])],
        vec![
            tensor("LABEL", DataType::String, &[None]),
            tensor("IS_DOG", DataType::Bool, &[None]),
        ],
        vec![labels],
    )
}

/// Y = X + W with W (FLOAT [4], 1 2 3 4) kept in the external file `weights.bin`
/// after 8 bytes of padding, as exporters write large models: `<dir>/model.onnx` and
/// `<dir>/weights.bin`.
fn external_add(dir: &std::path::Path) -> std::io::Result<()> {
    use candle_onnx::onnx::StringStringEntryProto;
    let w: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut file = vec![0u8; 8];
    file.extend_from_slice(&w);
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    let weight = TensorProto {
        name: "W".into(),
        data_type: DataType::Float as i32,
        dims: vec![4],
        data_location: 1, // EXTERNAL
        external_data: vec![
            kv("location", "weights.bin".into()),
            kv("offset", "8".into()),
            kv("length", w.len().to_string()),
        ],
        ..Default::default()
    };
    let f = |n| tensor(n, DataType::Float, &[None, Some(4)]);
    let m = model(
        "external_add",
        13,
        vec![node("Add", &["X", "W"], "Y")],
        vec![f("X")],
        vec![f("Y")],
        vec![weight],
    );
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("weights.bin"), &file)?;
    write(&dir.join("model.onnx"), &m)
}

/// Y = ReduceSum(X) over all of X (FLOAT [4]) without kept dimensions: a scalar output.
fn scalar_sum() -> ModelProto {
    let mut sum = node("ReduceSum", &["X"], "Y");
    sum.attribute.push(int("keepdims", 0));
    model(
        "scalar_sum",
        13,
        vec![sum],
        vec![tensor("X", DataType::Float, &[Some(4)])],
        vec![tensor("Y", DataType::Float, &[])],
        vec![],
    )
}

/// Outputs whose size the request decides: Y = Expand(X [1], SHAPE [2]) and the outer sum
/// Z = A [n, 1] + B [1, m].
fn sized_by_request() -> ModelProto {
    model(
        "sized_by_request",
        13,
        vec![
            node("Expand", &["X", "SHAPE"], "Y"),
            node("Add", &["A", "B"], "Z"),
        ],
        vec![
            tensor("X", DataType::Float, &[Some(1)]),
            tensor("SHAPE", DataType::Int64, &[Some(2)]),
            tensor("A", DataType::Float, &[None, Some(1)]),
            tensor("B", DataType::Float, &[Some(1), None]),
        ],
        vec![
            tensor("Y", DataType::Float, &[None, None]),
            tensor("Z", DataType::Float, &[None, None]),
        ],
        vec![],
    )
}

/// Triton QA's ONNX identity models, every type in one graph: OUTPUT_<T> = Identity(INPUT_<T>),
/// [batch, any].
fn identity_all_types() -> ModelProto {
    let types = [
        ("BOOL", DataType::Bool),
        ("UINT8", DataType::Uint8),
        ("UINT16", DataType::Uint16),
        ("UINT32", DataType::Uint32),
        ("UINT64", DataType::Uint64),
        ("INT8", DataType::Int8),
        ("INT16", DataType::Int16),
        ("INT32", DataType::Int32),
        ("INT64", DataType::Int64),
        ("FP16", DataType::Float16),
        ("FP32", DataType::Float),
        ("FP64", DataType::Double),
        ("BF16", DataType::Bfloat16),
        ("STRING", DataType::String),
    ];
    let io = |prefix: &str| -> Vec<ValueInfoProto> {
        types
            .iter()
            .map(|(n, t)| tensor(&format!("{prefix}_{n}"), *t, &[None, None]))
            .collect()
    };
    let nodes = types
        .iter()
        .map(|(n, _)| node("Identity", &[&format!("INPUT_{n}")], &format!("OUTPUT_{n}")))
        .collect();
    model(
        "identity_all_types",
        13,
        nodes,
        io("INPUT"),
        io("OUTPUT"),
        vec![],
    )
}

/// A scikit-learn-style preprocessing graph of `ai.onnx.ml` operators: SCALED =
/// Scaler(X), L1 / L2 / MAX = Normalizer(SCALED), X FLOAT [batch, 3]; LABEL =
/// LabelEncoder(CLASS) from INT64 class ids to names.
fn ml_preprocess() -> ModelProto {
    let ml = |op: &str, input: &str, output: &str, attrs: Vec<AttributeProto>| {
        domain_node(ML, op, &[input], &[output], attrs)
    };
    let scaler = vec![
        floats("offset", &[1.0, 2.0, 3.0]),
        floats("scale", &[0.5, 2.0, -1.0]),
    ];
    let labels = vec![
        ints("keys_int64s", &[0, 1, 2]),
        texts("values_strings", &["setosa", "versicolor", "virginica"]),
        text("default_string", "unknown"),
    ];
    let f = |n| tensor(n, DataType::Float, &[None, Some(3)]);
    let m = model(
        "ml_preprocess",
        13,
        vec![
            ml("Scaler", "X", "SCALED", scaler),
            ml("Normalizer", "SCALED", "L1", vec![text("norm", "L1")]),
            ml("Normalizer", "SCALED", "L2", vec![text("norm", "L2")]),
            ml("Normalizer", "SCALED", "MAX", vec![text("norm", "MAX")]),
            ml("LabelEncoder", "CLASS", "LABEL", labels),
        ],
        vec![f("X"), tensor("CLASS", DataType::Int64, &[None])],
        vec![
            f("SCALED"),
            f("L1"),
            f("L2"),
            f("MAX"),
            tensor("LABEL", DataType::String, &[None]),
        ],
        vec![],
    );
    with_opset(m, ML, 2)
}

/// scikit-learn-style linear models (`ai.onnx.ml`) on one input X FLOAT [batch, 4]: three
/// LinearClassifiers (3 classes with string labels and SOFTMAX, 3 classes with int labels
/// and LOGISTIC, binary with two int labels) and three LinearRegressors (3 targets with
/// SOFTMAX_ZERO and a zero row, 1 target with PROBIT, 2 targets as they are).
fn ml_linear() -> ModelProto {
    let ml = |op: &str, outputs: &[&str], attrs: Vec<AttributeProto>| {
        domain_node(ML, op, &["X"], outputs, attrs)
    };
    let w3: Vec<f32> = (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
    let nodes = vec![
        ml(
            "LinearClassifier",
            &["LABEL_S", "PROB_S"],
            vec![
                floats("coefficients", &w3),
                floats("intercepts", &[0.5, -0.25, 0.0]),
                texts("classlabels_strings", &["cat", "dog", "bird"]),
                text("post_transform", "SOFTMAX"),
            ],
        ),
        ml(
            "LinearClassifier",
            &["LABEL_I", "PROB_L"],
            vec![
                floats("coefficients", &w3),
                floats("intercepts", &[0.1, 0.2, 0.3]),
                ints("classlabels_ints", &[10, 20, 30]),
                text("post_transform", "LOGISTIC"),
            ],
        ),
        ml(
            "LinearClassifier",
            &["LABEL_B", "PROB_B"],
            vec![
                floats("coefficients", &[0.4, -0.3, 0.2, -0.1]),
                floats("intercepts", &[-0.05]),
                ints("classlabels_ints", &[3, 7]),
            ],
        ),
        ml(
            "LinearRegressor",
            &["REG_Z"],
            vec![
                floats("coefficients", &[&w3[..8], &[0.0; 4]].concat()),
                floats("intercepts", &[0.1, -0.2, 0.0]),
                int("targets", 3),
                text("post_transform", "SOFTMAX_ZERO"),
            ],
        ),
        ml(
            "LinearRegressor",
            &["REG_P"],
            vec![
                floats("coefficients", &[0.01, 0.02, 0.03, 0.04]),
                floats("intercepts", &[0.5]),
                text("post_transform", "PROBIT"),
            ],
        ),
        ml(
            "LinearRegressor",
            &["REG_N"],
            vec![
                floats("coefficients", &w3[..8]),
                floats("intercepts", &[1.0, 2.0]),
                int("targets", 2),
            ],
        ),
    ];
    let f = |n, w| tensor(n, DataType::Float, &[None, Some(w)]);
    let m = model(
        "ml_linear",
        13,
        nodes,
        vec![f("X", 4)],
        vec![
            tensor("LABEL_S", DataType::String, &[None]),
            f("PROB_S", 3),
            tensor("LABEL_I", DataType::Int64, &[None]),
            f("PROB_L", 3),
            tensor("LABEL_B", DataType::Int64, &[None]),
            f("PROB_B", 2),
            f("REG_Z", 3),
            f("REG_P", 1),
            f("REG_N", 2),
        ],
        vec![],
    );
    with_opset(m, ML, 1)
}

/// Tree ensembles (`ai.onnx.ml`) as the XGBoost, LightGBM and scikit-learn converters write
/// them, on X FLOAT [batch, 3]. Every node uses the same two trees: tree 0 splits on
/// feature 0 (<= 0.5), then feature 1 (< -0.3); tree 1 on feature 2 (>= 1.0, NaN going to
/// the true branch). Leaves (tree, node): (0,1), (0,3), (0,4), (1,1), (1,2).
fn ml_trees() -> ModelProto {
    let trees = vec![
        ints("nodes_treeids", &[0, 0, 0, 0, 0, 1, 1, 1]),
        ints("nodes_nodeids", &[0, 1, 2, 3, 4, 0, 1, 2]),
        ints("nodes_featureids", &[0, 0, 1, 0, 0, 2, 0, 0]),
        floats("nodes_values", &[0.5, 0.0, -0.3, 0.0, 0.0, 1.0, 0.0, 0.0]),
        texts(
            "nodes_modes",
            &[
                "BRANCH_LEQ",
                "LEAF",
                "BRANCH_LT",
                "LEAF",
                "LEAF",
                "BRANCH_GTE",
                "LEAF",
                "LEAF",
            ],
        ),
        ints("nodes_truenodeids", &[1, 0, 3, 0, 0, 1, 0, 0]),
        ints("nodes_falsenodeids", &[2, 0, 4, 0, 0, 2, 0, 0]),
        ints("nodes_missing_value_tracks_true", &[0, 0, 0, 0, 0, 1, 0, 0]),
    ];
    const LEAVES: [(i64, i64); 5] = [(0, 1), (0, 3), (0, 4), (1, 1), (1, 2)];
    // (prefix, [(leaf index, target or class, weight)]): the leaf-weight attributes.
    let weights = |prefix: &str, w: &[(usize, i64, f32)]| {
        vec![
            ints(
                &format!("{prefix}_treeids"),
                &w.iter().map(|e| LEAVES[e.0].0).collect::<Vec<_>>(),
            ),
            ints(
                &format!("{prefix}_nodeids"),
                &w.iter().map(|e| LEAVES[e.0].1).collect::<Vec<_>>(),
            ),
            ints(
                &format!("{prefix}_ids"),
                &w.iter().map(|e| e.1).collect::<Vec<_>>(),
            ),
            floats(
                &format!("{prefix}_weights"),
                &w.iter().map(|e| e.2).collect::<Vec<_>>(),
            ),
        ]
    };
    let ml = |op: &str, outputs: &[&str], extra: Vec<AttributeProto>| {
        domain_node(ML, op, &["X"], outputs, [trees.clone(), extra].concat())
    };
    let one_each = |ws: [f32; 5]| -> Vec<(usize, i64, f32)> {
        ws.iter().enumerate().map(|(i, &w)| (i, 0, w)).collect()
    };
    let nodes = vec![
        // XGBoost-style regression: SUM plus a base score.
        ml(
            "TreeEnsembleRegressor",
            &["REG"],
            [
                weights("target", &one_each([0.3, -0.2, 0.7, 0.1, -0.4])),
                vec![int("n_targets", 1), floats("base_values", &[0.5])],
            ]
            .concat(),
        ),
        // Random-forest-style regression of two targets: AVERAGE plus base values.
        ml(
            "TreeEnsembleRegressor",
            &["REG2"],
            [
                weights(
                    "target",
                    &[
                        (0, 0, 1.0),
                        (0, 1, 2.0),
                        (1, 0, -1.0),
                        (2, 1, 3.0),
                        (3, 0, 0.5),
                        (4, 1, -2.0),
                    ],
                ),
                vec![
                    int("n_targets", 2),
                    text("aggregate_function", "AVERAGE"),
                    floats("base_values", &[1.0, -1.0]),
                ],
            ]
            .concat(),
        ),
        // The same two targets summed (some rows give a target no weight).
        ml(
            "TreeEnsembleRegressor",
            &["REG3"],
            [
                weights(
                    "target",
                    &[
                        (0, 0, 1.0),
                        (0, 1, 2.0),
                        (1, 0, -1.0),
                        (2, 1, 3.0),
                        (3, 0, 0.5),
                        (4, 1, -2.0),
                    ],
                ),
                vec![int("n_targets", 2), floats("base_values", &[1.0, -1.0])],
            ]
            .concat(),
        ),
        // XGBoost-style binary classifier: one class's margins, LOGISTIC.
        ml(
            "TreeEnsembleClassifier",
            &["LABEL_X", "PROB_X"],
            [
                weights("class", &one_each([0.3, -0.2, 0.7, 0.1, -0.4])),
                vec![
                    ints("classlabels_int64s", &[0, 1]),
                    floats("base_values", &[-0.1]),
                    text("post_transform", "LOGISTIC"),
                ],
            ]
            .concat(),
        ),
        // scikit-learn-style binary random forest: class 1 probabilities, string labels.
        ml(
            "TreeEnsembleClassifier",
            &["LABEL_R", "PROB_R"],
            [
                weights(
                    "class",
                    &[
                        (0, 1, 0.4),
                        (1, 1, 0.1),
                        (2, 1, 0.35),
                        (3, 1, 0.45),
                        (4, 1, 0.05),
                    ],
                ),
                vec![texts("classlabels_strings", &["no", "yes"])],
            ]
            .concat(),
        ),
        // Three classes, SOFTMAX, base values.
        ml(
            "TreeEnsembleClassifier",
            &["LABEL_M", "PROB_M"],
            [
                weights(
                    "class",
                    &[
                        (0, 0, 0.5),
                        (0, 1, -0.5),
                        (1, 1, 0.8),
                        (1, 2, 0.1),
                        (2, 2, 0.9),
                        (3, 0, 0.3),
                        (3, 2, -0.3),
                        (4, 1, 0.6),
                    ],
                ),
                vec![
                    ints("classlabels_int64s", &[5, 6, 7]),
                    floats("base_values", &[0.1, 0.2, 0.3]),
                    text("post_transform", "SOFTMAX"),
                ],
            ]
            .concat(),
        ),
        // Two classes that both have weights (not onnxruntime's "binary case").
        ml(
            "TreeEnsembleClassifier",
            &["LABEL_2", "PROB_2"],
            [
                weights(
                    "class",
                    &[
                        (0, 0, 0.6),
                        (0, 1, 0.4),
                        (1, 1, 0.9),
                        (2, 0, 0.2),
                        (3, 0, 0.5),
                        (4, 1, 0.3),
                    ],
                ),
                vec![ints("classlabels_int64s", &[3, 7])],
            ]
            .concat(),
        ),
    ];
    let f = |n, w| tensor(n, DataType::Float, &[None, Some(w)]);
    let label = |n, t| tensor(n, t, &[None]);
    let m = model(
        "ml_trees",
        13,
        nodes,
        vec![f("X", 3)],
        vec![
            f("REG", 1),
            f("REG2", 2),
            f("REG3", 2),
            label("LABEL_X", DataType::Int64),
            f("PROB_X", 2),
            label("LABEL_R", DataType::String),
            f("PROB_R", 2),
            label("LABEL_M", DataType::Int64),
            f("PROB_M", 3),
            label("LABEL_2", DataType::Int64),
            f("PROB_2", 2),
        ],
        vec![],
    );
    with_opset(m, ML, 1)
}

/// scikit-learn-style feature preparation (`ai.onnx.ml`): NUM FLOAT [batch, 2] with
/// missing values, CITY STRING [batch, 1] and CODE INT64 [batch, 1] through Imputer,
/// OneHotEncoder (string and int categories), CategoryMapper (both ways) and
/// FeatureVectorizer.
fn ml_features() -> ModelProto {
    let ml = |op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>| {
        domain_node(ML, op, inputs, &[output], attribute)
    };
    let cities = ["paris", "tokyo", "lima"];
    let nodes = vec![
        ml(
            "Imputer",
            &["NUM"],
            "NUM_I",
            vec![
                floats("imputed_value_floats", &[5.0, -1.0]),
                float("replaced_value_float", f32::NAN),
            ],
        ),
        ml(
            "OneHotEncoder",
            &["CITY"],
            "CITY_OH",
            vec![texts("cats_strings", &cities)],
        ),
        ml(
            "OneHotEncoder",
            &["CODE"],
            "CODE_OH",
            vec![ints("cats_int64s", &[10, 20]), int("zeros", 1)],
        ),
        ml(
            "CategoryMapper",
            &["CITY"],
            "CITY_ID",
            vec![
                texts("cats_strings", &cities),
                ints("cats_int64s", &[1, 2, 3]),
                int("default_int64", 0),
            ],
        ),
        ml(
            "CategoryMapper",
            &["CODE"],
            "CODE_NAME",
            vec![
                texts("cats_strings", &["ten", "twenty"]),
                ints("cats_int64s", &[10, 20]),
                text("default_string", "other"),
            ],
        ),
        ml(
            "FeatureVectorizer",
            &["NUM_I", "NUM"],
            "FEATURES",
            vec![ints("inputdimensions", &[2, 1])],
        ),
    ];
    let t = |n, ty, w: &[Option<i64>]| tensor(n, ty, w);
    let b = |w: i64| vec![None, Some(w)];
    let m = model(
        "ml_features",
        13,
        nodes,
        vec![
            t("NUM", DataType::Float, &b(2)),
            t("CITY", DataType::String, &b(1)),
            t("CODE", DataType::Int64, &b(1)),
        ],
        vec![
            t("NUM_I", DataType::Float, &b(2)),
            t("CITY_OH", DataType::Float, &[None, Some(1), Some(3)]),
            t("CODE_OH", DataType::Float, &[None, Some(1), Some(2)]),
            t("CITY_ID", DataType::Int64, &b(1)),
            t("CODE_NAME", DataType::String, &b(1)),
            t("FEATURES", DataType::Float, &b(3)),
        ],
        vec![],
    );
    with_opset(m, ML, 2)
}

/// onnxruntime's `com.microsoft` operators as its transformer optimizer writes them, on
/// X and S FLOAT [batch, 4, 8]: SkipLayerNormalization (with bias; its sum output too),
/// BiasGelu, FastGelu, Gelu, QuickGelu, FusedMatMul (transB, alpha),
/// SkipSimplifiedLayerNormalization and the default domain's SimplifiedLayerNormalization.
fn ms_contrib() -> ModelProto {
    let init = |name: &str, dims: Vec<i64>, f: fn(usize) -> f32| float_init(name, dims, f);
    let ms = |op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>| {
        domain_node(MS, op, inputs, outputs, attribute)
    };
    let nodes = vec![
        ms(
            "SkipLayerNormalization",
            &["X", "S", "gamma", "beta", "bias"],
            &["SLN", "", "", "SLN_SUM"],
            vec![float("epsilon", 1e-5)],
        ),
        ms("BiasGelu", &["X", "bias"], &["BG"], vec![]),
        ms("FastGelu", &["X", "bias"], &["FG"], vec![]),
        ms("Gelu", &["X"], &["G"], vec![]),
        ms("QuickGelu", &["X"], &["QG"], vec![float("alpha", 1.5)]),
        ms(
            "FusedMatMul",
            &["X", "W"],
            &["FM"],
            vec![float("alpha", 0.5), int("transB", 1)],
        ),
        ms(
            "SkipSimplifiedLayerNormalization",
            &["X", "S", "gamma", "bias"],
            &["SSLN", "", "", "SSLN_SUM"],
            vec![float("epsilon", 1e-6)],
        ),
        // onnxruntime registers RMSNorm in the default domain.
        NodeProto {
            domain: String::new(),
            ..ms(
                "SimplifiedLayerNormalization",
                &["X", "gamma"],
                &["RMS"],
                vec![],
            )
        },
    ];
    let f = |n| tensor(n, DataType::Float, &[None, Some(4), Some(8)]);
    let m = model(
        "ms_contrib",
        13,
        nodes,
        vec![f("X"), f("S")],
        [
            "SLN", "SLN_SUM", "BG", "FG", "G", "QG", "FM", "SSLN", "SSLN_SUM", "RMS",
        ]
        .into_iter()
        .map(f)
        .collect(),
        vec![
            init("gamma", vec![8], |i| 0.5 + i as f32 * 0.1),
            init("beta", vec![8], |i| i as f32 * 0.05 - 0.2),
            init("bias", vec![8], |i| 0.1 - i as f32 * 0.03),
            init("W", vec![8, 8], |i| ((i * 5 % 13) as f32 - 6.0) * 0.1),
        ],
    );
    with_opset(m, MS, 1)
}

/// onnxruntime's fused BERT operators: EmbedLayerNormalization of IDS, SEG and MASK (INT32
/// [batch, 6]) into EMB and MASK_INDEX, then Attention (4 heads) on EMB with the 0/1 mask,
/// with the key lengths (MASK_INDEX) and unidirectional without a mask.
fn ms_attention() -> ModelProto {
    let init = |name: &str, dims: Vec<i64>, salt: usize| {
        float_init(name, dims, move |i| {
            (((i * 7 + salt) % 17) as f32 - 8.0) * 0.05
        })
    };
    let ms = |op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>| {
        domain_node(MS, op, inputs, outputs, attribute)
    };
    let heads = || vec![int("num_heads", 4)];
    let nodes = vec![
        ms(
            "EmbedLayerNormalization",
            &["IDS", "SEG", "word", "pos", "seg", "gamma", "beta", "MASK"],
            &["EMB", "MASK_INDEX"],
            vec![],
        ),
        ms(
            "Attention",
            &["EMB", "qkv_w", "qkv_b", "MASK"],
            &["ATT"],
            heads(),
        ),
        ms(
            "Attention",
            &["EMB", "qkv_w", "qkv_b", "MASK_INDEX"],
            &["ATT_LEN"],
            heads(),
        ),
        ms(
            "Attention",
            &["EMB", "qkv_w", "qkv_b"],
            &["ATT_CAUSAL"],
            vec![int("num_heads", 4), int("unidirectional", 1)],
        ),
    ];
    let i32s = |n| tensor(n, DataType::Int32, &[None, Some(6)]);
    let f = |n| tensor(n, DataType::Float, &[None, Some(6), Some(16)]);
    let m = model(
        "ms_attention",
        13,
        nodes,
        vec![i32s("IDS"), i32s("SEG"), i32s("MASK")],
        vec![
            f("EMB"),
            tensor("MASK_INDEX", DataType::Int32, &[None]),
            f("ATT"),
            f("ATT_LEN"),
            f("ATT_CAUSAL"),
        ],
        vec![
            init("word", vec![50, 16], 1),
            init("pos", vec![16, 16], 2),
            init("seg", vec![2, 16], 3),
            init("gamma", vec![16], 4),
            init("beta", vec![16], 5),
            init("qkv_w", vec![16, 48], 6),
            init("qkv_b", vec![48], 7),
        ],
    );
    with_opset(m, MS, 1)
}

/// A scikit-learn text pipeline as skl2onnx exports one, on TEXT STRING [batch, 1]: the
/// texts flattened and lower-cased (StringNormalizer), cut into words two ways
/// (onnxruntime's com.microsoft Tokenizer: by separator patterns with start/end marks
/// into WORDS, and by a token pattern of at least 2 characters), the words' unigram and
/// bigram TF-IDF (TfIdfVectorizer on strings) into TFIDF; and ONNX 20's RegexFullMatch
/// (IS_QUESTION), StringConcat (SHOUT) and StringSplit (PARTS, COUNTS).
fn text_pipeline() -> ModelProto {
    let string_init = |name: &str, dims: Vec<i64>, v: &[&str]| TensorProto {
        name: name.into(),
        data_type: DataType::String as i32,
        dims,
        string_data: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    };
    let flat = TensorProto {
        name: "flat".into(),
        data_type: DataType::Int64 as i32,
        dims: vec![1],
        int64_data: vec![-1],
        ..Default::default()
    };
    let with = |mut n: NodeProto, a: Vec<AttributeProto>| {
        n.attribute = a;
        n
    };
    let ms = |op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>| {
        domain_node(MS, op, inputs, &[output], attribute)
    };
    let vocab = [
        "apple", "banana", "cherry", "good", "is", "apple", "pie", "banana", "split", "is", "good",
    ];
    let nodes = vec![
        node("Reshape", &["TEXT", "flat"], "FLAT"),
        with(
            node("StringNormalizer", &["FLAT"], "NORM"),
            vec![
                text("case_change_action", "LOWER"),
                // onnxruntime builds this C++ locale (en_US.UTF-8 by default, often not installed).
                text("locale", "C.UTF-8"),
            ],
        ),
        ms(
            "Tokenizer",
            &["NORM"],
            "WORDS",
            vec![
                int("mark", 1),
                int("mincharnum", 1),
                text("pad_value", "#"),
                texts("separators", &[" ", "[,.!?]"]),
            ],
        ),
        ms(
            "Tokenizer",
            &["NORM"],
            "TOKENS",
            vec![
                int("mark", 0),
                int("mincharnum", 2),
                text("pad_value", "#"),
                text("tokenexp", "[a-z0-9_]+"),
            ],
        ),
        with(
            node("TfIdfVectorizer", &["TOKENS"], "TFIDF"),
            vec![
                int("min_gram_length", 1),
                int("max_gram_length", 2),
                int("max_skip_count", 0),
                text("mode", "TFIDF"),
                ints("ngram_counts", &[0, 5]),
                ints("ngram_indexes", &[0, 1, 2, 3, 4, 5, 6, 7]),
                floats("weights", &[1.5, 2.0, 2.5, 1.0, 0.5, 3.0, 3.5, 4.0]),
                texts("pool_strings", &vocab),
            ],
        ),
        with(
            node("RegexFullMatch", &["NORM"], "IS_QUESTION"),
            vec![text("pattern", r".*\?\s*")],
        ),
        node("StringConcat", &["NORM", "bang"], "SHOUT"),
    ];
    let mut split = domain_node("", "StringSplit", &["NORM"], &["PARTS", "COUNTS"], vec![]);
    split.attribute = vec![text("delimiter", " "), int("maxsplit", 2)];
    let mut nodes = nodes;
    nodes.push(split);
    let t = |n, ty, d: &[Option<i64>]| tensor(n, ty, d);
    let m = model(
        "text_pipeline",
        20,
        nodes,
        vec![t("TEXT", DataType::String, &[None, Some(1)])],
        vec![
            t("WORDS", DataType::String, &[None, None]),
            t("TFIDF", DataType::Float, &[None, Some(8)]),
            t("IS_QUESTION", DataType::Bool, &[None]),
            t("SHOUT", DataType::String, &[None]),
            t("PARTS", DataType::String, &[None, None]),
            t("COUNTS", DataType::Int64, &[None]),
        ],
        vec![flat, string_init("bang", vec![], &["!"])],
    );
    with_opset(m, MS, 1)
}

/// Sequences inside a served graph, on X FLOAT [batch, 6]: SplitToSequence into three
/// [batch, 2] pieces, SequenceErase of the last, SequenceMap squaring each (a body graph),
/// SequenceInsert of X's first piece again at the front, ConcatFromSequence into Y FLOAT
/// [batch, 6], and LEN INT64 [1] (SequenceLength, unsqueezed).
fn seq_pipeline() -> ModelProto {
    let int64 = |name: &str, dims: Vec<i64>, v: Vec<i64>| TensorProto {
        name: name.into(),
        data_type: DataType::Int64 as i32,
        dims,
        int64_data: v,
        ..Default::default()
    };
    let with = |mut n: NodeProto, a: Vec<AttributeProto>| {
        n.attribute = a;
        n
    };
    let body = GraphProto {
        name: "square".into(),
        node: vec![node("Mul", &["piece", "piece"], "squared")],
        input: vec![tensor("piece", DataType::Float, &[None, Some(2)])],
        output: vec![tensor("squared", DataType::Float, &[None, Some(2)])],
        ..Default::default()
    };
    let mut map = node("SequenceMap", &["S2"], "S3");
    map.attribute.push(AttributeProto {
        g: Some(body),
        ..attr("body", AttributeType::Graph)
    });
    let nodes = vec![
        with(
            node("SplitToSequence", &["X", "two"], "S"),
            vec![int("axis", 1)],
        ),
        node("SequenceErase", &["S", "last"], "S2"),
        map,
        node("SequenceAt", &["S", "first"], "P0"),
        node("SequenceInsert", &["S3", "P0", "first"], "S4"),
        with(
            node("ConcatFromSequence", &["S4"], "Y"),
            vec![int("axis", 1)],
        ),
        node("SequenceLength", &["S4"], "N"),
        node("Unsqueeze", &["N", "first_axis"], "LEN"),
    ];
    model(
        "seq_pipeline",
        17,
        nodes,
        vec![tensor("X", DataType::Float, &[None, Some(6)])],
        vec![
            tensor("Y", DataType::Float, &[None, Some(6)]),
            tensor("LEN", DataType::Int64, &[Some(1)]),
        ],
        vec![
            int64("two", vec![], vec![2]),
            int64("last", vec![], vec![-1]),
            int64("first", vec![], vec![0]),
            int64("first_axis", vec![1], vec![0]),
        ],
    )
}

/// A `Scan` (opset 16) over X FLOAT [4, 3] read forwards and backwards at once: the state
/// sums the rows (FINAL [3]), and each step's product of the row with its mirror is
/// written along axis 1, last step first (Y [3, 4]).
fn scan_rows() -> ModelProto {
    let t = |n: &str, d: &[Option<i64>]| tensor(n, DataType::Float, d);
    let body = GraphProto {
        name: "step".into(),
        node: vec![
            node("Add", &["acc", "row"], "acc_out"),
            node("Mul", &["row", "mirror"], "prod"),
        ],
        input: vec![
            t("acc", &[Some(3)]),
            t("row", &[Some(3)]),
            t("mirror", &[Some(3)]),
        ],
        output: vec![t("acc_out", &[Some(3)]), t("prod", &[Some(3)])],
        ..Default::default()
    };
    let mut scan = domain_node("", "Scan", &["zeros", "X", "X"], &["FINAL", "Y"], vec![]);
    scan.attribute = vec![
        AttributeProto {
            g: Some(body),
            ..attr("body", AttributeType::Graph)
        },
        int("num_scan_inputs", 2),
        ints("scan_input_directions", &[0, 1]),
        ints("scan_output_axes", &[1]),
        ints("scan_output_directions", &[1]),
    ];
    model(
        "scan_rows",
        16,
        vec![scan],
        vec![t("X", &[Some(4), Some(3)])],
        vec![t("FINAL", &[Some(3)]), t("Y", &[Some(3), Some(4)])],
        vec![float_init("zeros", vec![3], |_| 0.0)],
    )
}

/// Triton's example sequence model, as its example clients expect it: INT32 [batch, 1],
/// OUTPUT = (INPUT + START) * READY.
fn simple_sequence() -> ModelProto {
    let int32 = |n| tensor(n, DataType::Int32, &[None, Some(1)]);
    model(
        "simple_sequence",
        13,
        vec![
            node("Add", &["INPUT", "START"], "started"),
            node("Mul", &["started", "READY"], "OUTPUT"),
        ],
        vec![int32("INPUT"), int32("START"), int32("READY")],
        vec![int32("OUTPUT")],
        vec![],
    )
}

/// Triton's example `simple_dyna_sequence`, as its example clients expect it: INT32
/// [batch, 1], OUTPUT = (INPUT + START + END × CORRID) × READY (CORRID INT64).
fn simple_dyna_sequence() -> ModelProto {
    let int32 = |n| tensor(n, DataType::Int32, &[None, Some(1)]);
    model(
        "simple_dyna_sequence",
        13,
        vec![
            node("Add", &["INPUT", "START"], "started"),
            cast("CORRID", "corrid32", DataType::Int32),
            node("Mul", &["END", "corrid32"], "at_end"),
            node("Add", &["started", "at_end"], "value"),
            node("Mul", &["value", "READY"], "OUTPUT"),
        ],
        vec![
            int32("INPUT"),
            int32("START"),
            int32("END"),
            int32("READY"),
            tensor("CORRID", DataType::Int64, &[None, Some(1)]),
        ],
        vec![int32("OUTPUT")],
        vec![],
    )
}

/// Triton QA's implicit-state accumulator (INT32 [batch, 1]): OUTPUT_STATE is INPUT on a
/// request flagged START (control input START, 0/1) and INPUT + INPUT_STATE otherwise;
/// OUTPUT repeats it. Without `start`, it always adds (for a state that starts from an
/// `initial_state`).
fn state_accumulator(start: bool) -> ModelProto {
    let int32 = |n| tensor(n, DataType::Int32, &[None, Some(1)]);
    let mut nodes = vec![node("Add", &["INPUT", "INPUT_STATE"], "sum")];
    let mut inputs = vec![int32("INPUT"), int32("INPUT_STATE")];
    if start {
        nodes.push(cast("START", "is_start", DataType::Bool));
        let mut pick = node("Where", &["is_start", "INPUT", "sum"], "OUTPUT_STATE");
        pick.name = "pick".into();
        nodes.push(pick);
        inputs.push(int32("START"));
    } else {
        nodes.push(node("Identity", &["sum"], "OUTPUT_STATE"));
    }
    nodes.push(node("Identity", &["OUTPUT_STATE"], "OUTPUT"));
    model(
        if start { "state_start" } else { "state_sum" },
        13,
        nodes,
        inputs,
        vec![int32("OUTPUT"), int32("OUTPUT_STATE")],
        vec![],
    )
}

/// An int64 initializer.
fn int64_init(name: &str, dims: Vec<i64>, values: Vec<i64>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Int64 as i32,
        dims,
        int64_data: values,
        ..Default::default()
    }
}

/// A model for Triton's ragged batching: INPUT (FP32, every request's elements joined
/// flat) with the batch inputs BOUNDS (INT32 [requests + 1], accumulated element counts
/// from 0), COUNT (FP32 [requests], element counts), MAXLEN (FP32 [largest count], only its
/// shape is read) and SHAPES (INT32 [rows, 1], item shapes). Outputs: DOUBLED = 2 × INPUT
/// (flat, a batch output), SUM (each request's sum, from a cumulative sum cut at BOUNDS),
/// COUNT_OUT, MAXLEN_OUT (INT64, the largest count in the batch) and SHAPES_OUT, each
/// [requests, 1].
fn ragged_sum() -> ModelProto {
    let unsqueeze = |input: &str, output: &str| node("Unsqueeze", &[input, "axis1"], output);
    let mut hi = node("Slice", &["bounds64", "one", "big"], "hi");
    hi.name = "hi".into();
    let mut lo = node("Slice", &["bounds64", "zero", "minus_one"], "lo");
    lo.name = "lo".into();
    let mut padded = node("Concat", &["zero_f", "cumsum"], "cumsum0");
    padded.attribute.push(int("axis", 0));
    let mut rows_1 = node("Concat", &["count_shape", "one"], "rows_1");
    rows_1.attribute.push(int("axis", 0));
    let nodes = vec![
        node("Add", &["INPUT", "INPUT"], "DOUBLED"),
        node("CumSum", &["INPUT", "zero"], "cumsum"),
        padded,
        cast("BOUNDS", "bounds64", DataType::Int64),
        hi,
        lo,
        node("Gather", &["cumsum0", "hi"], "at_end"),
        node("Gather", &["cumsum0", "lo"], "at_start"),
        node("Sub", &["at_end", "at_start"], "sums"),
        unsqueeze("sums", "SUM"),
        unsqueeze("COUNT", "COUNT_OUT"),
        node("Shape", &["MAXLEN"], "maxlen"),
        node("Shape", &["COUNT"], "count_shape"),
        rows_1,
        node("Reshape", &["maxlen", "one_by_one"], "maxlen_2d"),
        node("Expand", &["maxlen_2d", "rows_1"], "MAXLEN_OUT"),
        node("Identity", &["SHAPES"], "SHAPES_OUT"),
    ];
    let rows = &[None, Some(1)];
    model(
        "ragged_sum",
        13,
        nodes,
        vec![
            tensor("INPUT", DataType::Float, &[None]),
            tensor("BOUNDS", DataType::Int32, &[None]),
            tensor("COUNT", DataType::Float, &[None]),
            tensor("MAXLEN", DataType::Float, &[None]),
            tensor("SHAPES", DataType::Int32, rows),
        ],
        vec![
            tensor("DOUBLED", DataType::Float, &[None]),
            tensor("SUM", DataType::Float, rows),
            tensor("COUNT_OUT", DataType::Float, rows),
            tensor("MAXLEN_OUT", DataType::Int64, rows),
            tensor("SHAPES_OUT", DataType::Int32, rows),
        ],
        vec![
            int64_init("zero", vec![1], vec![0]),
            int64_init("one", vec![1], vec![1]),
            int64_init("minus_one", vec![1], vec![-1]),
            int64_init("big", vec![1], vec![i64::MAX]),
            int64_init("axis1", vec![1], vec![1]),
            int64_init("one_by_one", vec![2], vec![1, 1]),
            float_init("zero_f", vec![1], |_| 0.0),
        ],
    )
}

fn write(path: &std::path::Path, m: &ModelProto) -> std::io::Result<()> {
    let bytes = m.encode_to_vec();
    std::fs::write(path, &bytes)?;
    println!("wrote {} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let repo = args.next().unwrap_or_else(|| "model_repository".into());
    for name in ["simple", "simple_dynamic_batch"] {
        let path = std::path::Path::new(&repo).join(name).join("1");
        write(&path.join("model.onnx"), &simple())?;
    }
    for (name, m) in [
        ("simple_sequence", simple_sequence()),
        ("simple_dyna_sequence", simple_dyna_sequence()),
    ] {
        let dir = std::path::Path::new(&repo).join(name).join("1");
        std::fs::create_dir_all(&dir)?;
        write(&dir.join("model.onnx"), &m)?;
    }
    if let Some(dir) = args.next() {
        let dir = std::path::Path::new(&dir);
        std::fs::create_dir_all(dir)?;
        write(
            &dir.join("string_add_sub.onnx"),
            &string_add_sub(DataType::String),
        )?;
        write(
            &dir.join("string_add_sub_int32.onnx"),
            &string_add_sub(DataType::Int32),
        )?;
        write(&dir.join("string_identity.onnx"), &string_identity())?;
        write(&dir.join("string_labels.onnx"), &string_labels())?;
        external_add(&dir.join("external_add"))?;
        write(&dir.join("scalar_sum.onnx"), &scalar_sum())?;
        write(&dir.join("identity_all_types.onnx"), &identity_all_types())?;
        write(&dir.join("ml_preprocess.onnx"), &ml_preprocess())?;
        write(&dir.join("ml_linear.onnx"), &ml_linear())?;
        write(&dir.join("ml_trees.onnx"), &ml_trees())?;
        write(&dir.join("ml_features.onnx"), &ml_features())?;
        write(&dir.join("ms_contrib.onnx"), &ms_contrib())?;
        write(&dir.join("ms_attention.onnx"), &ms_attention())?;
        write(&dir.join("text_pipeline.onnx"), &text_pipeline())?;
        write(&dir.join("seq_pipeline.onnx"), &seq_pipeline())?;
        write(&dir.join("scan_rows.onnx"), &scan_rows())?;
        write(&dir.join("state_start.onnx"), &state_accumulator(true))?;
        write(&dir.join("state_sum.onnx"), &state_accumulator(false))?;
        write(&dir.join("ragged_sum.onnx"), &ragged_sum())?;
        write(&dir.join("sized_by_request.onnx"), &sized_by_request())?;
    }
    Ok(())
}
