//! Operators of the `ai.onnx.ml` domain (models converted from scikit-learn and similar):
//! `LabelEncoder`, `ArrayFeatureExtractor`, `Binarizer`, `Scaler`, `Normalizer`,
//! `LinearRegressor` and `LinearClassifier` (with onnxruntime's score post-transforms); the
//! tree ensembles are in `ml_tree`, feature preparation (`Imputer`, `OneHotEncoder`,
//! `CategoryMapper`, `FeatureVectorizer`) in `ml_features`.
use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor, D};
use candle_onnx::onnx::{AttributeProto, NodeProto};

use crate::attrs::{find as attr, string as text_attr};
use crate::strings::{StringTable, ONNX_STRING};

/// The `ai.onnx.ml` operators this executor implements.
const SUPPORTED: &[&str] = &[
    "ArrayFeatureExtractor",
    "Binarizer",
    "CategoryMapper",
    "FeatureVectorizer",
    "Imputer",
    "OneHotEncoder",
    "LabelEncoder",
    "LinearClassifier",
    "LinearRegressor",
    "Normalizer",
    "Scaler",
    "TreeEnsemble",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
];

/// ONNX's name of this domain.
pub const DOMAIN: &str = "ai.onnx.ml";

/// Whether `op` of the `ai.onnx.ml` domain is implemented.
pub fn is_supported(op: &str) -> bool {
    SUPPORTED.contains(&op)
}

/// Runs one `ai.onnx.ml` node (`table` holds the strings of STRING tensors).
pub fn run(node: &NodeProto, ins: &[Option<Tensor>], table: &StringTable) -> Result<Vec<Tensor>> {
    let x = match ins.first() {
        Some(Some(x)) => x,
        _ => bail!("{} node '{}' has no input", node.op_type, node.name),
    };
    let out = match node.op_type.as_str() {
        "LabelEncoder" => label_encoder(node, x, table)?,
        "ArrayFeatureExtractor" => {
            let Some(Some(idx)) = ins.get(1) else {
                bail!("ArrayFeatureExtractor node '{}' has no indices", node.name)
            };
            feature_extractor(x, idx)?
        }
        "Binarizer" => {
            let t = attr(node, "threshold").map_or(0.0, |a| a.f) as f64;
            x.gt(t)?.to_dtype(x.dtype())?
        }
        "Scaler" => {
            let floats = |n: &str| attr(node, n).map_or_else(Vec::new, |a| a.floats.clone());
            let features = |v: Vec<f32>| -> Result<Tensor> {
                let v = if v.is_empty() { vec![0f32] } else { v };
                let n = v.len();
                Tensor::from_vec(v, n, x.device())
            };
            let (offset, scale) = (features(floats("offset"))?, features(floats("scale"))?);
            let scale = if attr(node, "scale").is_none() {
                scale.ones_like()?
            } else {
                scale
            };
            x.to_dtype(DType::F32)?
                .broadcast_sub(&offset)?
                .broadcast_mul(&scale)?
        }
        "Normalizer" => {
            let norm = attr(node, "norm")
                .map_or("MAX".into(), |a| String::from_utf8_lossy(&a.s).into_owned());
            let x = x.to_dtype(DType::F32)?;
            let d = match norm.as_str() {
                "MAX" => x.max_keepdim(D::Minus1)?,
                "L1" => x.abs()?.sum_keepdim(D::Minus1)?,
                "L2" => x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?,
                other => bail!("Normalizer node '{}': unknown norm '{other}'", node.name),
            };
            // A row whose norm is 0 stays as it is (as onnxruntime leaves it).
            let d = d.eq(0.0)?.where_cond(&d.ones_like()?, &d)?;
            x.broadcast_div(&d)?
        }
        "LinearRegressor" => linear_regressor(node, x)?,
        "LinearClassifier" => return linear_classifier(node, x, table),
        "TreeEnsembleRegressor" => crate::ml_tree::regressor(node, x)?,
        "TreeEnsemble" => crate::ml_tree::tree_ensemble(node, x)?,
        "Imputer" => crate::ml_features::imputer(node, x)?,
        "OneHotEncoder" => {
            crate::ml_features::one_hot(node, x, crate::ml_features::string_input(node), table)?
        }
        "CategoryMapper" => crate::ml_features::category_mapper(
            node,
            x,
            crate::ml_features::string_input(node),
            table,
        )?,
        "FeatureVectorizer" => crate::ml_features::feature_vectorizer(node, ins)?,
        "TreeEnsembleClassifier" => return crate::ml_tree::classifier(node, x, table),
        other => bail!("ai.onnx.ml operator {other} is not supported"),
    };
    Ok(vec![out])
}

