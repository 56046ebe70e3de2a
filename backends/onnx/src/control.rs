//! ONNX control flow. `If`: both branches are planned once, as graphs whose inputs are the
//! outer values they read; at run time the condition picks one. `Loop`: the body is planned
//! once and run per iteration with the iteration number, the condition and the
//! loop-carried values. The outer values a subgraph reads become explicit inputs of the
//! node, so the planner orders and frees them like any other.
use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, ValueInfoProto};

use crate::plan::{Plan, Value};

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

/// An `If` or `Loop` node with the outer values its subgraphs read appended to its inputs.
pub fn with_free_inputs(node: &NodeProto) -> NodeProto {
    let mut n = node.clone();
    let own = n.input.len();
    for sub in subgraphs(node) {
        for f in free_values(sub) {
            if !n.input[own..].contains(&f) {
                n.input.push(f);
            }
        }
    }
    n
}

/// A planned `If` or `Loop`.
pub enum Control {
    /// Both branches of an `If`.
    If(Branches),
    /// The body of a `Loop`.
    Loop(LoopBody),
    /// The body of a `SequenceMap`.
    Map(MapBody),
    /// The body of a `Scan`.
    Scan(ScanBody),
}

/// Plans the subgraphs of an `If` or `Loop` node.
pub fn plan(node: &NodeProto, model: &ModelProto, device: &Device) -> Result<Control, String> {
    if node.op_type == "Loop" {
        plan_loop(node, model, device).map(Control::Loop)
    } else if node.op_type == "SequenceMap" {
        plan_map(node, model, device).map(Control::Map)
    } else if node.op_type == "Scan" {
        plan_scan(node, model, device).map(Control::Scan)
    } else {
        plan_if(node, model, device).map(Control::If)
    }
}

/// Runs a planned `If` or `Loop` on the node's inputs.
pub fn run(c: &Control, ins: &[Option<Value>], dev: &Device) -> Result<Vec<Value>, String> {
    match c {
        Control::If(b) => run_if(b, ins),
        Control::Loop(b) => run_loop(b, ins, dev),
        Control::Map(b) => run_map(b, ins),
        Control::Scan(b) => run_scan(b, ins),
    }
}

/// Whether `op` is a control-flow operator this module runs.
pub fn is_control(op: &str) -> bool {
    op == "If" || op == "Loop" || op == "SequenceMap" || op == "Scan"
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

/// A subgraph's strings would index a table of its own: not supported.
fn no_strings(sub: &Plan, node: &NodeProto) -> Result<(), String> {
    if sub.has_strings() {
        return Err(format!(
            "{} node '{}': STRING values inside If/Loop subgraphs are not supported",
            node.op_type, node.name
        ));
    }
    Ok(())
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
        let plan =
            Plan::new(&sub, device).map_err(|e| format!("If node '{}', {name}: {e}", node.name))?;
        no_strings(&plan, node)?;
        Ok(plan)
    };
    Ok(Branches {
        then_plan: plan("then_branch")?,
        else_plan: plan("else_branch")?,
        free,
    })
}

/// Runs the branch `cond` selects on the node's inputs (condition, then outer values).
pub fn run_if(b: &Branches, ins: &[Option<Value>]) -> Result<Vec<Value>, String> {
    let cond =
        tensor_of(ins.first(), "If: the condition")?.ok_or("If: the condition is missing")?;
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
    let values: HashMap<String, Value> = b
        .free
        .iter()
        .zip(&ins[1..])
        .filter_map(|(name, t)| t.clone().map(|t| (name.clone(), t)))
        .collect();
    let mut out = plan.run_values(values, &plan.string_table(), None, false)?;
    plan.outputs
        .iter()
        .map(|o| {
            out.remove(&o.name)
                .ok_or_else(|| format!("If: branch output '{}' missing", o.name))
        })
        .collect()
}

/// A planned `Loop` body.
pub struct LoopBody {
    body: Plan,
    /// Body input names: iteration number, condition, loop-carried values.
    inputs: Vec<String>,
    /// Outer values the body reads (the node's inputs after the loop-carried ones).
    free: Vec<String>,
}

