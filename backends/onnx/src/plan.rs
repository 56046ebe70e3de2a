//! An ONNX graph planned once per model instance: initializers converted to tensors on the
//! instance's device once, constant sub-graphs folded, the execution order fixed and each
//! intermediate freed right after its last consumer. Per request only the ops run.
use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, ValueInfoProto};
use kiln_sdk::DataType;

use crate::convert::from_onnx;
use crate::ops;
pub use crate::seq::Value;
use crate::strings::{self, StringTable};

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
    /// The planned subgraphs of an `If` or `Loop` node.
    branches: Option<Box<crate::control::Control>>,
    /// Whether the node has had to fall back to the CPU (off the CPU only: `fallback`).
    on_cpu: crate::fallback::OnCpu,
}

/// The executable form of a model.
pub struct Plan {
    device: Device,
    opset: i64,
    constants: HashMap<String, Tensor>,
    /// The constant strings STRING constants index (see [`strings`]).
    strings: std::sync::Arc<strings::Interned>,
    /// Whether any value of the graph is a STRING.
    has_strings: bool,
    steps: Vec<Step>,
    /// Inputs the caller provides (graph inputs that are not initializers).
    pub inputs: Vec<ValueInfo>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfo>,
}

/// The inputs (initializers excluded) and outputs a model declares.
pub fn graph_io(model: &ModelProto) -> (Vec<ValueInfo>, Vec<ValueInfo>) {
    let Some(g) = model.graph.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    (
        g.input
            .iter()
            .filter(|i| !inits.contains(i.name.as_str()))
            .map(value_info)
            .collect(),
        g.output.iter().map(value_info).collect(),
    )
}

/// Runs one node: the string operators with `table`, every other with `ops::run`.
fn run_node(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    ctx: &ops::Ctx<'_>,
    table: &StringTable,
) -> candle_core::Result<Vec<Tensor>> {
    if node.domain == crate::ml::DOMAIN {
        return crate::ml::run(node, ins, table);
    }
    if crate::text::handles(node) {
        return crate::text::run(node, ins, table);
    }
    if node.domain == crate::contrib::DOMAIN
        || node.op_type == crate::contrib::SIMPLIFIED_LAYER_NORM
    {
        return crate::contrib::run(node, ins);
    }
    match node.op_type.as_str() {
        strings::PARSE | strings::FORMAT => Ok(vec![strings::run(node, ins, table)?]),
        "Constant" if strings::constant_is_string(node) => {
            Ok(vec![strings::constant(node, table, ctx.dev)?])
        }
        _ => ops::run(node, ins, ctx),
    }
}

/// ONNX element type of each value the graph declares one for (inputs, outputs,
/// value_info, initializers, Constant values).
fn declared_types(graph: &GraphProto) -> HashMap<&str, i32> {
    use candle_onnx::onnx::type_proto::Value as T;
    let mut types: HashMap<&str, i32> = graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
        .filter_map(|v| match v.r#type.as_ref()?.value.as_ref()? {
            T::TensorType(t) => Some((v.name.as_str(), t.elem_type)),
            _ => None,
        })
        .collect();
    types.extend(
        graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t.data_type)),
    );
    for n in graph.node.iter().filter(|n| n.op_type == "Constant") {
        if let (Some(t), Some(o)) = (crate::attrs::tensor(n, "value"), n.output.first()) {
            types.insert(o.as_str(), t.data_type);
        }
    }
    types
}

/// Marks each QuantizeLinear with its zero point's ONNX type ([`ops::ZERO_POINT_TYPE`]):
/// INT8 and INT16 share one tensor type here, but saturate differently (as do the
/// 8-bit floats, held as F32). A CastLike to an 8-bit float or 4-bit integer becomes the
/// Cast to that declared type (its tensor type does not tell).
fn mark_declared_types(nodes: &mut [NodeProto], graph: &GraphProto) {
    let types = declared_types(graph);
    for n in nodes.iter_mut() {
        let typed = |i: usize| n.input.get(i).and_then(|v| types.get(v.as_str())).copied();
        match n.op_type.as_str() {
            "QuantizeLinear" => {
                if let Some(t) = typed(2) {
                    n.attribute
                        .push(crate::attrs::new_int(ops::ZERO_POINT_TYPE, t as i64));
                }
            }
            "CastLike" => {
                if let Some(t) = typed(1).filter(|&t| crate::lowbit::handles(t)) {
                    n.op_type = "Cast".into();
                    n.input.truncate(1);
                    n.attribute.push(crate::attrs::new_int("to", t as i64));
                }
            }
            _ => {}
        }
    }
}