fn floats_attr(node: &NodeProto, name: &str) -> Vec<f32> {
    attr(node, name).map_or_else(Vec::new, |a| a.floats.clone())
}

/// `X · Wᵀ + b` for a linear model: X `[N, F]` (or `[F]`, one row) in any numeric type,
/// `coefficients` `[T, F]`, `intercepts` `[T]` (absent: 0). Returns the rows' scores.
fn linear_scores(node: &NodeProto, x: &Tensor, targets: usize) -> Result<Vec<Vec<f32>>> {
    let x = if x.rank() == 1 {
        x.unsqueeze(0)?
    } else {
        x.clone()
    };
    let (n, f) = x.dims2()?;
    let coefs = floats_attr(node, "coefficients");
    if targets == 0 || coefs.len() != targets * f {
        bail!(
            "{} node '{}': {} coefficients do not make {targets} rows of {f} features",
            node.op_type,
            node.name,
            coefs.len()
        )
    }
    let mut b = floats_attr(node, "intercepts");
    b.resize(targets, 0.0);
    let w = Tensor::from_vec(coefs, (targets, f), x.device())?;
    let b = Tensor::from_vec(b, targets, x.device())?;
    let scores = x.to_dtype(DType::F32)?.matmul(&w.t()?)?.broadcast_add(&b)?;
    debug_assert_eq!(scores.dims2()?, (n, targets));
    scores
        .to_device(&candle_core::Device::Cpu)?
        .to_vec2::<f32>()
}

/// onnxruntime's approximation of √2 · erf⁻¹(2p − 1) (Winitzki's erf⁻¹, a = 0.147).
pub(crate) fn probit(p: f32) -> f32 {
    let x = 2.0 * p - 1.0;
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let ln = ((1.0 - x) * (1.0 + x)).ln();
    let a = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * ln;
    let v = -a + (a * a - ln / 0.147).sqrt();
    std::f32::consts::SQRT_2 * sign * v.sqrt()
}

