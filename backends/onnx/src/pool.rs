//! ONNX `MaxPool` and `AveragePool` in 1, 2 or 3 (any number of) spatial dimensions, with
//! strides, dilations, explicit pads, `auto_pad` (`SAME_UPPER`, `SAME_LOWER`, `VALID`),
//! `ceil_mode` and `count_include_pad`. Values are computed in f32 per (image, channel)
//! plane, planes split over threads.
use candle_core::{bail, DType, Result, Tensor};
use candle_onnx::onnx::NodeProto;
use rayon::prelude::*;

use crate::attrs;

/// The geometry of one pooling (or convolution) over `n` spatial dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Input extent per spatial dimension.
    pub input: Vec<usize>,
    /// Kernel extent.
    pub kernel: Vec<usize>,
    /// Stride.
    pub stride: Vec<usize>,
    /// Dilation.
    pub dilation: Vec<usize>,
    /// Padding before and after each dimension.
    pub pads: Vec<(usize, usize)>,
    /// Output extent.
    pub output: Vec<usize>,
}

/// Reads a node's `kernel_shape` (or `kernel` when given), `strides`, `dilations`, `pads`,
/// `auto_pad` and (for pooling) `ceil_mode`, and derives the output extent as ONNX defines it.
pub fn window(node: &NodeProto, input: &[usize], kernel: Option<Vec<usize>>) -> Result<Window> {
    let n = input.len();
    let op = &node.op_type;
    let kernel = match kernel {
        Some(k) => k,
        None => attrs::ints(node, "kernel_shape")
            .unwrap_or_default()
            .iter()
            .map(|&v| v.max(0) as usize)
            .collect(),
    };
    let list = |name: &str, default: usize, len: usize| -> Result<Vec<usize>> {
        match attrs::ints(node, name) {
            Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => {
                Ok(v.iter().map(|&x| x as usize).collect())
            }
            Some(v) => bail!("{op}: attribute {name} {v:?} does not fit {n} spatial dimensions"),
            None => Ok(vec![default; len]),
        }
    };
    if kernel.len() != n || kernel.contains(&0) {
        bail!("{op}: kernel {kernel:?} does not fit {n} spatial dimensions")
    }
    let stride = list("strides", 1, n)?;
    let dilation = list("dilations", 1, n)?;
    if stride.contains(&0) || dilation.contains(&0) {
        bail!("{op}: strides and dilations must be positive")
    }
    let explicit = list("pads", 0, 2 * n)?;
    let ceil = attrs::int(node, "ceil_mode", 0) != 0;
    let auto = attrs::string(node, "auto_pad", "NOTSET");
    let mut pads = Vec::with_capacity(n);
    let mut output = Vec::with_capacity(n);
    for d in 0..n {
        let span = (kernel[d] - 1) * dilation[d] + 1;
        let (i, s) = (input[d], stride[d]);
        match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let out = i.div_ceil(s);
                let total = ((out.max(1) - 1) * s + span).saturating_sub(i);
                let small = total / 2;
                pads.push(if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                });
                output.push(out);
            }
            "VALID" | "NOTSET" => {
                let (b, e) = if auto == "VALID" {
                    (0, 0)
                } else {
                    (explicit[d], explicit[n + d])
                };
                let Some(room) = (i + b + e).checked_sub(span) else {
                    bail!(
                        "{op}: the window ({span}) is larger than the padded input ({})",
                        i + b + e
                    )
                };
                let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
                // The last window must start inside the input or its leading padding.
                if ceil && (out - 1) * s >= i + b {
                    out -= 1;
                }
                pads.push((b, e));
                output.push(out);
            }
            other => {
                bail!("{op}: auto_pad {other} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
            }
        }
    }
    Ok(Window {
        input: input.to_vec(),
        kernel,
        stride,
        dilation,
        pads,
        output,
    })
}

