//! ONNX recurrent layers `RNN`, `GRU` and `LSTM`: forward, reverse and bidirectional,
//! `layout` 0 and 1, initial states, biases, peepholes, `sequence_lens`, `clip`,
//! `input_forget`, `linear_before_reset` and the activation list. Runs on the host in f32:
//! the input projection of all steps is one matrix product, then each step multiplies the
//! hidden state by the recurrent weights.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::cpu_kernels::{linear, Weight};

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// An activation function by ONNX name, with its alpha and beta.
fn activation(
    name: &str,
    alpha: Option<f32>,
    beta: Option<f32>,
) -> Result<Box<dyn Fn(f32) -> f32>> {
    let a = |d: f32| alpha.unwrap_or(d);
    let b = |d: f32| beta.unwrap_or(d);
    Ok(match name.to_ascii_lowercase().as_str() {
        "sigmoid" => Box::new(|v: f32| 1.0 / (1.0 + (-v).exp())),
        "tanh" => Box::new(f32::tanh),
        "relu" => Box::new(|v: f32| v.max(0.0)),
        "leakyrelu" => {
            let a = a(0.01);
            Box::new(move |v: f32| if v >= 0.0 { v } else { a * v })
        }
        "thresholdedrelu" => {
            let a = a(1.0);
            Box::new(move |v: f32| if v > a { v } else { 0.0 })
        }
        "scaledtanh" => {
            let (a, b) = (a(1.0), b(1.0));
            Box::new(move |v: f32| a * (b * v).tanh())
        }
        "hardsigmoid" => {
            let (a, b) = (a(0.2), b(0.5));
            Box::new(move |v: f32| (a * v + b).clamp(0.0, 1.0))
        }
        "elu" => {
            let a = a(1.0);
            Box::new(move |v: f32| if v >= 0.0 { v } else { a * (v.exp() - 1.0) })
        }
        "softsign" => Box::new(|v: f32| v / (1.0 + v.abs())),
        "softplus" => Box::new(|v: f32| v.exp().ln_1p()),
        "affine" => {
            let (a, b) = (a(1.0), b(0.0));
            Box::new(move |v: f32| a * v + b)
        }
        other => bail!("recurrent layer: activation {other} is not supported"),
    })
}

/// `x [rows, k] · wᵀ` for `w` `[n, k]`.
fn times_transposed(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut wt = vec![0f32; k * n];
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = w[r * k + c];
        }
    }
    linear(x, Weight::Rows(&wt), None, [k, n], false)
}