/// An operator's error for the client: node, operator and message (no backtrace).
fn node_error(node: &NodeProto, e: candle_core::Error) -> String {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("").trim();
    format!("node '{}' ({}): {first}", node.name, node.op_type)
}

/// An inference BatchNormalization's constants as a per-channel affine, in F64:
/// s = γ / √(var + ε) and shift = β − mean · s, so that y = x · s + shift.
fn bn_scale_shift(
    bn: &NodeProto,
    constants: &HashMap<String, Tensor>,
) -> Result<(Tensor, Tensor), String> {
    let get = |i: usize| {
        constants
            .get(&bn.input[i])
            .ok_or_else(|| format!("constant '{}' missing", bn.input[i]))
            .and_then(|t| {
                t.to_dtype(candle_core::DType::F64)
                    .map_err(|e| e.to_string())
            })
    };
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let eps = crate::attrs::float(bn, "epsilon", 1e-5) as f64;
    let scale = (var + eps)
        .and_then(|v| v.sqrt())
        .and_then(|d| gamma.div(&d))
        .map_err(|e| e.to_string())?;
    let shift = mean
        .mul(&scale)
        .and_then(|m| beta - m)
        .map_err(|e| e.to_string())?;
    Ok((scale, shift))
}

/// Folds `BatchNormalization(Conv(x, W, b))` into one Conv with scaled weights when the
/// Conv's only consumer is the BatchNormalization and every parameter is a constant:
/// W' = W · s, b' = (b − mean) · s + β with s = γ / √(var + ε) per output channel.
fn fold_batch_norms(
    nodes: Vec<NodeProto>,
    constants: &mut HashMap<String, Tensor>,
    outputs: &[ValueInfo],
) -> Result<Vec<NodeProto>, String> {
    let mut consumers: HashMap<&str, usize> = HashMap::new();
    for n in &nodes {
        for i in &n.input {
            *consumers.entry(i.as_str()).or_default() += 1;
        }
    }
    let graph_outputs: HashSet<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
    let producer: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.output.iter().map(move |o| (o.clone(), k)))
        .collect();
    let mut fold: Vec<(usize, usize)> = Vec::new(); // (conv index, bn index)
    for (k, n) in nodes.iter().enumerate() {
        // (Training mode normalizes with the batch's statistics: nothing to fold.)
        if n.op_type != "BatchNormalization"
            || n.output.len() > 1
            || crate::attrs::int(n, "training_mode", 0) != 0
        {
            continue;
        }
        let Some(&c) = n.input.first().and_then(|x| producer.get(x)) else {
            continue;
        };
        let conv = &nodes[c];
        let x = n.input[0].as_str();
        let params_const = n.input[1..].iter().all(|i| constants.contains_key(i))
            && conv
                .input
                .iter()
                .skip(1)
                .all(|i| i.is_empty() || constants.contains_key(i));
        if conv.op_type == "Conv"
            && params_const
            && n.input.len() == 5
            && consumers.get(x) == Some(&1)
            && !graph_outputs.contains(x)
        {
            fold.push((c, k));
        }
    }
    let err = |e: candle_core::Error| format!("folding BatchNormalization: {e}");
    let folded: HashSet<usize> = fold.iter().map(|&(_, k)| k).collect();
    let mut nodes: Vec<Option<NodeProto>> = nodes.into_iter().map(Some).collect();
    // Every other inference BatchNormalization with constant parameters becomes one
    // per-channel affine x · s + (β − mean · s) with precomputed s = γ / √(var + ε).
    for (k, slot) in nodes.iter_mut().enumerate() {
        let Some(bn) = slot.as_ref() else { continue };
        if bn.op_type != "BatchNormalization"
            || folded.contains(&k)
            || bn.output.len() > 1
            || crate::attrs::int(bn, "training_mode", 0) != 0
            || bn.input.len() != 5
            || !bn.input[1..].iter().all(|i| constants.contains_key(i))
        {
            continue;
        }
        let dt = constants
            .get(&bn.input[1])
            .map_or(candle_core::DType::F32, |t| t.dtype());
        let (scale, shift) = bn_scale_shift(bn, constants)?;
        let scale = scale.to_dtype(dt).map_err(err)?;
        let shift = shift.to_dtype(dt).map_err(err)?;
        let (sn, hn) = (
            format!("{}::bn_scale", bn.output[0]),
            format!("{}::bn_shift", bn.output[0]),
        );
        constants.insert(sn.clone(), scale);
        constants.insert(hn.clone(), shift);
        let mut affine = bn.clone();
        affine.op_type = ops::CHANNEL_AFFINE.into();
        affine.input = vec![bn.input[0].clone(), sn, hn];
        *slot = Some(affine);
    }
    if fold.is_empty() {
        return Ok(nodes.into_iter().flatten().collect());
    }
    for (c, k) in fold {
        let (Some(conv), Some(bn)) = (nodes[c].clone(), nodes[k].clone()) else {
            continue;
        };
        let w = constants
            .get(&conv.input[1])
            .cloned()
            .ok_or_else(|| format!("constant '{}' missing", conv.input[1]))?;
        let (scale, shift) = bn_scale_shift(&bn, constants)?;
        let dt = w.dtype();
        let f64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
        let out_ch = w.dim(0).map_err(err)?;
        let mut wshape = vec![1usize; w.rank()];
        wshape[0] = out_ch;
        // W' = W · s per output channel; b' = b · s + shift.
        let w2 = f64(&w)
            .and_then(|w| w.broadcast_mul(&scale.reshape(wshape)?))
            .and_then(|w| w.to_dtype(dt))
            .map_err(err)?;
        let b2 = match conv.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => {
                let b = constants
                    .get(b)
                    .ok_or_else(|| format!("constant '{b}' missing"))?;
                f64(b).and_then(|b| b.mul(&scale)?.add(&shift))
            }
            None => Ok(shift),
        }
        .and_then(|b| b.to_dtype(dt))
        .map_err(err)?;
        let (wn, bn_name) = (
            format!("{}::folded_w", bn.output[0]),
            format!("{}::folded_b", bn.output[0]),
        );
        constants.insert(wn.clone(), w2);
        constants.insert(bn_name.clone(), b2);
        let mut merged = conv;
        merged.input = vec![merged.input[0].clone(), wn, bn_name];
        merged.output = bn.output.clone();
        nodes[c] = Some(merged);
        nodes[k] = None;
    }
    Ok(nodes.into_iter().flatten().collect())
}

