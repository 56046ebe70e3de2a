//! `ai.onnx.ml` `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (gradient-boosted
//! trees and random forests from XGBoost, LightGBM and scikit-learn converters), with
//! onnxruntime's aggregation, base-value, post-transform and binary-classifier rules.
use std::collections::{HashMap, HashSet};

use candle_core::{bail, DType, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs::{find as attr, string as text_attr};
use crate::ml::{post_transform, probit};
use crate::strings::StringTable;

fn ints(node: &NodeProto, name: &str) -> Vec<i64> {
    attr(node, name).map_or_else(Vec::new, |a| a.ints.clone())
}

/// A float list attribute, or its `<name>_as_tensor` form (opset 3); whether it was
/// double (thresholds are then compared in f64, otherwise in f32 as onnxruntime does).
fn reals(node: &NodeProto, name: &str) -> Result<(Vec<f64>, bool)> {
    if let Some(a) = attr(node, name) {
        return Ok((a.floats.iter().map(|&f| f as f64).collect(), false));
    }
    match attr(node, &format!("{name}_as_tensor")).and_then(|a| a.t.as_ref()) {
        Some(t) => {
            let v = crate::convert::tensor_from_proto(t)?;
            let double = v.dtype() == DType::F64;
            Ok((crate::ops::f64s(&v)?, double))
        }
        None => Ok((Vec::new(), false)),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

/// Adds one leaf weight `w` to a target's (score, scored) by `how`: SUM and AVERAGE add,
/// MIN and MAX keep the extreme.
fn accumulate(score: &mut (f64, bool), w: f64, how: &str) {
    score.0 = match how {
        "MIN" if score.1 => score.0.min(w),
        "MAX" if score.1 => score.0.max(w),
        "MIN" | "MAX" => w,
        _ => score.0 + w,
    };
    score.1 = true;
}

/// The trees of one node, flattened: children and leaf weights by node index.
struct Forest {
    feature: Vec<usize>,
    threshold: Vec<f64>,
    mode: Vec<Mode>,
    missing_true: Vec<bool>,
    children: Vec<(usize, usize)>,
    /// (target or class index, weight) per leaf.
    weights: Vec<Vec<(usize, f64)>>,
    roots: Vec<usize>,
    /// Thresholds are f32: inputs are rounded to f32 before comparing.
    single: bool,
}

impl Forest {
    fn new(node: &NodeProto, prefix: &str) -> Result<Forest> {
        let name = &node.name;
        let tree = ints(node, "nodes_treeids");
        let ids = ints(node, "nodes_nodeids");
        let n = tree.len();
        let (threshold, double) = reals(node, "nodes_values")?;
        let feature = ints(node, "nodes_featureids");
        let modes = attr(node, "nodes_modes").map_or_else(Vec::new, |a| a.strings.clone());
        let trues = ints(node, "nodes_truenodeids");
        let falses = ints(node, "nodes_falsenodeids");
        let mut missing = ints(node, "nodes_missing_value_tracks_true");
        missing.resize(n, 0);
        if [
            ids.len(),
            feature.len(),
            modes.len(),
            trues.len(),
            falses.len(),
        ]
        .iter()
        .any(|&l| l != n)
            || threshold.len() != n
        {
            bail!(
                "{} node '{name}': the nodes_* attributes differ in length",
                node.op_type
            )
        }
        let index: HashMap<(i64, i64), usize> = (0..n).map(|i| ((tree[i], ids[i]), i)).collect();
        let mut mode = Vec::with_capacity(n);
        let mut children = Vec::with_capacity(n);
        let mut is_child = HashSet::new();
        for i in 0..n {
            let m = match modes[i].as_slice() {
                b"BRANCH_LEQ" => Mode::Leq,
                b"BRANCH_LT" => Mode::Lt,
                b"BRANCH_GTE" => Mode::Gte,
                b"BRANCH_GT" => Mode::Gt,
                b"BRANCH_EQ" => Mode::Eq,
                b"BRANCH_NEQ" => Mode::Neq,
                b"LEAF" => Mode::Leaf,
                other => bail!(
                    "{} node '{name}': unknown node mode '{}'",
                    node.op_type,
                    String::from_utf8_lossy(other)
                ),
            };
            mode.push(m);
            if m == Mode::Leaf {
                children.push((i, i));
                continue;
            }
            let child = |id: i64| {
                index.get(&(tree[i], id)).copied().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{} node '{name}': tree {} has no node {id}",
                        node.op_type, tree[i]
                    ))
                })
            };
            let (t, f) = (child(trues[i])?, child(falses[i])?);
            is_child.insert(t);
            is_child.insert(f);
            children.push((t, f));
        }
        let roots: Vec<usize> = (0..n).filter(|i| !is_child.contains(i)).collect();
        let mut weights = vec![Vec::new(); n];
        let (w_tree, w_node) = (
            ints(node, &format!("{prefix}_treeids")),
            ints(node, &format!("{prefix}_nodeids")),
        );
        let w_id = ints(node, &format!("{prefix}_ids"));
        let (w, _) = reals(node, &format!("{prefix}_weights"))?;
        if [w_node.len(), w_id.len(), w.len()]
            .iter()
            .any(|&l| l != w_tree.len())
        {
            bail!(
                "{} node '{name}': the {prefix}_* attributes differ in length",
                node.op_type
            )
        }
        for k in 0..w_tree.len() {
            let Some(&leaf) = index.get(&(w_tree[k], w_node[k])) else {
                bail!(
                    "{} node '{name}': weight for missing node {} of tree {}",
                    node.op_type,
                    w_node[k],
                    w_tree[k]
                )
            };
            weights[leaf].push((w_id[k].max(0) as usize, w[k]));
        }
        let feature = feature.iter().map(|&f| f.max(0) as usize).collect();
        Ok(Forest {
            feature,
            threshold,
            mode,
            missing_true: missing.iter().map(|&m| m != 0).collect(),
            children,
            weights,
            roots,
            single: !double,
        })
    }

    /// The leaf `row` reaches in the tree starting at `root`.
    fn leaf(&self, root: usize, row: &[f64]) -> Result<usize> {
        let mut i = root;
        for _ in 0..=self.mode.len() {
            let m = self.mode[i];
            if m == Mode::Leaf {
                return Ok(i);
            }
            let Some(&v) = row.get(self.feature[i]) else {
                bail!(
                    "tree node reads feature {} of {}",
                    self.feature[i],
                    row.len()
                )
            };
            let v = if self.single { v as f32 as f64 } else { v };
            let t = self.threshold[i];
            let go_true = (self.missing_true[i] && v.is_nan())
                || match m {
                    Mode::Leq => v <= t,
                    Mode::Lt => v < t,
                    Mode::Gte => v >= t,
                    Mode::Gt => v > t,
                    Mode::Eq => v == t,
                    Mode::Neq => v != t,
                    Mode::Leaf => false,
                };
            i = if go_true {
                self.children[i].0
            } else {
                self.children[i].1
            };
        }
        bail!("a tree has a cycle")
    }

    /// Per target: the aggregated weight (SUM, AVERAGE, MIN or MAX over the trees) and
    /// whether any tree gave one.
    fn aggregate(&self, row: &[f64], targets: usize, how: &str) -> Result<Vec<(f64, bool)>> {
        let mut out = vec![(0f64, false); targets];
        for &root in &self.roots {
            let leaf = self.leaf(root, row)?;
            for &(t, w) in &self.weights[leaf] {
                let Some(o) = out.get_mut(t) else {
                    bail!("tree weight for target {t} of {targets}")
                };
                accumulate(o, w, how);
            }
        }
        if how == "AVERAGE" {
            let n = self.roots.len().max(1) as f64;
            out.iter_mut().for_each(|o| o.0 /= n);
        }
        Ok(out)
    }
}

