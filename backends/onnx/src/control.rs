//! ONNX `If`: both branches are planned once, as graphs whose inputs are the outer values
//! they read; at run time the condition picks one. The outer values a branch reads become
//! explicit inputs of the `If` node, so the planner orders and frees them like any other.
use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, ValueInfoProto};

use crate::plan::Plan;

/// Subgraphs held in a node's attributes.
pub fn subgraphs(node: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    node.attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

/// Names a graph reads that it does not define (its outer-scope values), in first-use order.
pub fn free_values(g: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = g
        .input
        .iter()
        .map(|i| i.name.as_str())
        .chain(g.initializer.iter().map(|t| t.name.as_str()))
        .collect();
    let mut free: Vec<String> = Vec::new();
    let need = |name: &str, defined: &HashSet<&str>, free: &mut Vec<String>| {
        if !name.is_empty() && !defined.contains(name) && !free.iter().any(|f| f == name) {
            free.push(name.to_string());
        }
    };
    for n in &g.node {
        for i in &n.input {
            need(i, &defined, &mut free);
        }
        for sub in subgraphs(n) {
            for i in free_values(sub) {
                need(&i, &defined, &mut free);
            }
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
    for o in &g.output {
        need(&o.name, &defined, &mut free);
    }
    free
}

/// An `If` node with the outer values its branches read appended to its inputs.
pub fn with_free_inputs(node: &NodeProto) -> NodeProto {
    let mut n = node.clone();
    for sub in subgraphs(node) {
        for f in free_values(sub) {
            if !n.input[1..].contains(&f) {
                n.input.push(f);
            }
        }
    }
    n
}

/// The planned branches of one `If` node.
pub struct Branches {
    then_plan: Plan,
    else_plan: Plan,
    /// The outer values, in the order of the node's inputs 1...
    free: Vec<String>,
}

fn branch(node: &NodeProto, name: &str) -> Result<GraphProto, String> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .and_then(|a| a.g.clone())
        .ok_or_else(|| format!("If node '{}' has no {name}", node.name))
}

/// Plans both branches of `node` (as returned by [`with_free_inputs`]).
pub fn plan_if(node: &NodeProto, model: &ModelProto, device: &Device) -> Result<Branches, String> {
    let free: Vec<String> = node.input[1..].to_vec();
    let plan = |name: &str| -> Result<Plan, String> {
        let mut g = branch(node, name)?;
        g.input = free
            .iter()
            .map(|f| ValueInfoProto {
                name: f.clone(),
                ..Default::default()
            })
            .collect();
        let sub = ModelProto {
            opset_import: model.opset_import.clone(),
            ir_version: model.ir_version,
            graph: Some(g),
            ..Default::default()
        };
        Plan::new(&sub, device).map_err(|e| format!("If node '{}', {name}: {e}", node.name))
    };
    Ok(Branches {
        then_plan: plan("then_branch")?,
        else_plan: plan("else_branch")?,
        free,
    })
}

/// Runs the branch `cond` selects on the node's inputs (condition, then outer values).
pub fn run_if(b: &Branches, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>, String> {
    let cond = ins
        .first()
        .and_then(|t| t.as_ref())
        .ok_or("If: the condition is missing")?;
    let truth = cond
        .to_dtype(candle_core::DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(|e| format!("If: condition: {e}"))?;
    let plan = if truth.first().is_some_and(|&v| v != 0.0) {
        &b.then_plan
    } else {
        &b.else_plan
    };
    let values: HashMap<String, Tensor> = b
        .free
        .iter()
        .zip(&ins[1..])
        .filter_map(|(name, t)| t.clone().map(|t| (name.clone(), t)))
        .collect();
    let mut out = plan.run(values)?;
    plan.outputs
        .iter()
        .map(|o| {
            out.remove(&o.name)
                .ok_or_else(|| format!("If: branch output '{}' missing", o.name))
        })
        .collect()
}