/// Fewest input and output channels for which a 3×3 convolution gets a Winograd weight:
/// below, the transforms cost more than the products they save.
const WINOGRAD_MIN_CHANNELS: usize = 16;

/// Largest Winograd weight made for one convolution: F(4×4, 3×3)'s is 4× the 3×3 weight
/// it comes from, F(2×2, 3×3)'s 16/9×. Layers up to 341 channels each way get the first;
/// wider ones up to 512 (ImageNet models' 7×7 maps, where F(2×2) also fills the kernel at
/// batch 1) the second; wider still only their direct weight. This bounds what a model
/// gains: ResNet-50 +100 MB instead of +181 MB with F(4×4) everywhere.
const WINOGRAD_MAX_BYTES: usize = 16 << 20;

/// Turns a dense weight into its packed tensor (`None` when it cannot).
type PackFn = dyn FnOnce(&[f32]) -> Option<Tensor>;

/// Packs the constant f32 `[k, n]` weight of every `MatMul` into 16-column panels for the
/// CPU kernel (`sgemm::pack_panels`); the node is marked with its column count. Does the
/// same for every one-group 2-D `Conv` (`cpu_conv::pack_weight`), marked with the weight's
/// shape.
fn pack_weights(nodes: &mut [NodeProto], constants: &mut HashMap<String, Tensor>) {
    for node in nodes.iter_mut() {
        let Some(w) = node.input.get(1).and_then(|w| constants.get(w)) else {
            continue;
        };
        if w.dtype() != candle_core::DType::F32 {
            continue;
        }
        let (suffix, mark, pack): (_, _, Box<PackFn>) = match (node.op_type.as_str(), w.dims()) {
            ("Conv", &[oc, icg, kh, kw]) if crate::attrs::int(node, "group", 1) == 1 => {
                let dims = [oc, icg, kh, kw].iter().map(|&d| d as i64).collect();
                let mark = crate::attrs::new_ints(ops::PACKED_CONV, dims);
                // 3×3 stride-1 kernels between enough channels also get their Winograd
                // transform, after the panels (`cpu_conv::Weight::Packed`), unless they
                // have few enough output channels to sum their taps in registers.
                let ones = |name: &str| {
                    crate::attrs::ints(node, name).is_none_or(|v| v.iter().all(|&d| d == 1))
                };
                let winograd = ([kh, kw] == [3, 3]
                    && oc >= WINOGRAD_MIN_CHANNELS
                    && icg >= WINOGRAD_MIN_CHANNELS
                    && ones("strides")
                    && ones("dilations")
                    && !crate::cpu_conv::sums_taps(oc))
                .then(|| crate::winograd::pick(oc, icg, WINOGRAD_MAX_BYTES))
                .flatten();
                let pack = move |dense: &[f32]| {
                    let mut packed = crate::cpu_conv::pack_weight(dense, oc, icg, kh * kw);
                    if let Some(tile) = winograd {
                        let len = crate::winograd::weight_len(oc, icg, tile);
                        packed.reserve_exact(len);
                        crate::winograd::transform_weight_into(&mut packed, dense, oc, icg, tile);
                    }
                    let len = packed.len();
                    Tensor::from_vec(packed, len, &Device::Cpu).ok()
                };
                let suffix = if winograd.is_some() {
                    "conv_panels_winograd"
                } else {
                    "conv_panels"
                };
                (suffix, mark, Box::new(pack))
            }
            // (Not one that reads or writes permuted, fuse.rs: its operands stay as they are.)
            ("MatMul", &[k, n]) if !crate::fuse::permutes(node) => {
                let mark = crate::attrs::new_int(ops::PANELS_N, n as i64);
                let pack = move |dense: &[f32]| {
                    let packed = crate::sgemm::pack_panels(dense, k, n);
                    Tensor::from_vec(packed, (n.div_ceil(16), k, 16), &Device::Cpu).ok()
                };
                ("panels", mark, Box::new(pack))
            }
            _ => continue,
        };
        if w.elem_count() == 0 {
            continue;
        }
        // One packed copy per weight, however many nodes share it.
        let packed_name = format!("{}::{suffix}", node.input[1]);
        if !constants.contains_key(&packed_name) {
            let Some(t) = w
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .ok()
                .and_then(|dense| pack(&dense))
            else {
                continue;
            };
            constants.insert(packed_name.clone(), t);
        }
        node.input[1] = packed_name;
        node.attribute.push(mark);
    }
}