/// A node's `body` subgraph, planned with the outer values it reads (the node's inputs
/// after its own: the body's inputs plus `extra` leading ones) as further inputs. Returns
/// the plan, the body's input names and those outer names.
fn plan_body(
    node: &NodeProto,
    model: &ModelProto,
    device: &Device,
    extra: usize,
) -> Result<(Plan, Vec<String>, Vec<String>), String> {
    let mut g = node
        .attribute
        .iter()
        .find(|a| a.name == "body")
        .and_then(|a| a.g.clone())
        .ok_or_else(|| format!("{} node '{}' has no body", node.op_type, node.name))?;
    let inputs: Vec<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let free: Vec<String> = node
        .input
        .iter()
        .skip(inputs.len() + extra)
        .cloned()
        .collect();
    g.input.extend(free.iter().map(|f| ValueInfoProto {
        name: f.clone(),
        ..Default::default()
    }));
    let sub = ModelProto {
        opset_import: model.opset_import.clone(),
        ir_version: model.ir_version,
        graph: Some(g),
        ..Default::default()
    };
    let body = Plan::new(&sub, device)
        .map_err(|e| format!("{} node '{}', body: {e}", node.op_type, node.name))?;
    no_strings(&body, node)?;
    Ok((body, inputs, free))
}

/// Plans the body of a `Loop` node (as returned by [`with_free_inputs`]).
pub fn plan_loop(
    node: &NodeProto,
    model: &ModelProto,
    device: &Device,
) -> Result<LoopBody, String> {
    let (body, inputs, free) = plan_body(node, model, device, 0)?;
    if inputs.len() < 2 {
        return Err(format!(
            "Loop node '{}': the body needs (iteration, condition, ...) inputs",
            node.name
        ));
    }
    Ok(LoopBody { body, inputs, free })
}

/// The tensor an input holds (`None` when absent or an empty optional).
fn tensor_of(v: Option<&Option<Value>>, what: &str) -> Result<Option<Tensor>, String> {
    match v.and_then(Option::as_ref) {
        Some(v) => v.tensor(what).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

fn scalar(t: &Tensor) -> Result<f64, String> {
    t.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(|e| e.to_string())?
        .first()
        .copied()
        .ok_or_else(|| "an empty scalar".to_string())
}

/// Runs a `Loop`: inputs (max trip count?, condition?, carried..., outer values...);
/// outputs the final carried values, then each scan output stacked over the iterations.
pub fn run_loop(b: &LoopBody, ins: &[Option<Value>], dev: &Device) -> Result<Vec<Value>, String> {
    let carried_n = b.inputs.len() - 2;
    let max = tensor_of(ins.first(), "Loop: the trip count")?
        .map(|t| scalar(&t))
        .transpose()?;
    let mut cond = tensor_of(ins.get(1), "Loop: the condition")?
        .map(|t| scalar(&t))
        .transpose()?;
    let mut carried: Vec<Value> = (0..carried_n)
        .map(|k| {
            ins.get(2 + k)
                .cloned()
                .flatten()
                .ok_or_else(|| format!("Loop: loop-carried input {k} missing"))
        })
        .collect::<Result<_, _>>()?;
    let outer: Vec<(String, Value)> = b
        .free
        .iter()
        .zip(ins.iter().skip(2 + carried_n))
        .filter_map(|(n, t)| t.clone().map(|t| (n.clone(), t)))
        .collect();
    let scan_n = b.body.outputs.len().saturating_sub(1 + carried_n);
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); scan_n];
    let mut i: i64 = 0;
    let table = b.body.string_table();
    while max.is_none_or(|m| (i as f64) < m) && cond.is_none_or(|c| c != 0.0) {
        let mut values: HashMap<String, Value> = outer.iter().cloned().collect();
        let it = Tensor::new(i, dev).map_err(|e| e.to_string())?;
        let c =
            Tensor::new(cond.map_or(1u8, |c| (c != 0.0) as u8), dev).map_err(|e| e.to_string())?;
        values.insert(b.inputs[0].clone(), Value::Tensor(it));
        values.insert(b.inputs[1].clone(), Value::Tensor(c));
        for (name, t) in b.inputs[2..].iter().zip(&carried) {
            values.insert(name.clone(), t.clone());
        }
        let mut out = b.body.run_values(values, &table, None, false)?;
        let mut take = |k: usize| {
            let name = &b.body.outputs[k].name;
            out.remove(name)
                .ok_or_else(|| format!("Loop: body output '{name}' missing"))
        };
        let tensor = |v: Value, what: &str| match v.tensor(what) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(format!("{what} is empty")),
            Err(e) => Err(e.to_string()),
        };
        cond = Some(scalar(&tensor(take(0)?, "Loop: the body's condition")?)?);
        carried = (0..carried_n)
            .map(|k| take(1 + k))
            .collect::<Result<_, _>>()?;
        for (k, s) in scans.iter_mut().enumerate() {
            s.push(tensor(take(1 + carried_n + k)?, "Loop: a scan output")?);
        }
        i += 1;
        if i > 100_000_000 {
            return Err("Loop: more than 10^8 iterations".into());
        }
    }
    let mut outs = carried;
    for s in scans {
        outs.push(Value::Tensor(if s.is_empty() {
            Tensor::zeros(0, candle_core::DType::F32, dev).map_err(|e| e.to_string())?
        } else {
            Tensor::stack(&s, 0).map_err(|e| format!("Loop: scan output: {e}"))?
        }));
    }
    Ok(outs)
}

