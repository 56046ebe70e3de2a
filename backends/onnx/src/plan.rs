//! An ONNX graph planned once per model instance: initializers converted to tensors on the
//! instance's device once, constant sub-graphs folded, the execution order fixed and each
//! intermediate freed right after its last consumer. Per request only the ops run.
use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, ValueInfoProto};
use kiln_sdk::DataType;

use crate::convert::from_onnx;
use crate::ops;

/// A graph input or output as declared in the model.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    /// Tensor name.
    pub name: String,
    /// Element type, when the model declares a supported one.
    pub dtype: Option<DataType>,
    /// Dimensions; -1 for a symbolic or unknown one.
    pub dims: Vec<i64>,
}

fn value_info(v: &ValueInfoProto) -> ValueInfo {
    use candle_onnx::onnx::{tensor_shape_proto::dimension::Value, type_proto::Value as T};
    let (dtype, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(T::TensorType(t)) => (
            from_onnx(t.elem_type),
            t.shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(Value::DimValue(n)) if n > 0 => n,
                            _ => -1,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => (None, Vec::new()),
    };
    ValueInfo {
        name: v.name.clone(),
        dtype,
        dims,
    }
}

struct Step {
    node: NodeProto,
    /// Values no later step or output needs: dropped after this step.
    free: Vec<String>,
}

/// The executable form of a model.
pub struct Plan {
    device: Device,
    opset: i64,
    constants: HashMap<String, Tensor>,
    steps: Vec<Step>,
    /// Inputs the caller provides (graph inputs that are not initializers).
    pub inputs: Vec<ValueInfo>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfo>,
}

/// An operator's error for the client: node, operator and message (no backtrace).
fn node_error(node: &NodeProto, e: candle_core::Error) -> String {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("").trim();
    format!("node '{}' ({}): {first}", node.name, node.op_type)
}

/// Operators of `graph` this executor lacks, each with a node using it.
pub fn unsupported_ops(graph: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    graph
        .node
        .iter()
        .filter(|n| {
            (!n.domain.is_empty() && n.domain != "ai.onnx")
                || !ops::SUPPORTED.contains(&n.op_type.as_str())
        })
        .filter(|n| seen.insert(n.op_type.clone()))
        .map(|n| {
            let domain = if n.domain.is_empty() {
                String::new()
            } else {
                format!("{}.", n.domain)
            };
            format!("{domain}{} (node '{}')", n.op_type, n.name)
        })
        .collect()
}

impl Plan {
    /// Plans `model` for `device`. Fails with the operators' names if any is unsupported.
    pub fn new(model: &ModelProto, device: &Device) -> Result<Plan, String> {
        let graph = model.graph.as_ref().ok_or("the model has no graph")?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(1, |o| o.version);
        let ctx = ops::Ctx { dev: device, opset };
        let missing = unsupported_ops(graph);
        if !missing.is_empty() {
            return Err(format!(
                "unsupported ONNX operators: {}",
                missing.join(", ")
            ));
        }
        let mut constants = HashMap::new();
        for t in &graph.initializer {
            let v = crate::convert::tensor_from_proto(t)
                .and_then(|v| v.to_device(device))
                .map_err(|e| format!("initializer '{}': {e}", t.name))?;
            constants.insert(t.name.clone(), v);
        }
        let inputs: Vec<ValueInfo> = graph
            .input
            .iter()
            .filter(|i| !constants.contains_key(&i.name))
            .map(value_info)
            .collect();
        let outputs: Vec<ValueInfo> = graph.output.iter().map(value_info).collect();

        // Fold nodes whose inputs are all known now; keep the rest in graph order.
        let mut defined: HashSet<String> = inputs.iter().map(|i| i.name.clone()).collect();
        let mut nodes = Vec::new();
        for node in &graph.node {
            for i in node.input.iter().filter(|i| !i.is_empty()) {
                if !defined.contains(i) && !constants.contains_key(i) {
                    return Err(format!(
                        "input '{i}' of node '{}' ({}) is not produced before it: the graph is not topologically sorted",
                        node.name, node.op_type
                    ));
                }
            }
            let foldable =
                node.op_type != "Shape" || node.input.iter().all(|i| constants.contains_key(i));
            let all_const = node
                .input
                .iter()
                .all(|i| i.is_empty() || constants.contains_key(i));
            if foldable && all_const {
                let ins: Vec<Option<Tensor>> = node
                    .input
                    .iter()
                    .map(|i| constants.get(i).cloned())
                    .collect();
                let outs = ops::run(node, &ins, &ctx).map_err(|e| node_error(node, e))?;
                for (name, t) in node.output.iter().zip(outs) {
                    constants.insert(name.clone(), t);
                }
            } else {
                defined.extend(node.output.iter().cloned());
                nodes.push(node.clone());
            }
        }
        for o in &outputs {
            if !defined.contains(&o.name) && !constants.contains_key(&o.name) {
                return Err(format!("graph output '{}' is never produced", o.name));
            }
        }
        // Free each value after its last consumer (outputs are kept).
        let keep: HashSet<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (k, n) in nodes.iter().enumerate() {
            for i in &n.input {
                last_use.insert(i.as_str(), k);
            }
        }
        let mut free: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
        for (name, &k) in &last_use {
            if !name.is_empty() && !keep.contains(name) && !constants.contains_key(*name) {
                free[k].push(name.to_string());
            }
        }
        let steps = nodes
            .into_iter()
            .zip(free)
            .map(|(node, free)| Step { node, free })
            .collect();
        Ok(Plan {
            device: device.clone(),
            opset,
            constants,
            steps,
            inputs,
            outputs,
        })
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the graph on `inputs` (by name); returns every graph output.
    pub fn run(&self, inputs: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
        let mut values = inputs;
        for step in &self.steps {
            let ins: Vec<Option<Tensor>> = step
                .node
                .input
                .iter()
                .map(|i| {
                    if i.is_empty() {
                        None
                    } else {
                        values.get(i).or_else(|| self.constants.get(i)).cloned()
                    }
                })
                .collect();
            let ctx = ops::Ctx {
                dev: &self.device,
                opset: self.opset,
            };
            let outs = ops::run(&step.node, &ins, &ctx).map_err(|e| node_error(&step.node, e))?;
            for (name, t) in step.node.output.iter().zip(outs) {
                values.insert(name.clone(), t);
            }
            for f in &step.free {
                values.remove(f);
            }
        }
        self.outputs
            .iter()
            .map(|o| {
                values
                    .remove(&o.name)
                    .or_else(|| self.constants.get(&o.name).cloned())
                    .map(|t| (o.name.clone(), t))
                    .ok_or_else(|| format!("graph output '{}' was not produced", o.name))
            })
            .collect()
    }
}