impl Window {
    /// Calls `f` with the flat index (row-major within one plane) of every position of the
    /// window of output position `o` that lies inside the input; `k` is scratch.
    fn for_each_tap(&self, o: &[usize], k: &mut [usize], mut f: impl FnMut(usize)) {
        let n = self.input.len();
        let taps: usize = self.kernel.iter().product();
        k.iter_mut().for_each(|x| *x = 0);
        for _ in 0..taps {
            let mut at = 0usize;
            let mut inside = true;
            for d in 0..n {
                let c = (o[d] * self.stride[d] + k[d] * self.dilation[d]) as isize
                    - self.pads[d].0 as isize;
                if c < 0 || c >= self.input[d] as isize {
                    inside = false;
                } else {
                    at = at * self.input[d] + c as usize;
                }
            }
            if inside {
                f(at);
            }
            // Next kernel position (last dimension fastest).
            for d in (0..n).rev() {
                k[d] += 1;
                if k[d] < self.kernel[d] {
                    break;
                }
                k[d] = 0;
            }
        }
    }

    /// Runs `f(plane, src, output position, out value, out index)` for every output element,
    /// planes in parallel.
    fn each_output(
        &self,
        x: &[f32],
        planes: usize,
        f: impl Fn(&[f32], &[usize], &mut [usize], &mut f32, &mut i64) + Sync,
    ) -> (Vec<f32>, Vec<i64>) {
        let (size_in, size_out) = (
            self.input.iter().product::<usize>(),
            self.output.iter().product::<usize>(),
        );
        let mut out = vec![0f32; planes * size_out];
        let mut idx = vec![0i64; planes * size_out];
        if size_out == 0 {
            return (out, idx);
        }
        out.par_chunks_mut(size_out)
            .zip(idx.par_chunks_mut(size_out))
            .enumerate()
            .for_each(|(p, (dst, ids))| {
                let src = &x[p * size_in..(p + 1) * size_in];
                let n = self.input.len();
                let (mut o, mut k) = (vec![0usize; n], vec![0usize; n]);
                for (v, i) in dst.iter_mut().zip(ids.iter_mut()) {
                    f(src, &o, &mut k, v, i);
                    *i += (p * size_in) as i64;
                    for d in (0..n).rev() {
                        o[d] += 1;
                        if o[d] < self.output[d] {
                            break;
                        }
                        o[d] = 0;
                    }
                }
            });
        (out, idx)
    }

    /// Pools every plane of `x` (`planes × prod(input)` values): the maximum, or the mean
    /// over the window's positions inside the input (or over all its positions with
    /// `include_pad`).
    pub fn pool(&self, x: &[f32], planes: usize, max: bool, include_pad: bool) -> Vec<f32> {
        let taps: usize = self.kernel.iter().product();
        self.each_output(x, planes, |src, o, k, v, _| {
            let (mut acc, mut count) = (if max { f32::NEG_INFINITY } else { 0.0 }, 0);
            self.for_each_tap(o, k, |at| {
                let s = src[at];
                acc = if max { acc.max(s) } else { acc + s };
                count += 1;
            });
            *v = if max {
                acc
            } else {
                // With pads counted, every kernel position counts (also those a ceil_mode
                // window has beyond the padding, as ONNX's reference does).
                let div = if include_pad { taps } else { count };
                if div == 0 {
                    0.0
                } else {
                    acc / div as f32
                }
            };
        })
        .0
    }

    /// MaxPool with its Indices output: each maximum's position in the flattened input
    /// (the first one on ties), its spatial part row-major, or column-major with
    /// `column_major` (ONNX's `storage_order` 1).
    pub fn max_with_indices(
        &self,
        x: &[f32],
        planes: usize,
        column_major: bool,
    ) -> (Vec<f32>, Vec<i64>) {
        self.each_output(x, planes, |src, o, k, v, i| {
            let (mut best, mut at_best) = (f32::NEG_INFINITY, None);
            self.for_each_tap(o, k, |at| {
                if at_best.is_none() || src[at] > best {
                    best = src[at];
                    at_best = Some(at);
                }
            });
            *v = best;
            let at = at_best.unwrap_or(0);
            *i = if column_major {
                // Re-read the row-major position as column-major (first axis fastest).
                let (mut rem, mut flat, mut scale) = (at, 0, 1);
                let mut coords = vec![0usize; self.input.len()];
                for d in (0..self.input.len()).rev() {
                    coords[d] = rem % self.input[d];
                    rem /= self.input[d];
                }
                for (d, &c) in coords.iter().enumerate() {
                    flat += c * scale;
                    scale *= self.input[d];
                }
                flat as i64
            } else {
                at as i64
            };
        })
    }
}

