//! Reading a node's attributes.
use candle_onnx::onnx::{AttributeProto, NodeProto, TensorProto};

fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Integer attribute, or `default`.
pub fn int(node: &NodeProto, name: &str, default: i64) -> i64 {
    find(node, name).map_or(default, |a| a.i)
}

/// Float attribute, or `default`.
pub fn float(node: &NodeProto, name: &str, default: f32) -> f32 {
    find(node, name).map_or(default, |a| a.f)
}

/// Integer-list attribute, if present.
pub fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    find(node, name).map(|a| a.ints.clone())
}

/// String attribute, or `default`.
pub fn string(node: &NodeProto, name: &str, default: &str) -> String {
    find(node, name)
        .map(|a| String::from_utf8_lossy(&a.s).into_owned())
        .unwrap_or_else(|| default.to_string())
}

/// Tensor attribute, if present.
pub fn tensor<'a>(node: &'a NodeProto, name: &str) -> Option<&'a TensorProto> {
    find(node, name).and_then(|a| a.t.as_ref())
}

/// Whether the attribute is present.
pub fn has(node: &NodeProto, name: &str) -> bool {
    find(node, name).is_some()
}