/// The input as rows of f64 features (`[N, F]`, or `[F]` as one row).
fn rows(x: &Tensor) -> Result<Vec<Vec<f64>>> {
    let x = if x.rank() == 1 {
        x.unsqueeze(0)?
    } else {
        x.clone()
    };
    let (n, f) = x.dims2()?;
    let v = crate::ops::f64s(&x)?;
    Ok((0..n).map(|i| v[i * f..(i + 1) * f].to_vec()).collect())
}

/// TreeEnsembleRegressor: `[N, n_targets]` scores.
pub fn regressor(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let forest = Forest::new(node, "target")?;
    let targets = attr(node, "n_targets").map_or(1, |a| a.i.max(1) as usize);
    let how = text_attr(node, "aggregate_function", "SUM");
    let transform = text_attr(node, "post_transform", "NONE");
    let (base, _) = reals(node, "base_values")?;
    let mut out = Vec::new();
    let rows = rows(x)?;
    for row in &rows {
        let agg = forest.aggregate(row, targets, &how)?;
        let mut scores: Vec<f32> = if targets == 1 {
            // One target: the base value is added whether or not a tree scored.
            let origin = if base.len() == 1 { base[0] } else { 0.0 };
            vec![(agg[0].0 + origin) as f32]
        } else {
            // A target no tree gave a weight reads as 0, base value or not (onnxruntime's
            // scores without a value).
            let with_base = base.len() == targets;
            agg.iter()
                .enumerate()
                .map(|(t, &(v, scored))| match scored {
                    true => (v + if with_base { base[t] } else { 0.0 }) as f32,
                    false => 0.0,
                })
                .collect()
        };
        post_transform(&mut scores, &transform)?;
        out.extend(scores);
    }
    Tensor::from_vec(out, (rows.len(), targets), x.device())
}