/// A planned `SequenceMap` body.
pub struct MapBody {
    body: Plan,
    /// Body input names, one per node input (sequence or tensor).
    inputs: Vec<String>,
    /// Outer values the body reads (the node's inputs after its own).
    free: Vec<String>,
}

/// Plans the body of a `SequenceMap` node (as returned by [`with_free_inputs`]).
pub fn plan_map(node: &NodeProto, model: &ModelProto, device: &Device) -> Result<MapBody, String> {
    let (body, inputs, free) = plan_body(node, model, device, 0)?;
    Ok(MapBody { body, inputs, free })
}

/// Runs a `SequenceMap`: the body once per item of the input sequences (all as long as the
/// first), with each further tensor input whole; each body output gathered into a sequence.
pub fn run_map(b: &MapBody, ins: &[Option<Value>]) -> Result<Vec<Value>, String> {
    let own = &ins[..b.inputs.len().min(ins.len())];
    let len = match own.first() {
        Some(Some(Value::Sequence(s))) => s.len(),
        _ => return Err("SequenceMap: the first input must be a sequence".into()),
    };
    let outer: Vec<(String, Value)> = b
        .free
        .iter()
        .zip(ins.iter().skip(b.inputs.len()))
        .filter_map(|(n, v)| v.clone().map(|v| (n.clone(), v)))
        .collect();
    let table = b.body.string_table();
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); b.body.outputs.len()];
    for i in 0..len {
        let mut values: HashMap<String, Value> = outer.iter().cloned().collect();
        for (name, v) in b.inputs.iter().zip(own) {
            let item = match v {
                Some(Value::Sequence(s)) => Value::Tensor(s.get(i).cloned().ok_or_else(|| {
                    format!("SequenceMap: input '{name}' has fewer than {len} items")
                })?),
                Some(v) => v.clone(),
                None => continue,
            };
            values.insert(name.clone(), item);
        }
        let mut out = b.body.run_values(values, &table, None, false)?;
        for (o, acc) in b.body.outputs.iter().zip(outs.iter_mut()) {
            let v = out
                .remove(&o.name)
                .ok_or_else(|| format!("SequenceMap: body output '{}' missing", o.name))?;
            match v.tensor("a SequenceMap body output") {
                Ok(Some(t)) => acc.push(t),
                _ => {
                    return Err(format!(
                        "SequenceMap: body output '{}' is not a tensor",
                        o.name
                    ))
                }
            }
        }
    }
    Ok(outs.into_iter().map(Value::Sequence).collect())
}

