//! Writes Triton's `simple` model as ONNX (OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 -
//! INPUT1, INT32 [batch, 16]) to `<repository>/{simple,simple_dynamic_batch}/1/model.onnx`.
//! Run by `cargo xtask gen-onnx`; the files are committed.
use candle_onnx::onnx::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value, tensor_shape_proto::Dimension,
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

fn int32_tensor(name: &str) -> ValueInfoProto {
    let dim = |v| Dimension {
        value: Some(v),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Int32 as i32,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        dim(Value::DimParam("batch".into())),
                        dim(Value::DimValue(16)),
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: [&str; 2], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{output}"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn simple() -> ModelProto {
    ModelProto {
        ir_version: 8,
        producer_name: "kiln make_simple_models".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: "simple".into(),
            node: vec![
                node("Add", ["INPUT0", "INPUT1"], "OUTPUT0"),
                node("Sub", ["INPUT0", "INPUT1"], "OUTPUT1"),
            ],
            input: vec![int32_tensor("INPUT0"), int32_tensor("INPUT1")],
            output: vec![int32_tensor("OUTPUT0"), int32_tensor("OUTPUT1")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn main() -> std::io::Result<()> {
    let repo = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "model_repository".into());
    let bytes = simple().encode_to_vec();
    for model in ["simple", "simple_dynamic_batch"] {
        let path = std::path::Path::new(&repo)
            .join(model)
            .join("1")
            .join("model.onnx");
        std::fs::write(&path, &bytes)?;
        println!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