/// TreeEnsembleClassifier: labels `[N]` (INT64, or STRING with `classlabels_strings`) and
/// scores `[N, classes]`.
pub fn classifier(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Vec<Tensor>> {
    let forest = Forest::new(node, "class")?;
    let names = attr(node, "classlabels_strings")
        .map(|a| a.strings.clone())
        .filter(|s| !s.is_empty());
    let labels: Vec<i64> = match &names {
        Some(s) => (0..s.len() as i64).collect(),
        None => ints(node, "classlabels_int64s"),
    };
    let classes = labels.len();
    if classes == 0 {
        bail!(
            "TreeEnsembleClassifier node '{}' has no class labels",
            node.name
        )
    }
    let transform = text_attr(node, "post_transform", "NONE");
    let (base, _) = reals(node, "base_values")?;
    let class_ids: HashSet<i64> = ints(node, "class_ids").into_iter().collect();
    let all_positive = reals(node, "class_weights")?.0.iter().all(|&w| w >= 0.0);
    let binary_case = classes == 2 && class_ids.len() == 1;
    let rows = rows(x)?;
    let (mut picked, mut scores) = (Vec::new(), Vec::new());
    for row in &rows {
        let mut p = forest.aggregate(row, classes, "SUM")?;
        let mut extra = -1;
        let label;
        if classes > 2 {
            for (k, &b) in base.iter().enumerate().take(classes) {
                p[k] = if p[k].1 {
                    (p[k].0 + b, true)
                } else {
                    (b, true)
                };
            }
            let best = p.iter().enumerate().filter(|(_, s)| s.1).fold(
                None,
                |best: Option<(usize, f64)>, (i, s)| match best {
                    Some((_, w)) if s.0 <= w => best,
                    _ => Some((i, s.0)),
                },
            );
            label = labels[best.map_or(0, |b| b.0)];
        } else {
            if base.len() == 2 {
                if p[1].1 {
                    let s1 = base[1] + p[0].0;
                    p = vec![(-s1, p[0].1), (s1, true)];
                } else {
                    p[1].0 += base[1];
                    p[0].0 += base[0];
                }
            } else if base.len() == 1 {
                p[0].0 += base[0];
                if !p[1].1 {
                    p.pop();
                }
            } else if base.is_empty() {
                extra = 3;
                if !p[1].1 {
                    p.pop();
                }
            }
            let pos = match p.get(1) {
                Some(&(s, true)) => s,
                _ if p[0].1 => p[0].0,
                _ => 0.0,
            };
            label = if binary_case {
                let (positive, code) = match all_positive {
                    true => (pos > 0.5, if pos > 0.5 { 0 } else { 1 }),
                    false => (pos > 0.0, if pos > 0.0 { 2 } else { 3 }),
                };
                extra = code;
                labels[usize::from(positive)]
            } else {
                i64::from(pos > 0.0)
            };
        }
        // A class no tree (or base value) gave a score reads as 0.
        let mut s: Vec<f32> = p
            .iter()
            .map(|&(v, scored)| if scored { v as f32 } else { 0.0 })
            .collect();
        if s.len() >= 2 {
            post_transform(&mut s, &transform)?;
        } else if transform == "PROBIT" {
            s = vec![probit(s[0]), 0.0];
        } else {
            let v = s[0];
            s = match extra {
                0 | 1 => vec![1.0 - v, v],
                2 | 3 if transform == "LOGISTIC" => {
                    vec![1.0 / (1.0 + v.exp()), 1.0 / (1.0 + (-v).exp())]
                }
                2 | 3 => vec![-v, v],
                _ => vec![v, 0.0],
            };
        }
        s.resize(classes, 0.0);
        picked.push(label);
        scores.extend(s);
    }
    let n = rows.len();
    let dev = x.device();
    let labels_out = match names {
        Some(names) => {
            let texts = picked
                .iter()
                .map(|&i| names.get(i.max(0) as usize).map_or(&b""[..], Vec::as_slice));
            table.tensor(texts, &[n], dev)?
        }
        None => Tensor::from_vec(picked, n, dev)?,
    };
    Ok(vec![
        labels_out,
        Tensor::from_vec(scores, (n, classes), dev)?,
    ])
}

/// The unified `TreeEnsemble` (ai.onnx.ml opset 5): nodes and leaves in separate arrays,
/// set-membership splits, integer-coded modes, aggregation and post-transform.
pub fn tree_ensemble(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let name = &node.name;
    let tensor_values = |n: &str| -> Result<Vec<f64>> {
        match attr(node, n).and_then(|a| a.t.as_ref()) {
            Some(t) => crate::ops::f64s(&crate::convert::tensor_from_proto(t)?),
            None => Ok(Vec::new()),
        }
    };
    let splits = tensor_values("nodes_splits")?;
    let modes = tensor_values("nodes_modes")?;
    let weights = tensor_values("leaf_weights")?;
    let members = tensor_values("membership_values")?;
    let feature = ints(node, "nodes_featureids");
    let (t_ids, f_ids) = (
        ints(node, "nodes_truenodeids"),
        ints(node, "nodes_falsenodeids"),
    );
    let (t_leaf, f_leaf) = (
        ints(node, "nodes_trueleafs"),
        ints(node, "nodes_falseleafs"),
    );
    let mut missing = ints(node, "nodes_missing_value_tracks_true");
    let targets = ints(node, "leaf_targetids");
    let n = splits.len();
    missing.resize(n, 0);
    if [
        modes.len(),
        feature.len(),
        t_ids.len(),
        f_ids.len(),
        t_leaf.len(),
        f_leaf.len(),
    ]
    .iter()
    .any(|&l| l != n)
        || targets.len() != weights.len()
    {
        bail!("TreeEnsemble node '{name}': node or leaf attributes differ in length")
    }
    // The sets of the BRANCH_MEMBER nodes, in node order, NaN-separated.
    let mut sets: HashMap<usize, Vec<f64>> = HashMap::new();
    let mut groups = members.split(|v| v.is_nan());
    for i in (0..n).filter(|&i| modes[i] == 6.0) {
        sets.insert(i, groups.next().unwrap_or(&[]).to_vec());
    }
    let n_targets = attr(node, "n_targets").map_or(1, |a| a.i.max(1) as usize);
    let how = match attr(node, "aggregate_function").map_or(1, |a| a.i) {
        0 => "AVERAGE",
        2 => "MIN",
        3 => "MAX",
        _ => "SUM",
    };
    let transform = match attr(node, "post_transform").map_or(0, |a| a.i) {
        1 => "SOFTMAX",
        2 => "LOGISTIC",
        3 => "SOFTMAX_ZERO",
        4 => "PROBIT",
        _ => "NONE",
    };
    let roots = ints(node, "tree_roots");
    let leaf_of = |root: i64, row: &[f64]| -> Result<usize> {
        let mut i = root.max(0) as usize;
        for _ in 0..=n {
            let (Some(&m), Some(&t)) = (modes.get(i), splits.get(i)) else {
                bail!("TreeEnsemble node '{name}': node index {i} out of range")
            };
            let v = row
                .get(feature[i].max(0) as usize)
                .copied()
                .unwrap_or(f64::NAN);
            let v = if x.dtype() == DType::F64 {
                v
            } else {
                v as f32 as f64
            };
            let hit = (missing[i] != 0 && v.is_nan())
                || match m as i64 {
                    0 => v <= t,
                    1 => v < t,
                    2 => v >= t,
                    3 => v > t,
                    4 => v == t,
                    5 => v != t,
                    6 => sets.get(&i).is_some_and(|s| s.contains(&v)),
                    other => bail!("TreeEnsemble node '{name}': unknown node mode {other}"),
                };
            let (next, leaf) = if hit {
                (t_ids[i], t_leaf[i])
            } else {
                (f_ids[i], f_leaf[i])
            };
            if leaf != 0 {
                return Ok(next.max(0) as usize);
            }
            i = next.max(0) as usize;
        }
        bail!("TreeEnsemble node '{name}': a tree has a cycle")
    };
    let mut out = Vec::new();
    let rows = rows(x)?;
    for row in &rows {
        let mut agg = vec![(0f64, false); n_targets];
        for &r in &roots {
            let l = leaf_of(r, row)?;
            let (Some(&t), Some(&w)) = (targets.get(l), weights.get(l)) else {
                bail!("TreeEnsemble node '{name}': leaf {l} out of range")
            };
            let Some(a) = agg.get_mut(t.max(0) as usize) else {
                bail!("TreeEnsemble node '{name}': leaf target {t} of {n_targets}")
            };
            accumulate(a, w, how);
        }
        let trees = roots.len().max(1) as f64;
        let mut scores: Vec<f32> = agg
            .iter()
            .map(|&(v, _)| (if how == "AVERAGE" { v / trees } else { v }) as f32)
            .collect();
        post_transform(&mut scores, transform)?;
        out.extend(scores);
    }
    Tensor::from_vec(out, (rows.len(), n_targets), x.device())?.to_dtype(x.dtype())
}
