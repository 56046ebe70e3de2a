//! Triton's `reshape` on a config input or output: clients see the tensor with the config's
//! `dims`, the model with `reshape.shape` (both after the batch dimension, which stays).
//! A typical use is an ONNX model's `[batch]` tensor, which auto-complete declares as
//! `dims: [1]` with `reshape: { shape: [] }`.

/// `shape` (laid out as `from_dims`) in the layout `to_dims`: the fixed dimensions of
/// `to_dims`, and its variable (-1) ones taken in order from `shape`'s variable ones; one
/// variable dimension left over gets what the element count leaves.
pub fn map_shape(shape: &[i64], from_dims: &[i64], to_dims: &[i64]) -> Vec<i64> {
    let mut vars = shape
        .iter()
        .zip(from_dims)
        .filter(|(_, &d)| d == -1)
        .map(|(&v, _)| v);
    let mut out: Vec<i64> = to_dims
        .iter()
        .map(|&d| {
            if d == -1 {
                vars.next().unwrap_or(-1)
            } else {
                d
            }
        })
        .collect();
    if let Some(k) = out.iter().position(|&d| d == -1) {
        let total: i64 = shape.iter().product();
        let known: i64 = out.iter().filter(|&&d| d != -1).product();
        out[k] = if known > 0 { total / known } else { 0 };
    }
    out
}

/// A full shape (`batched`: with the batch dimension first) mapped with [`map_shape`];
/// the batch dimension is kept as it is.
pub fn map_full_shape(
    shape: &[i64],
    batched: bool,
    from_dims: &[i64],
    to_dims: &[i64],
) -> Vec<i64> {
    match (batched, shape.split_first()) {
        (true, Some((&b, rest))) => std::iter::once(b)
            .chain(map_shape(rest, from_dims, to_dims))
            .collect(),
        _ => map_shape(shape, from_dims, to_dims),
    }
}

/// Checks a config tensor's `reshape` against its `dims` as Triton does: the same element
/// count, or the same number of variable dimensions.
pub fn check(name: &str, what: &str, dims: &[i64], reshape: &[i64]) -> Result<(), String> {
    let vars = |d: &[i64]| d.iter().filter(|&&x| x == -1).count();
    if let Some(d) = reshape.iter().find(|&&d| d == 0 || d < -1) {
        return Err(format!(
            "model {what} '{name}' has invalid reshape dimension {d}: dimensions must be >= 1, or -1 for a variable size"
        ));
    }
    if vars(dims) != vars(reshape) {
        return Err(format!(
            "model {what} '{name}' has different number of variable-size dimensions for dims and reshape"
        ));
    }
    let size = |d: &[i64]| d.iter().filter(|&&x| x != -1).product::<i64>();
    if vars(dims) == 0 && size(dims) != size(reshape) {
        return Err(format!(
            "model {what} '{name}' has different size for dims and reshape"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_between_dims_and_reshape() {
        // dims [1] ↔ reshape [] (a model's [batch] tensor).
        assert_eq!(map_full_shape(&[4, 1], true, &[1], &[]), vec![4]);
        assert_eq!(map_full_shape(&[4], true, &[], &[1]), vec![4, 1]);
        // Variable dimensions carry over in order.
        assert_eq!(map_shape(&[3, 7], &[-1, 7], &[7, -1]), vec![7, 3]);
        assert_eq!(map_shape(&[2, 5, 6], &[2, -1, 6], &[-1, 12]), vec![5, 12]);
        // Fixed to fixed.
        assert_eq!(map_full_shape(&[2, 2, 3], true, &[2, 3], &[6]), vec![2, 6]);
    }

    #[test]
    fn checks_sizes_like_triton() {
        assert!(check("x", "input", &[1], &[]).is_ok());
        assert!(check("x", "input", &[2, 3], &[6]).is_ok());
        assert!(check("x", "input", &[-1, 4], &[4, -1]).is_ok());
        let e = check("x", "input", &[2, 3], &[5]).unwrap_err();
        assert!(e.contains("different size"), "{e}");
        let e = check("x", "output", &[-1], &[3]).unwrap_err();
        assert!(e.contains("variable-size"), "{e}");
    }
}