/// A planned `Scan` body.
pub struct ScanBody {
    body: Plan,
    /// Body input names: the state values, then one per scan input.
    inputs: Vec<String>,
    /// Number of scan inputs.
    scans: usize,
    /// Per scan input: its axis and whether it is read backwards.
    in_axes: Vec<(i64, bool)>,
    /// Per scan output: its axis and whether it is written backwards.
    out_axes: Vec<(i64, bool)>,
    /// Opset 8's form: a leading `sequence_lens` input and a batch axis on everything.
    batched: bool,
    /// Outer values the body reads (the node's inputs after its own).
    free: Vec<String>,
}

/// Plans the body of a `Scan` node (as returned by [`with_free_inputs`]).
pub fn plan_scan(
    node: &NodeProto,
    model: &ModelProto,
    device: &Device,
) -> Result<ScanBody, String> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(9, |o| o.version);
    let batched = opset < 9;
    let (body, inputs, free) = plan_body(node, model, device, batched as usize)?;
    let scans = crate::attrs::int(node, "num_scan_inputs", 0).max(0) as usize;
    if scans == 0 || scans > inputs.len() {
        return Err(format!(
            "Scan node '{}': num_scan_inputs does not fit its body",
            node.name
        ));
    }
    let outs = body.outputs.len().saturating_sub(inputs.len() - scans);
    let ints = |name: &str| crate::attrs::ints(node, name).unwrap_or_default();
    let pairs = |axes: Vec<i64>, dirs: Vec<i64>, n: usize| -> Vec<(i64, bool)> {
        (0..n)
            .map(|k| {
                (
                    axes.get(k).copied().unwrap_or(0),
                    dirs.get(k).is_some_and(|&d| d == 1),
                )
            })
            .collect()
    };
    let in_dirs = if batched {
        ints("directions")
    } else {
        ints("scan_input_directions")
    };
    let in_axes = pairs(ints("scan_input_axes"), in_dirs, scans);
    let out_axes = pairs(
        ints("scan_output_axes"),
        ints("scan_output_directions"),
        outs,
    );
    Ok(ScanBody {
        body,
        inputs,
        scans,
        in_axes,
        out_axes,
        batched,
        free,
    })
}

/// `axis` of a tensor of `rank` (negative from the end), or Scan's error.
fn axis_of(axis: i64, rank: usize) -> Result<usize, String> {
    crate::ops::axis(axis, rank).map_err(|e| format!("Scan: {e}"))
}

/// One scan over `states` and `scans` (no batch axis): the final states, then each scan
/// output joined along its axis.
fn scan_once(
    b: &ScanBody,
    states: Vec<Tensor>,
    scans: &[Tensor],
    outer: &[(String, Value)],
) -> Result<Vec<Tensor>, String> {
    let e = |e: candle_core::Error| format!("Scan: {e}");
    let n_states = b.inputs.len() - b.scans;
    let mut len = None;
    for (x, &(a, _)) in scans.iter().zip(&b.in_axes) {
        let l = x.dims()[axis_of(a, x.rank())?];
        if len.is_some_and(|n| n != l) {
            return Err("Scan: scan inputs differ in length".into());
        }
        len = Some(l);
    }
    let len = len.unwrap_or(0);
    let table = b.body.string_table();
    let mut states = states;
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); b.out_axes.len()];
    for t in 0..len {
        let mut values: HashMap<String, Value> = outer.iter().cloned().collect();
        for (name, s) in b.inputs.iter().zip(&states) {
            values.insert(name.clone(), Value::Tensor(s.clone()));
        }
        for ((name, x), &(a, rev)) in b.inputs[n_states..].iter().zip(scans).zip(&b.in_axes) {
            let a = axis_of(a, x.rank())?;
            let at = if rev { len - 1 - t } else { t };
            values.insert(
                name.clone(),
                Value::Tensor(x.narrow(a, at, 1).and_then(|s| s.squeeze(a)).map_err(e)?),
            );
        }
        let mut out = b.body.run_values(values, &table, None, false)?;
        let mut take = |k: usize| -> Result<Tensor, String> {
            let name = &b.body.outputs[k].name;
            match out.remove(name).map(|v| v.tensor(name)) {
                Some(Ok(Some(t))) => Ok(t),
                _ => Err(format!(
                    "Scan: body output '{name}' is missing or not a tensor"
                )),
            }
        };
        states = (0..n_states).map(&mut take).collect::<Result<_, _>>()?;
        for (k, acc) in outs.iter_mut().enumerate() {
            acc.push(take(n_states + k)?);
        }
    }
    let mut result = states;
    for (mut acc, &(a, rev)) in outs.into_iter().zip(&b.out_axes) {
        if rev {
            acc.reverse();
        }
        let Some(first) = acc.first() else {
            return Err("Scan: no iterations, so a scan output has no shape".into());
        };
        let a = axis_of(a, first.rank() + 1)?;
        result.push(Tensor::stack(&acc, a).map_err(e)?);
    }
    Ok(result)
}

