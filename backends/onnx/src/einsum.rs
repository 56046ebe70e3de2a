//! ONNX `Einsum`: the equation is parsed (with `...` and the implicit output), repeated
//! letters within one operand become diagonals, letters no later term needs are summed out
//! early, and operands are contracted pairwise as batched matrix products.
use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor};

/// Letters standing for the dimensions `...` covers (never ONNX equation letters).
const ELLIPSIS: &[char] = &['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'];

/// An operand with one letter per axis, no letter repeated.
struct Term {
    t: Tensor,
    letters: Vec<char>,
}

fn parse_term(spec: &str, rank: usize) -> Result<Vec<char>> {
    let named = spec
        .replace("...", "")
        .chars()
        .filter(|c| c.is_alphabetic())
        .count();
    let mut out = Vec::with_capacity(rank);
    if let Some((a, b)) = spec.split_once("...") {
        if rank < named || rank - named > ELLIPSIS.len() {
            bail!("Einsum: term '{spec}' does not fit rank {rank}")
        }
        let n = rank - named;
        out.extend(a.chars().filter(|c| c.is_alphabetic()));
        out.extend(&ELLIPSIS[ELLIPSIS.len() - n..]);
        out.extend(b.chars().filter(|c| c.is_alphabetic()));
    } else {
        out.extend(spec.chars().filter(|c| c.is_alphabetic()));
    }
    if out.len() != rank {
        bail!(
            "Einsum: term '{spec}' has {} letters for rank {rank}",
            out.len()
        )
    }
    Ok(out)
}

/// Keeps the diagonal for letters repeated within one operand.
fn diagonal(mut t: Tensor, mut letters: Vec<char>) -> Result<Term> {
    while let Some((i, j)) = (0..letters.len())
        .flat_map(|i| (i + 1..letters.len()).map(move |j| (i, j)))
        .find(|&(i, j)| letters[i] == letters[j])
    {
        let n = t.dim(i)?;
        // Move axes i and j last, take element (k, k) of each trailing n×n block.
        let mut perm: Vec<usize> = (0..t.rank()).filter(|&a| a != i && a != j).collect();
        perm.extend([i, j]);
        let moved = t.permute(perm)?.contiguous()?;
        let lead = moved.dims()[..moved.rank() - 2].to_vec();
        let flat = moved.reshape((lead.iter().product::<usize>(), n * n))?;
        let idx: Vec<u32> = (0..n as u32).map(|k| k * (n as u32 + 1)).collect();
        let diag = flat.index_select(&Tensor::new(idx, t.device())?, 1)?;
        let mut dims = lead.clone();
        dims.push(n);
        t = diag.reshape(dims)?;
        let mut rest: Vec<char> = (0..letters.len())
            .filter(|&a| a != i && a != j)
            .map(|a| letters[a])
            .collect();
        rest.push(letters[i]);
        letters = rest;
    }
    Ok(Term { t, letters })
}

/// Sums out the letters of `term` not in `keep`.
fn sum_except(term: Term, keep: &[char]) -> Result<Term> {
    let mut t = term.t;
    let mut letters = term.letters;
    for a in (0..letters.len()).rev() {
        if !keep.contains(&letters[a]) {
            t = t.sum(a)?;
            letters.remove(a);
        }
    }
    Ok(Term { t, letters })
}

/// Contracts two terms, keeping the letters in `keep`.
fn contract(a: Term, b: Term, keep: &[char], size: &HashMap<char, usize>) -> Result<Term> {
    let in_b = |c: &char| b.letters.contains(c);
    let in_a = |c: &char| a.letters.contains(c);
    let batch: Vec<char> = a
        .letters
        .iter()
        .filter(|c| in_b(c) && keep.contains(c))
        .copied()
        .collect();
    let inner: Vec<char> = a
        .letters
        .iter()
        .filter(|c| in_b(c) && !keep.contains(c))
        .copied()
        .collect();
    let left: Vec<char> = a.letters.iter().filter(|c| !in_b(c)).copied().collect();
    let right: Vec<char> = b.letters.iter().filter(|c| !in_a(c)).copied().collect();
    let arrange = |term: &Term, order: &[char]| -> Result<Tensor> {
        let perm: Vec<usize> = order
            .iter()
            .map(|c| term.letters.iter().position(|l| l == c).unwrap_or(0))
            .collect();
        // Size-1 axes broadcast against the other operand's size for the same letter.
        let dims: Vec<usize> = order.iter().map(|c| size[c]).collect();
        term.t.permute(perm)?.broadcast_as(dims)?.contiguous()
    };
    let prod = |cs: &[char]| cs.iter().map(|c| size[c]).product::<usize>();
    let (nb, nl, ni, nr) = (prod(&batch), prod(&left), prod(&inner), prod(&right));
    let ta = arrange(&a, &[batch.as_slice(), &left, &inner].concat())?.reshape((nb, nl, ni))?;
    let tb = arrange(&b, &[batch.as_slice(), &inner, &right].concat())?.reshape((nb, ni, nr))?;
    let letters: Vec<char> = [batch.as_slice(), &left, &right].concat();
    let dims: Vec<usize> = letters.iter().map(|c| size[c]).collect();
    let t = ta.matmul(&tb)?.reshape(dims)?;
    Ok(Term { t, letters })
}