/// Runs the RNN, GRU or LSTM `node`; returns `Y`, `Y_h` (and `Y_c` for LSTM).
pub fn recurrent(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let op = node.op_type.as_str();
    let gates = match op {
        "LSTM" => 4,
        "GRU" => 3,
        _ => 1,
    };
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .filter(|t| t.elem_count() > 0)
    };
    let (Some(x), Some(w), Some(r)) = (get(0), get(1), get(2)) else {
        bail!("{op}: needs X, W and R")
    };
    if w.rank() != 3 || r.rank() != 3 || x.rank() != 3 {
        bail!(
            "{op}: X, W and R must be 3-D, got {:?}, {:?}, {:?}",
            x.dims(),
            w.dims(),
            r.dims()
        )
    }
    let layout = attrs::int(node, "layout", 0);
    let x = if layout == 1 {
        x.transpose(0, 1)?.contiguous()?
    } else {
        x.clone()
    };
    let (seq, batch, input) = x.dims3()?;
    let dirs = w.dims()[0];
    let hidden = attrs::int(node, "hidden_size", (r.dims()[2]) as i64) as usize;
    let gh = gates * hidden;
    if w.dims() != [dirs, gh, input] || r.dims() != [dirs, gh, hidden] {
        bail!(
            "{op}: W {:?} / R {:?} do not fit X {:?} and hidden_size {hidden}",
            w.dims(),
            r.dims(),
            x.dims()
        )
    }
    let direction = attrs::string(node, "direction", "forward");
    let clip = attrs::has(node, "clip").then(|| attrs::float(node, "clip", 0.0));
    let lens: Vec<usize> = match get(4) {
        Some(l) => crate::ops::i64s(l)?
            .iter()
            .map(|&v| (v.max(0) as usize).min(seq))
            .collect(),
        None => vec![seq; batch],
    };
    // Activations: f, g (and h for LSTM) per direction.
    let per_dir = match op {
        "LSTM" => 3,
        "GRU" => 2,
        _ => 1,
    };
    let names: Vec<String> = match node.attribute.iter().find(|a| a.name == "activations") {
        Some(a) => a
            .strings
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        None => {
            let d: &[&str] = match op {
                "LSTM" => &["Sigmoid", "Tanh", "Tanh"],
                "GRU" => &["Sigmoid", "Tanh"],
                _ => &["Tanh"],
            };
            (0..dirs)
                .flat_map(|_| d.iter().map(|s| s.to_string()))
                .collect()
        }
    };
    let alphas = node
        .attribute
        .iter()
        .find(|a| a.name == "activation_alpha")
        .map(|a| a.floats.clone());
    let betas = node
        .attribute
        .iter()
        .find(|a| a.name == "activation_beta")
        .map(|a| a.floats.clone());
    let (wv, rv, xv) = (host(w)?, host(r)?, host(&x)?);
    let bv = get(3).map(host).transpose()?;
    let h0 = get(5).map(host).transpose()?;
    let c0 = if op == "LSTM" {
        get(6).map(host).transpose()?
    } else {
        None
    };
    let peep = if op == "LSTM" {
        get(7).map(host).transpose()?
    } else {
        None
    };
    let lbr = attrs::int(node, "linear_before_reset", 0) != 0;
    let input_forget = attrs::int(node, "input_forget", 0) != 0;
    let mut y = vec![0f32; seq * dirs * batch * hidden];
    let (mut yh, mut yc) = (
        vec![0f32; dirs * batch * hidden],
        vec![0f32; dirs * batch * hidden],
    );
    for d in 0..dirs {
        let reverse = direction == "reverse" || (direction == "bidirectional" && d == 1);
        let acts: Vec<Box<dyn Fn(f32) -> f32>> = (0..per_dir)
            .map(|k| {
                let i = d * per_dir + k;
                let name = names.get(i).map(String::as_str).unwrap_or("Tanh");
                activation(
                    name,
                    alphas.as_ref().and_then(|a| a.get(i).copied()),
                    betas.as_ref().and_then(|b| b.get(i).copied()),
                )
            })
            .collect::<Result<_>>()?;
        let wd = &wv[d * gh * input..(d + 1) * gh * input];
        let rd = &rv[d * gh * hidden..(d + 1) * gh * hidden];
        let (wb, rb): (Vec<f32>, Vec<f32>) = match &bv {
            Some(b) => (
                b[d * 2 * gh..d * 2 * gh + gh].to_vec(),
                b[d * 2 * gh + gh..(d + 1) * 2 * gh].to_vec(),
            ),
            None => (vec![0.0; gh], vec![0.0; gh]),
        };
        // X·Wᵀ for every step and batch row at once.
        let xw = times_transposed(&xv, wd, input, gh);
        let mut h: Vec<f32> = match &h0 {
            Some(v) => v[d * batch * hidden..(d + 1) * batch * hidden].to_vec(),
            None => vec![0.0; batch * hidden],
        };
        let mut c: Vec<f32> = match &c0 {
            Some(v) => v[d * batch * hidden..(d + 1) * batch * hidden].to_vec(),
            None => vec![0.0; batch * hidden],
        };
        let p = peep
            .as_ref()
            .map(|p| &p[d * 3 * hidden..(d + 1) * 3 * hidden]);
        let clipped = |v: f32| clip.map_or(v, |cl| v.clamp(-cl, cl));
        for s in 0..seq {
            let hr = times_transposed(&h, rd, hidden, gh);
            for b in 0..batch {
                if s >= lens[b] {
                    continue; // past this sequence's end: state kept, output zero
                }
                let t = if reverse { lens[b] - 1 - s } else { s };
                let g = |k: usize, j: usize| {
                    xw[(t * batch + b) * gh + k * hidden + j] + wb[k * hidden + j]
                };
                let hrow = &hr[b * gh..(b + 1) * gh];
                let hb = b * hidden;
                let mut hn = vec![0f32; hidden];
                match op {
                    "LSTM" => {
                        for j in 0..hidden {
                            let pre =
                                |k: usize| g(k, j) + hrow[k * hidden + j] + rb[k * hidden + j];
                            let cp = c[hb + j];
                            let pi = p.map_or(0.0, |p| p[j] * cp);
                            let pf = p.map_or(0.0, |p| p[2 * hidden + j] * cp);
                            let i = acts[0](clipped(pre(0) + pi));
                            let f = if input_forget {
                                1.0 - i
                            } else {
                                acts[0](clipped(pre(2) + pf))
                            };
                            let cc = acts[1](clipped(pre(3)));
                            let cn = f * cp + i * cc;
                            let po = p.map_or(0.0, |p| p[hidden + j] * cn);
                            let o = acts[0](clipped(pre(1) + po));
                            hn[j] = o * acts[2](cn);
                            c[hb + j] = cn;
                        }
                    }
                    "GRU" => {
                        let rgate: Vec<f32> = (0..hidden)
                            .map(|j| acts[0](clipped(g(1, j) + hrow[hidden + j] + rb[hidden + j])))
                            .collect();
                        // (r ⊙ h)·Rhᵀ when the reset comes before the product.
                        let rh: Vec<f32> = if lbr {
                            Vec::new()
                        } else {
                            let gated: Vec<f32> =
                                (0..hidden).map(|j| rgate[j] * h[hb + j]).collect();
                            times_transposed(&gated, &rd[2 * hidden * hidden..], hidden, hidden)
                        };
                        for j in 0..hidden {
                            let z = acts[0](clipped(g(0, j) + hrow[j] + rb[j]));
                            let lin = if lbr {
                                rgate[j] * (hrow[2 * hidden + j] + rb[2 * hidden + j])
                            } else {
                                rh[j] + rb[2 * hidden + j]
                            };
                            let cand = acts[1](clipped(g(2, j) + lin));
                            hn[j] = (1.0 - z) * cand + z * h[hb + j];
                        }
                    }
                    _ => {
                        for (j, v) in hn.iter_mut().enumerate() {
                            *v = acts[0](clipped(g(0, j) + hrow[j] + rb[j]));
                        }
                    }
                }
                h[hb..hb + hidden].copy_from_slice(&hn);
                let at = ((t * dirs + d) * batch + b) * hidden;
                y[at..at + hidden].copy_from_slice(&hn);
            }
        }
        yh[d * batch * hidden..(d + 1) * batch * hidden].copy_from_slice(&h);
        yc[d * batch * hidden..(d + 1) * batch * hidden].copy_from_slice(&c);
    }
    let dt = x.dtype();
    let dev = x.device().clone();
    let make = |v: Vec<f32>, dims: Vec<usize>| -> Result<Tensor> {
        Tensor::from_vec(v, dims, &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(&dev)
    };
    let (y, yh, yc) = if layout == 1 {
        (
            make(y, vec![seq, dirs, batch, hidden])?
                .permute((2, 0, 1, 3))?
                .contiguous()?,
            make(yh, vec![dirs, batch, hidden])?
                .transpose(0, 1)?
                .contiguous()?,
            make(yc, vec![dirs, batch, hidden])?
                .transpose(0, 1)?
                .contiguous()?,
        )
    } else {
        (
            make(y, vec![seq, dirs, batch, hidden])?,
            make(yh, vec![dirs, batch, hidden])?,
            make(yc, vec![dirs, batch, hidden])?,
        )
    };
    Ok(if op == "LSTM" {
        vec![y, yh, yc]
    } else {
        vec![y, yh]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_onnx::onnx::{attribute_proto::AttributeType, AttributeProto};

    fn node(op: &str, direction: &str, hidden: i64) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            attribute: vec![
                AttributeProto {
                    name: "direction".into(),
                    r#type: AttributeType::String as i32,
                    s: direction.as_bytes().to_vec(),
                    ..Default::default()
                },
                AttributeProto {
                    name: "hidden_size".into(),
                    r#type: AttributeType::Int as i32,
                    i: hidden,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn t(dims: &[usize], seed: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((((i + seed) * 7) % 13) as f32 - 6.0) / 10.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn the_reverse_half_of_a_bidirectional_layer_reads_the_sequence_backwards() {
        let (seq, batch, input, hidden) = (5, 2, 3, 4);
        for (op, gates) in [("RNN", 1), ("GRU", 3), ("LSTM", 4)] {
            let x = t(&[seq, batch, input], 1);
            let w1 = t(&[1, gates * hidden, input], 2);
            let r1 = t(&[1, gates * hidden, hidden], 3);
            let w2 = Tensor::cat(&[&w1, &w1], 0).expect("w");
            let r2 = Tensor::cat(&[&r1, &r1], 0).expect("r");
            let bi = recurrent(
                &node(op, "bidirectional", hidden as i64),
                &[Some(x.clone()), Some(w2), Some(r2)],
            )
            .expect("bidirectional");
            let flipped = crate::ops_more::flip(&x, 0).expect("flip");
            let fwd = recurrent(
                &node(op, "forward", hidden as i64),
                &[Some(flipped), Some(w1), Some(r1)],
            )
            .expect("forward");
            // Y[t, 1] of the bidirectional run = Y[seq-1-t, 0] of the forward run on the
            // reversed input; the final states match too.
            let back = bi[0].narrow(1, 1, 1).expect("dir 1");
            let want = crate::ops_more::flip(&fwd[0], 0).expect("flip");
            let diff = (back - want)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>());
            assert!(diff.expect("diff") < 1e-5, "{op}");
            let diff = (bi[1].narrow(0, 1, 1).expect("h") - &fwd[1])
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>());
            assert!(diff.expect("diff") < 1e-5, "{op} Y_h");
        }
    }

    #[test]
    fn malformed_weights_are_an_error_not_a_panic() {
        let x = t(&[2, 1, 3], 1);
        let flat = t(&[4, 3], 2); // W without its direction axis
        let r = t(&[1, 4, 4], 3);
        let got = recurrent(&node("RNN", "forward", 4), &[Some(x), Some(flat), Some(r)]);
        assert!(got.is_err());
    }
}