/// Runs a `Scan`: opset 9's form (states, then scan inputs), or opset 8's (an optional
/// `sequence_lens`, then everything with a leading batch axis, scanned per batch item).
pub fn run_scan(b: &ScanBody, ins: &[Option<Value>]) -> Result<Vec<Value>, String> {
    let own = b.inputs.len() + b.batched as usize;
    let tensors: Vec<Tensor> = ins[b.batched as usize..own.min(ins.len())]
        .iter()
        .map(|v| match v.as_ref().map(|v| v.tensor("a Scan input")) {
            Some(Ok(Some(t))) => Ok(t),
            _ => Err("Scan: an input is missing or not a tensor".to_string()),
        })
        .collect::<Result<_, _>>()?;
    let outer: Vec<(String, Value)> = b
        .free
        .iter()
        .zip(ins.iter().skip(own))
        .filter_map(|(n, v)| v.clone().map(|v| (n.clone(), v)))
        .collect();
    let n_states = b.inputs.len() - b.scans;
    let (states, scans) = tensors.split_at(n_states);
    if !b.batched {
        let outs = scan_once(b, states.to_vec(), scans, &outer)?;
        return Ok(outs.into_iter().map(Value::Tensor).collect());
    }
    let lens = match ins.first() {
        Some(Some(v)) => v.tensor("sequence_lens").ok().flatten().and_then(|t| {
            t.flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::I64))
                .and_then(|t| t.to_vec1::<i64>())
                .ok()
        }),
        _ => None,
    };
    let batch = tensors
        .first()
        .map_or(0, |t| t.dims().first().copied().unwrap_or(0));
    let e = |e: candle_core::Error| format!("Scan: {e}");
    let mut per_item: Vec<Vec<Tensor>> = Vec::new();
    for i in 0..batch {
        let pick = |t: &Tensor| t.get(i).map_err(e);
        let st: Vec<Tensor> = states.iter().map(pick).collect::<Result<_, _>>()?;
        let mut sc: Vec<Tensor> = scans.iter().map(pick).collect::<Result<_, _>>()?;
        if let Some(l) = lens.as_ref().and_then(|l| l.get(i)) {
            for (x, &(a, _)) in sc.iter_mut().zip(&b.in_axes) {
                let a = axis_of(a, x.rank())?;
                *x = x
                    .narrow(a, 0, (*l).clamp(0, x.dims()[a] as i64) as usize)
                    .map_err(e)?;
            }
        }
        per_item.push(scan_once(b, st, &sc, &outer)?);
    }
    let n_out = b.body.outputs.len();
    (0..n_out)
        .map(|k| {
            let items: Vec<Tensor> = per_item.iter().map(|o| o[k].clone()).collect();
            Tensor::stack(&items, 0).map(Value::Tensor).map_err(e)
        })
        .collect()
}