/// Applies `post_transform` to one row of scores as onnxruntime does: element-wise for
/// PROBIT and LOGISTIC, per row for SOFTMAX and SOFTMAX_ZERO (which keeps zeros at 0) —
/// but to a single score only PROBIT.
pub(crate) fn post_transform(row: &mut [f32], transform: &str) -> Result<()> {
    let single = row.len() == 1;
    match transform {
        "NONE" => {}
        "PROBIT" => row.iter_mut().for_each(|v| *v = probit(*v)),
        _ if single => {}
        "LOGISTIC" => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        "SOFTMAX" | "SOFTMAX_ZERO" => {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let zero = transform == "SOFTMAX_ZERO";
            let mut sum = 0.0;
            for v in row.iter_mut() {
                if zero && v.abs() <= 1e-7 {
                    *v = 0.0;
                } else {
                    *v = (*v - max).exp();
                    sum += *v;
                }
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
        other => bail!("unknown post_transform '{other}'"),
    }
    Ok(())
}

fn linear_regressor(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let targets = attr(node, "targets").map_or(1, |a| a.i.max(0) as usize);
    let transform = text_attr(node, "post_transform", "NONE");
    let mut rows = linear_scores(node, x, targets)?;
    for r in &mut rows {
        post_transform(r, &transform)?;
    }
    let n = rows.len();
    Tensor::from_vec(rows.concat(), (n, targets), x.device())
}

/// Labels `[N]` (INT64, or STRING with `classlabels_strings`) and scores `[N, C]`. With one
/// score per row it is a binary classifier: label = positive when the score is > 0, and
/// with two class labels the scores become [1 − s, s], as in onnxruntime.
fn linear_classifier(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Vec<Tensor>> {
    let names = attr(node, "classlabels_strings").map(|a| a.strings.clone());
    let ids = attr(node, "classlabels_ints").map_or_else(Vec::new, |a| a.ints.clone());
    let targets = floats_attr(node, "intercepts").len();
    let transform = text_attr(node, "post_transform", "NONE");
    let mut rows = linear_scores(node, x, targets)?;
    let labels_len = names.as_ref().map_or(ids.len(), Vec::len);
    let add_second = targets == 1 && labels_len == 2;
    // Label index per row: 1 / 0 for binary, else the first highest score.
    let picks: Vec<usize> = rows
        .iter()
        .map(|r| {
            if targets == 1 {
                usize::from(r[0] > 0.0)
            } else {
                r.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 {
                            (i, v)
                        } else {
                            best
                        }
                    })
                    .0
            }
        })
        .collect();
    if targets > 1 && labels_len < targets {
        bail!(
            "LinearClassifier node '{}': {targets} classes but {labels_len} class labels",
            node.name
        )
    }
    for r in &mut rows {
        if add_second && transform != "PROBIT" {
            let s = r[0];
            *r = vec![1.0 - s, s];
        } else {
            post_transform(r, &transform)?;
        }
    }
    let n = rows.len();
    let width = rows
        .first()
        .map_or(if add_second { 2 } else { targets }, Vec::len);
    let dev = x.device();
    let scores = Tensor::from_vec(rows.concat(), (n, width), dev)?;
    let labels = match names {
        Some(names) => {
            let (neg, pos) = if targets == 1 && names.len() != 2 {
                (b"0".to_vec(), b"1".to_vec())
            } else {
                (
                    names.first().cloned().unwrap_or_default(),
                    names.get(1).cloned().unwrap_or_default(),
                )
            };
            let texts: Vec<&[u8]> = picks
                .iter()
                .map(|&i| match targets {
                    1 if i == 1 => pos.as_slice(),
                    1 => neg.as_slice(),
                    _ => names[i].as_slice(),
                })
                .collect();
            table.tensor(texts, &[n], dev)?
        }
        None => {
            let v: Vec<i64> = picks
                .iter()
                .map(|&i| match targets {
                    1 if ids.len() == 2 => ids[i],
                    1 => i as i64,
                    _ => ids[i],
                })
                .collect();
            Tensor::from_vec(v, n, dev)?
        }
    };
    Ok(vec![labels, scores])
}

/// `X[..., Y]`: the features (last dimension) that `indices` pick; a 1-D `X` gives
/// `[1, len(Y)]`.
fn feature_extractor(x: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let x = if x.rank() == 1 {
        x.unsqueeze(0)?
    } else {
        x.clone()
    };
    let n = x.dim(D::Minus1)? as i64;
    let idx = crate::ops::i64s(indices)?;
    if let Some(bad) = idx.iter().find(|&&i| i < 0 || i >= n) {
        bail!("ArrayFeatureExtractor: index {bad} is out of range for {n} features")
    }
    let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let len = idx.len();
    let idx = Tensor::from_vec(idx, len, x.device())?;
    x.index_select(&idx, x.rank() - 1)
}

/// A LabelEncoder key: strings by their bytes, numbers by value (every NaN one key).
#[derive(PartialEq, Eq, Hash, Clone)]
enum Key {
    Text(Vec<u8>),
    Number(u64),
}

fn number_key(v: f64) -> Key {
    Key::Number(if v.is_nan() {
        f64::NAN.to_bits()
    } else {
        (v + 0.0).to_bits()
    })
}

/// One side of a LabelEncoder mapping: strings, or numbers with their type.
enum Side {
    Text(Vec<Vec<u8>>),
    Numbers(Vec<f64>, DType),
}

/// `<prefix>_strings`, `_int64s`, `_floats` or `_tensor` of a LabelEncoder.
fn side(node: &NodeProto, prefix: &str) -> Result<Option<Side>> {
    if let Some(a) = attr(node, &format!("{prefix}_strings")) {
        return Ok(Some(Side::Text(a.strings.clone())));
    }
    if let Some(a) = attr(node, &format!("{prefix}_int64s")) {
        let v = a.ints.iter().map(|&i| i as f64).collect();
        return Ok(Some(Side::Numbers(v, DType::I64)));
    }
    if let Some(a) = attr(node, &format!("{prefix}_floats")) {
        let v = a.floats.iter().map(|&f| f as f64).collect();
        return Ok(Some(Side::Numbers(v, DType::F32)));
    }
    tensor_side(attr(node, &format!("{prefix}_tensor")))
}

fn tensor_side(a: Option<&AttributeProto>) -> Result<Option<Side>> {
    let Some(t) = a.and_then(|a| a.t.as_ref()) else {
        return Ok(None);
    };
    if t.data_type == ONNX_STRING {
        return Ok(Some(Side::Text(t.string_data.clone())));
    }
    let v = crate::convert::tensor_from_proto(t)?;
    let dt = v.dtype();
    Ok(Some(Side::Numbers(crate::ops::f64s(&v)?, dt)))
}

/// Whether a LabelEncoder node maps to strings (its output is then a STRING tensor).
fn label_encoder_gives_strings(node: &NodeProto) -> bool {
    attr(node, "values_strings").is_some()
        || attr(node, "values_tensor")
            .and_then(|a| a.t.as_ref())
            .is_some_and(|t| t.data_type == ONNX_STRING)
}

/// The outputs (by position) of an `ai.onnx.ml` node that are STRING, given the inputs that
/// are (`reads`), for the operators whose typing depends on their attributes; `None` for
/// the others (`strings::mark`'s general rules apply). Marks a feature-preparation node that
/// reads strings (`ml_features::STRING_INPUT`).
pub fn string_outputs(
    node: &mut NodeProto,
    reads: &[usize],
) -> Option<std::result::Result<Vec<usize>, String>> {
    let all = (0..node.output.len()).collect();
    let only_input_0 = reads.iter().all(|&k| k == 0);
    Some(Ok(match node.op_type.as_str() {
        // A classifier's labels (output 0) are STRING with string class labels.
        "LinearClassifier" | "TreeEnsembleClassifier" if reads.is_empty() => {
            match classifier_gives_strings(node) {
                true => vec![0],
                false => vec![],
            }
        }
        // Strings in and out as its keys and values are (checked when it runs).
        "LabelEncoder" if only_input_0 => match label_encoder_gives_strings(node) {
            true => all,
            false => vec![],
        },
        // Told when they read strings; a CategoryMapper maps ids to strings otherwise.
        "OneHotEncoder" | "CategoryMapper" => {
            if !only_input_0 {
                return Some(Err(format!(
                    "node '{}' ({}): only input 0 may be STRING",
                    node.name, node.op_type
                )));
            }
            if !reads.is_empty() {
                let mark = crate::attrs::new_int(crate::ml_features::STRING_INPUT, 1);
                node.attribute.push(mark);
                vec![]
            } else if node.op_type == "CategoryMapper" {
                all
            } else {
                vec![]
            }
        }
        _ => return None,
    }))
}

/// Whether a classifier's labels are strings (`classlabels_strings`).
fn classifier_gives_strings(node: &NodeProto) -> bool {
    attr(node, "classlabels_strings").is_some_and(|a| !a.strings.is_empty())
}

/// Maps each element of `x` through the node's keys → values, or to its default.
fn label_encoder(node: &NodeProto, x: &Tensor, table: &StringTable) -> Result<Tensor> {
    let (Some(keys), Some(values)) = (side(node, "keys")?, side(node, "values")?) else {
        bail!("LabelEncoder node '{}' needs keys and values", node.name)
    };
    let key_list: Vec<Key> = match &keys {
        Side::Text(s) => s.iter().map(|s| Key::Text(s.clone())).collect(),
        Side::Numbers(v, _) => v.iter().map(|&v| number_key(v)).collect(),
    };
    let map: HashMap<Key, usize> = key_list
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    let inputs: Vec<Key> = match keys {
        Side::Text(_) => table.map(x, |s| Ok(Key::Text(s.to_vec())))?,
        Side::Numbers(..) => crate::ops::f64s(x)?.into_iter().map(number_key).collect(),
    };
    let hits: Vec<Option<usize>> = inputs.iter().map(|k| map.get(k).copied()).collect();
    let dev = x.device();
    match values {
        Side::Text(v) => {
            let default = match attr(node, "default_string") {
                Some(a) => a.s.clone(),
                None => match tensor_side(attr(node, "default_tensor"))? {
                    Some(Side::Text(d)) => d.into_iter().next().unwrap_or_default(),
                    _ => b"_Unused".to_vec(),
                },
            };
            let out = hits.iter().map(|h| {
                h.and_then(|i| v.get(i))
                    .map_or(default.as_slice(), Vec::as_slice)
            });
            table.tensor(out, x.dims(), dev)
        }
        Side::Numbers(v, dt) => {
            let default = match (attr(node, "default_int64"), attr(node, "default_float")) {
                (Some(a), _) if dt.is_int() => a.i as f64,
                (_, Some(a)) if dt.is_float() => a.f as f64,
                _ => match tensor_side(attr(node, "default_tensor"))? {
                    Some(Side::Numbers(d, _)) => d.first().copied().unwrap_or(0.0),
                    _ if dt.is_float() => -0.0,
                    _ => -1.0,
                },
            };
            let out: Vec<f64> = hits
                .iter()
                .map(|h| h.and_then(|i| v.get(i)).copied().unwrap_or(default))
                .collect();
            Tensor::from_vec(out, x.dims(), dev)?.to_dtype(dt)
        }
    }
}
