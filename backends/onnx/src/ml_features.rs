//! `ai.onnx.ml` feature preparation, as scikit-learn pipelines export it: `Imputer`,
//! `OneHotEncoder`, `CategoryMapper` and `FeatureVectorizer`.
use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs::find as attr;
use crate::strings::StringTable;

/// Set by the planner on a node of this module whose input 0 is STRING.
pub const STRING_INPUT: &str = "kiln_string_input";

/// Whether the planner marked the node's input as STRING.
pub fn string_input(node: &NodeProto) -> bool {
    attr(node, STRING_INPUT).is_some_and(|a| a.i != 0)
}

/// `Imputer`: every element equal to `replaced_value_*` (NaN: every NaN) becomes the
/// imputed value of its feature (last dimension), or the single imputed value.
pub fn imputer(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let float = x.dtype().is_float();
    let (imputed, replaced): (Vec<f64>, f64) = if float {
        let v = attr(node, "imputed_value_floats").map_or_else(Vec::new, |a| a.floats.clone());
        let r = attr(node, "replaced_value_float").map_or(0.0, |a| a.f);
        (v.iter().map(|&f| f as f64).collect(), r as f64)
    } else {
        let v = attr(node, "imputed_value_int64s").map_or_else(Vec::new, |a| a.ints.clone());
        let r = attr(node, "replaced_value_int64").map_or(0, |a| a.i);
        (v.iter().map(|&i| i as f64).collect(), r as f64)
    };
    let features = x.dims().last().copied().unwrap_or(1).max(1);
    if imputed.len() != 1 && imputed.len() != features {
        bail!(
            "Imputer node '{}': {} imputed values for {features} features",
            node.name,
            imputed.len()
        )
    }
    let v = crate::ops::f64s(x)?;
    let out: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let hit = if replaced.is_nan() {
                e.is_nan()
            } else {
                e == replaced
            };
            match hit {
                true => imputed[if imputed.len() == 1 { 0 } else { i % features }],
                false => e,
            }
        })
        .collect();
    Tensor::from_vec(out, x.dims(), x.device())?.to_dtype(x.dtype())
}

/// `OneHotEncoder`: FLOAT `X.shape + [categories]`, 1 at each element's category. An
/// unknown value gives a row of zeros, or an error when `zeros` is 0.
pub fn one_hot(
    node: &NodeProto,
    x: &Tensor,
    is_string: bool,
    table: &StringTable,
) -> Result<Tensor> {
    let zeros = attr(node, "zeros").map_or(1, |a| a.i) != 0;
    let index: Vec<Option<usize>> = if is_string {
        let cats: HashMap<Vec<u8>, usize> = attr(node, "cats_strings")
            .map_or_else(Vec::new, |a| a.strings.clone())
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i))
            .collect();
        table.map(x, |s| Ok(cats.get(s).copied()))?
    } else {
        let cats: HashMap<i64, usize> = attr(node, "cats_int64s")
            .map_or_else(Vec::new, |a| a.ints.clone())
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, i))
            .collect();
        crate::ops::f64s(x)?
            .iter()
            .map(|&v| cats.get(&(v as i64)).copied())
            .collect()
    };
    let n_cats = attr(
        node,
        if is_string {
            "cats_strings"
        } else {
            "cats_int64s"
        },
    )
    .map_or(0, |a| a.strings.len().max(a.ints.len()));
    if !zeros && index.iter().any(Option::is_none) {
        bail!(
            "OneHotEncoder node '{}': a value is not one of the categories",
            node.name
        )
    }
    let mut out = vec![0f32; index.len() * n_cats];
    for (row, i) in index.iter().enumerate() {
        if let Some(i) = i {
            out[row * n_cats + i] = 1.0;
        }
    }
    let mut dims = x.dims().to_vec();
    dims.push(n_cats);
    Tensor::from_vec(out, dims, x.device())
}

/// `CategoryMapper`: strings to their INT64 category ids, or ids to strings, by the
/// parallel `cats_strings` / `cats_int64s`; unknown ones get the default.
pub fn category_mapper(
    node: &NodeProto,
    x: &Tensor,
    is_string: bool,
    table: &StringTable,
) -> Result<Tensor> {
    let names = attr(node, "cats_strings").map_or_else(Vec::new, |a| a.strings.clone());
    let ids = attr(node, "cats_int64s").map_or_else(Vec::new, |a| a.ints.clone());
    if is_string {
        let map: HashMap<&[u8], i64> = names
            .iter()
            .map(Vec::as_slice)
            .zip(ids.iter().copied())
            .collect();
        let default = attr(node, "default_int64").map_or(-1, |a| a.i);
        let v = table.map(x, |s| Ok(map.get(s).copied().unwrap_or(default)))?;
        Tensor::from_vec(v, x.dims(), x.device())
    } else {
        let map: HashMap<i64, &[u8]> = ids
            .iter()
            .copied()
            .zip(names.iter().map(Vec::as_slice))
            .collect();
        let default = attr(node, "default_string").map_or(b"_Unused".to_vec(), |a| a.s.clone());
        let v = x.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        let texts = v
            .iter()
            .map(|i| map.get(i).copied().unwrap_or(default.as_slice()));
        table.tensor(texts, x.dims(), x.device())
    }
}

/// `FeatureVectorizer`: the inputs' features side by side, FLOAT `[N, Σ inputdimensions]`;
/// each input is cut or zero-padded to its `inputdimensions` entry.
pub fn feature_vectorizer(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let dims = attr(node, "inputdimensions").map_or_else(Vec::new, |a| a.ints.clone());
    let inputs: Vec<&Tensor> = ins.iter().flatten().collect();
    if dims.len() != inputs.len() {
        bail!(
            "FeatureVectorizer node '{}': {} inputs but {} inputdimensions",
            node.name,
            inputs.len(),
            dims.len()
        )
    }
    let first = inputs
        .first()
        .ok_or_else(|| candle_core::Error::Msg("no inputs".into()))?;
    let n = if first.rank() <= 1 { 1 } else { first.dim(0)? };
    let total: usize = dims.iter().map(|&d| d.max(0) as usize).sum();
    let mut out = vec![0f32; n * total];
    let mut at = 0;
    for (t, &d) in inputs.iter().zip(&dims) {
        let d = d.max(0) as usize;
        let v = crate::ops::f64s(t)?;
        let width = v.len().checked_div(n).unwrap_or(0);
        for r in 0..n {
            for c in 0..d.min(width) {
                out[r * total + at + c] = v[r * width + c] as f32;
            }
        }
        at += d;
    }
    Tensor::from_vec(out, (n, total), first.device())
}