/// Evaluates `equation` on `inputs`.
pub fn einsum(equation: &str, inputs: &[Tensor]) -> Result<Tensor> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let specs: Vec<&str> = lhs.split(',').collect();
    if specs.len() != inputs.len() || inputs.is_empty() {
        bail!(
            "Einsum: '{equation}' names {} operands, {} given",
            specs.len(),
            inputs.len()
        )
    }
    let dt = inputs[0].dtype();
    let work = if dt.is_float() { dt } else { DType::F64 };
    let mut terms = Vec::new();
    let mut size: HashMap<char, usize> = HashMap::new();
    let mut ell = 0;
    for (spec, t) in specs.iter().zip(inputs) {
        let letters = parse_term(spec, t.rank())?;
        ell = ell.max(letters.iter().filter(|c| ELLIPSIS.contains(c)).count());
        for (c, &d) in letters.iter().zip(t.dims()) {
            let e = size.entry(*c).or_insert(d);
            if *e == 1 {
                *e = d;
            } else if d != 1 && *e != d {
                bail!("Einsum: letter '{c}' is {e} and {d}")
            }
        }
        terms.push(diagonal(t.to_dtype(work)?, letters)?);
    }
    let output: Vec<char> = match &rhs {
        Some(r) => {
            let named = r
                .replace("...", "")
                .chars()
                .filter(|c| c.is_alphabetic())
                .count();
            parse_term(r, named + if r.contains("...") { ell } else { 0 })?
        }
        None => {
            // Implicit: the ellipsis, then letters used once, alphabetically.
            let mut count: HashMap<char, usize> = HashMap::new();
            for t in &terms {
                for c in &t.letters {
                    *count.entry(*c).or_default() += 1;
                }
            }
            let mut once: Vec<char> = count
                .iter()
                .filter(|(c, &n)| n == 1 && !ELLIPSIS.contains(c))
                .map(|(c, _)| *c)
                .collect();
            once.sort_unstable();
            let mut out: Vec<char> = ELLIPSIS[ELLIPSIS.len() - ell..].to_vec();
            out.extend(once);
            out
        }
    };
    // Left to right: each step keeps the letters the output or a later term still needs.
    let mut acc: Option<Term> = None;
    for k in 0..terms.len() {
        let later: Vec<char> = terms[k + 1..]
            .iter()
            .flat_map(|t| t.letters.clone())
            .chain(output.iter().copied())
            .collect();
        let empty = Term {
            t: Tensor::zeros((), work, inputs[0].device())?,
            letters: vec![],
        };
        let term = std::mem::replace(&mut terms[k], empty);
        acc = Some(match acc {
            None => sum_except(term, &later)?,
            Some(a) => {
                let a = sum_except(a, &[later.as_slice(), &term.letters].concat())?;
                let b = sum_except(term, &[later.as_slice(), &a.letters].concat())?;
                contract(a, b, &later, &size)?
            }
        });
    }
    let Some(last) = acc else {
        bail!("Einsum: no operands")
    };
    let last = sum_except(last, &output)?;
    let perm: Vec<usize> = output
        .iter()
        .map(|c| {
            last.letters.iter().position(|l| l == c).ok_or_else(|| {
                candle_core::Error::Msg(format!("Einsum: output letter '{c}' is in no operand"))
            })
        })
        .collect::<Result<_>>()?;
    let out = if perm.is_empty() {
        last.t
    } else {
        last.t.permute(perm)?.contiguous()?
    };
    out.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize], seed: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7) % 11) as f32 - 5.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    fn same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>());
        assert!(d.expect("diff") < 1e-4);
    }

    #[test]
    fn attention_scores_implicit_output_and_ellipsis_broadcast() {
        let (q, k) = (t(&[2, 3, 4, 5], 1), t(&[2, 3, 6, 5], 2));
        let want = q
            .matmul(&k.transpose(2, 3).expect("t").contiguous().expect("c"))
            .expect("mm");
        same(&einsum("bhqd,bhkd->bhqk", &[q, k]).expect("einsum"), &want);
        // Implicit output: letters used once, alphabetically ("ik").
        let (a, b) = (t(&[3, 4], 3), t(&[4, 2], 4));
        same(
            &einsum("ij,jk", &[a.clone(), b.clone()]).expect("einsum"),
            &a.matmul(&b).expect("mm"),
        );
        // Ellipsis with a broadcast batch of 1.
        let (x, y) = (t(&[1, 3, 4], 5), t(&[2, 4, 2], 6));
        let want = x.broadcast_matmul(&y).expect("mm");
        same(
            &einsum("...ij,...jk->...ik", &[x, y]).expect("einsum"),
            &want,
        );
        // Trace and full sum.
        let m = t(&[3, 3], 7);
        let trace: f32 = (0..3)
            .map(|i| {
                m.get(i)
                    .and_then(|r| r.get(i))
                    .and_then(|v| v.to_scalar::<f32>())
                    .expect("v")
            })
            .sum();
        assert_eq!(
            einsum("ii->", std::slice::from_ref(&m))
                .expect("trace")
                .to_scalar::<f32>()
                .expect("s"),
            trace
        );
        let sum = m.sum_all().and_then(|s| s.to_scalar::<f32>()).expect("sum");
        assert_eq!(
            einsum("ij->", &[m])
                .expect("sum")
                .to_scalar::<f32>()
                .expect("s"),
            sum
        );
    }
}