/// Operators of `graph` this executor lacks, each with a node using it.
pub fn unsupported_ops(graph: &GraphProto) -> Vec<String> {
    let mut seen = HashSet::new();
    // Nodes of the graph and of every subgraph (If branches), depth first.
    fn all<'g>(g: &'g GraphProto, out: &mut Vec<&'g NodeProto>) {
        for n in &g.node {
            out.push(n);
            for sub in crate::control::subgraphs(n) {
                all(sub, out);
            }
        }
    }
    let mut nodes = Vec::new();
    all(graph, &mut nodes);
    nodes
        .into_iter()
        .filter(|n| match n.domain.as_str() {
            "" | "ai.onnx" => {
                !ops::is_supported(&n.op_type)
                    && n.op_type != crate::contrib::SIMPLIFIED_LAYER_NORM
                    && !crate::text::handles(n)
                    && !crate::seq::handles(&n.op_type)
            }
            crate::ml::DOMAIN => !crate::ml::is_supported(&n.op_type),
            crate::contrib::DOMAIN => !crate::contrib::is_supported(&n.op_type),
            _ => true,
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
        let ctx = ops::Ctx {
            dev: device,
            opset,
            threads: rayon::current_num_threads(),
        };
        let missing = unsupported_ops(graph);
        if !missing.is_empty() {
            return Err(format!(
                "unsupported ONNX operators: {}",
                missing.join(", ")
            ));
        }
        let mut constants = HashMap::new();
        let table = StringTable::default();
        let mut string_seeds = HashSet::new();
        for t in &graph.initializer {
            let v = if t.data_type == strings::ONNX_STRING {
                string_seeds.insert(t.name.clone());
                table.from_proto(t, device)
            } else {
                crate::convert::tensor_from_proto(t).and_then(|v| v.to_device(device))
            }
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
        let graph_nodes: Vec<NodeProto> = graph
            .node
            .iter()
            .map(|n| {
                if crate::control::is_control(&n.op_type) {
                    crate::control::with_free_inputs(n)
                } else {
                    n.clone()
                }
            })
            .collect();
        let mut graph_nodes = crate::contrib::expand(graph_nodes)?;
        string_seeds.extend(
            inputs
                .iter()
                .filter(|i| i.dtype == Some(DataType::Bytes))
                .map(|i| i.name.clone()),
        );
        let has_strings = !strings::mark(&mut graph_nodes, string_seeds)?.is_empty();
        mark_declared_types(&mut graph_nodes, graph);
        for node in &graph_nodes {
            for i in node.input.iter().filter(|i| !i.is_empty()) {
                if !defined.contains(i) && !constants.contains_key(i) {
                    return Err(format!(
                        "input '{i}' of node '{}' ({}) is not produced before it: the graph is not topologically sorted",
                        node.name, node.op_type
                    ));
                }
            }
            let foldable = !crate::control::is_control(&node.op_type)
                && !crate::seq::handles(&node.op_type)
                && (node.op_type != "Shape"
                    || node.input.iter().all(|i| constants.contains_key(i)));
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
                let outs = crate::fallback::run(node, &ins, &ctx, None, |ins, ctx| {
                    run_node(node, ins, ctx, &table)
                })
                .map_err(|e| node_error(node, e))?;
                for (name, t) in node.output.iter().zip(outs) {
                    constants.insert(name.clone(), t);
                }
            } else {
                defined.extend(node.output.iter().cloned());
                nodes.push(node.clone());
            }
        }
        let nodes = fold_batch_norms(nodes, &mut constants, &outputs)?;
        let output_names: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let mut nodes = crate::fuse::fuse(nodes, &mut constants, &output_names);
        if device.is_cpu() && crate::sgemm::available() {
            pack_weights(&mut nodes, &mut constants);
        }
        crate::in_place::mark(&mut nodes, &output_names);
        crate::append::mark(&mut nodes, &output_names, |conv| {
            match crate::attrs::ints(conv, ops::PACKED_CONV) {
                Some(dims) => dims.first().map(|&oc| oc as usize),
                None => conv
                    .input
                    .get(1)
                    .and_then(|w| constants.get(w))
                    .and_then(|w| w.dims().first().copied()),
            }
        });
        // Constants no step reads any more (folded or packed originals) are dropped.
        let used: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .chain(output_names.iter().map(String::as_str))
            .collect();
        constants.retain(|name, _| used.contains(name.as_str()));
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
            .map(|(node, free)| {
                let branches = if crate::control::is_control(&node.op_type) {
                    Some(Box::new(crate::control::plan(&node, model, device)?))
                } else {
                    None
                };
                Ok(Step {
                    node,
                    free,
                    branches,
                    on_cpu: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Plan {
            device: device.clone(),
            opset,
            constants,
            strings: table.freeze(),
            has_strings,
            steps,
            inputs,
            outputs,
        })
    }

    /// The operator of each planned step, in execution order (after folding and fusion).
    pub fn step_ops(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.node.op_type.as_str()).collect()
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the graph has STRING values (a subgraph must not: see `control`).
    pub fn has_strings(&self) -> bool {
        self.has_strings
    }

    /// A table for one run's strings: STRING inputs are made with it
    /// ([`StringTable::deserialize`]), and STRING outputs read with it.
    pub fn string_table(&self) -> StringTable {
        StringTable::on(self.strings.clone())
    }

    /// Runs the graph on `inputs` (by name); returns every graph output.
    pub fn run(&self, inputs: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
        self.run_profiled(inputs, &self.string_table(), None, false)
    }

    /// [`Plan::run`] with the run's string table (made by [`Plan::string_table`]).
    pub fn run_with(
        &self,
        inputs: HashMap<String, Tensor>,
        table: &StringTable,
    ) -> Result<HashMap<String, Tensor>, String> {
        self.run_profiled(inputs, table, None, false)
    }

    /// [`Plan::run`], adding each operator type's wall time (ms) and count to `profile`;
    /// with `by_shape`, keyed by the operator and its first input's and output's shapes.
    pub fn run_profiled(
        &self,
        inputs: HashMap<String, Tensor>,
        table: &StringTable,
        profile: Option<&mut HashMap<String, (f64, usize)>>,
        by_shape: bool,
    ) -> Result<HashMap<String, Tensor>, String> {
        let inputs = inputs
            .into_iter()
            .map(|(k, t)| (k, Value::Tensor(t)))
            .collect();
        crate::spin::with_spinning(|| self.run_values(inputs, table, profile, by_shape))?
            .into_iter()
            .map(|(name, v)| match v.tensor("") {
                Ok(Some(t)) => Ok((name, t)),
                _ => Err(format!(
                    "graph output '{name}' is a sequence or an empty optional, which has no tensor type to return"
                )),
            })
            .collect()
    }

    /// Runs the graph on values of any kind (tensors, sequences, optionals); returns
    /// every graph output. See [`Plan::run_profiled`].
    pub fn run_values(
        &self,
        inputs: HashMap<String, Value>,
        table: &StringTable,
        mut profile: Option<&mut HashMap<String, (f64, usize)>>,
        by_shape: bool,
    ) -> Result<HashMap<String, Value>, String> {
        let mut values = inputs;
        for step in &self.steps {
            let started = std::time::Instant::now();
            let value = |i: &String| -> Option<Value> {
                if i.is_empty() {
                    None
                } else {
                    values
                        .get(i)
                        .cloned()
                        .or_else(|| self.constants.get(i).cloned().map(Value::Tensor))
                }
            };
            let ins: Vec<Option<Value>> = step.node.input.iter().map(value).collect();
            let ctx = ops::Ctx {
                dev: &self.device,
                opset: self.opset,
                threads: rayon::current_num_threads(),
            };
            let op = step.node.op_type.as_str();
            let passes_value = op == "Identity"
                && matches!(
                    ins.first(),
                    Some(Some(Value::Sequence(_) | Value::Optional(_)))
                );
            let outs: Vec<Value> = match &step.branches {
                Some(b) => crate::control::run(b, &ins, &self.device)?,
                None if passes_value || crate::seq::handles(op) => {
                    crate::seq::run(&step.node, &ins, &self.device)
                        .map_err(|e| node_error(&step.node, e))?
                }
                None => {
                    let tensors: Vec<Option<Tensor>> = ins
                        .iter()
                        .zip(&step.node.input)
                        .map(|(v, name)| match v {
                            Some(v) => v.tensor(&format!("input '{name}'")),
                            None => Ok(None),
                        })
                        .collect::<candle_core::Result<_>>()
                        .map_err(|e| node_error(&step.node, e))?;
                    let node = &step.node;
                    crate::fallback::run(node, &tensors, &ctx, Some(&step.on_cpu), |ins, ctx| {
                        run_node(node, ins, ctx, table)
                    })
                    .map_err(|e| node_error(node, e))?
                    .into_iter()
                    .map(Value::Tensor)
                    .collect()
                }
            };
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            if let Some(p) = profile.as_deref_mut() {
                let shape = |v: Option<&Value>| match v {
                    Some(Value::Tensor(t)) => Some(t.dims().to_vec()),
                    _ => None,
                };
                let key = match (
                    by_shape,
                    shape(ins.first().and_then(Option::as_ref)),
                    shape(outs.first()),
                ) {
                    (true, Some(i), Some(o)) => {
                        let w = shape(ins.get(1).and_then(Option::as_ref));
                        format!("{} {:?} w{:?} -> {:?}", op, i, w, o)
                    }
                    _ => op.to_string(),
                };
                let e = p.entry(key).or_default();
                e.0 += elapsed;
                e.1 += 1;
            }
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
                    .or_else(|| self.constants.get(&o.name).cloned().map(Value::Tensor))
                    .map(|t| (o.name.clone(), t))
                    .ok_or_else(|| format!("graph output '{}' was not produced", o.name))
            })
            .collect()
    }
}