/// `MaxPool` (with its Indices output when the node has one) or `AveragePool` on `x`
/// (`[n, c, spatial...]`).
pub fn pool(node: &NodeProto, x: &Tensor) -> Result<Vec<Tensor>> {
    let op = node.op_type.as_str();
    if x.rank() < 3 {
        bail!("{op}: the input needs a batch, a channel and at least one spatial dimension")
    }
    if op == "MaxPool" && node.output.get(1).is_some_and(|o| !o.is_empty()) {
        let w = window(node, &x.dims()[2..], None)?;
        let planes = x.dims()[0] * x.dims()[1];
        let data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let column_major = attrs::int(node, "storage_order", 0) == 1;
        let (out, idx) = w.max_with_indices(&data, planes, column_major);
        let mut dims = x.dims()[..2].to_vec();
        dims.extend(&w.output);
        let indices = Tensor::from_vec(idx, dims.clone(), &candle_core::Device::Cpu)?;
        return Ok(vec![
            crate::ops::like(out, dims, x)?,
            indices.to_device(x.device())?,
        ]);
    }
    let w = window(node, &x.dims()[2..], None)?;
    let planes = x.dims()[0] * x.dims()[1];
    let data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let include_pad = attrs::int(node, "count_include_pad", 0) != 0;
    let out = w.pool(&data, planes, op == "MaxPool", include_pad);
    let mut dims = x.dims()[..2].to_vec();
    dims.extend(&w.output);
    Ok(vec![crate::ops::like(out, dims, x)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_onnx::onnx::{attribute_proto::AttributeType, AttributeProto};

    fn node(op: &str, attrs: &[(&str, Vec<i64>)], auto: Option<&str>) -> NodeProto {
        let mut n = NodeProto {
            op_type: op.into(),
            ..Default::default()
        };
        for (name, v) in attrs {
            n.attribute.push(AttributeProto {
                name: name.to_string(),
                r#type: AttributeType::Ints as i32,
                ints: v.clone(),
                ..Default::default()
            });
        }
        if let Some(a) = auto {
            n.attribute.push(AttributeProto {
                name: "auto_pad".into(),
                r#type: AttributeType::String as i32,
                s: a.as_bytes().to_vec(),
                ..Default::default()
            });
        }
        n
    }

    #[test]
    fn same_padding_and_ceil_mode_give_onnx_output_sizes() {
        // SAME_UPPER: out = ceil(in / stride), the odd pad goes at the end.
        let n = node(
            "MaxPool",
            &[("kernel_shape", vec![3, 2]), ("strides", vec![2, 2])],
            Some("SAME_UPPER"),
        );
        let w = window(&n, &[5, 4], None).expect("window");
        assert_eq!(w.output, vec![3, 2]);
        assert_eq!(w.pads, vec![(1, 1), (0, 0)]);
        let n = node(
            "MaxPool",
            &[("kernel_shape", vec![2]), ("strides", vec![1])],
            Some("SAME_LOWER"),
        );
        assert_eq!(window(&n, &[4], None).expect("window").pads, vec![(1, 0)]);
        // ceil_mode: 4 inputs, kernel 2, stride 3 → windows at 0 and 3.
        let mut n = node(
            "MaxPool",
            &[("kernel_shape", vec![2]), ("strides", vec![3])],
            None,
        );
        assert_eq!(window(&n, &[4], None).expect("window").output, vec![1]);
        n.attribute.push(AttributeProto {
            name: "ceil_mode".into(),
            r#type: AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        });
        assert_eq!(window(&n, &[4], None).expect("window").output, vec![2]);
    }

    #[test]
    fn average_counts_pads_only_when_asked_and_max_ignores_them() {
        // 1-D [1, 2, 3], kernel 2, pads (1, 1): windows [pad,1], [2,3]... stride 2.
        let n = node(
            "AveragePool",
            &[
                ("kernel_shape", vec![2]),
                ("strides", vec![2]),
                ("pads", vec![1, 1]),
            ],
            None,
        );
        let w = window(&n, &[3], None).expect("window");
        assert_eq!(w.output, vec![2]);
        let x = [1.0, 2.0, 3.0];
        assert_eq!(w.pool(&x, 1, false, false), vec![1.0, 2.5]);
        assert_eq!(w.pool(&x, 1, false, true), vec![0.5, 2.5]);
        assert_eq!(
            w.pool(&[-1.0, -2.0, -3.0], 1, true, false),
            vec![-1.0, -2.0]
        );
    }
}
