//! ONNX `Resize` (opsets 10–19) and the older `Upsample`: nearest, linear and cubic
//! interpolation, every coordinate transformation mode, `exclude_outside`, antialiasing,
//! `axes` and `keep_aspect_ratio_policy`. Interpolation is separable, so it runs one axis at
//! a time: each output index along an axis is a weighted sum of a few input indices.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;

/// How an output coordinate maps back to the input and how values are combined.
struct Mode {
    interp: String,
    coord: String,
    nearest: String,
    cubic_a: f32,
    exclude_outside: bool,
    antialias: bool,
    extrapolation: f32,
}

/// One axis's plan: for each output index, the (input index, weight) pairs, or `None` where
/// `tf_crop_and_resize` maps outside the input (the extrapolation value goes there).
type AxisPlan = Vec<Option<Vec<(usize, f32)>>>;

/// Keys' cubic convolution kernel with parameter `a` (ONNX uses -0.75 by default).
pub fn cubic(x: f32, a: f32) -> f32 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// The input coordinate of output index `x` (None: outside, for tf_crop_and_resize).
fn source(
    m: &Mode,
    x: f32,
    len_in: usize,
    out_int: usize,
    scale: f32,
    roi: (f32, f32),
) -> Option<f32> {
    let (lin, out) = (len_in as f32, scale * len_in as f32);
    Some(match m.coord.as_str() {
        // onnxruntime divides by the whole output length (ONNX's reference by scale · input
        // length, which differs when that is not whole): Triton's results are onnxruntime's.
        "align_corners" if out_int <= 1 => 0.0,
        "align_corners" => x * (lin - 1.0) / (out_int as f32 - 1.0),
        "asymmetric" => x / scale,
        "pytorch_half_pixel" if out == 1.0 => -0.5,
        "half_pixel_symmetric" => {
            let offset = lin / 2.0 * (1.0 - out_int as f32 / out);
            offset + (x + 0.5) / scale - 0.5
        }
        "tf_crop_and_resize" => {
            let v = if out == 1.0 {
                (roi.1 - roi.0) * (lin - 1.0) / 2.0
            } else {
                x * (roi.1 - roi.0) * (lin - 1.0) / (out - 1.0)
            } + roi.0 * (lin - 1.0);
            if v < 0.0 || v > lin - 1.0 {
                return None;
            }
            v
        }
        _ => (x + 0.5) / scale - 0.5, // half_pixel and pytorch_half_pixel
    })
}

fn axis_plan(m: &Mode, len_in: usize, len_out: usize, scale: f32, roi: (f32, f32)) -> AxisPlan {
    let clamp = |i: isize| i.clamp(0, len_in as isize - 1) as usize;
    (0..len_out)
        .map(|o| {
            let x = source(m, o as f32, len_in, len_out, scale, roi)?;
            // The pixel left of x is preferred: an integer x counts as the previous index
            // plus a full step.
            let (mut base, mut t) = (x.floor(), x - x.floor());
            if t == 0.0 {
                base -= 1.0;
                t = 1.0;
            }
            let base = base as isize;
            if m.interp == "nearest" {
                let up = match m.nearest.as_str() {
                    _ if t == 1.0 => true,
                    "round_prefer_ceil" => t >= 0.5,
                    "floor" => false,
                    "ceil" => true,
                    _ => t > 0.5, // round_prefer_floor
                };
                return Some(vec![(clamp(base + up as isize), 1.0)]);
            }
            // Coefficients over neighbours base-(n/2-1) ..= base+n/2.
            let s = if m.antialias { scale.min(1.0) } else { 1.0 };
            let (first, coeffs): (isize, Vec<f32>) = if m.interp == "cubic" {
                let start = (-2.0 / s).floor() as isize + 1;
                let c = (start..2 - start)
                    .map(|i| cubic(s * (i as f32 - t), m.cubic_a))
                    .collect();
                (start, c)
            } else {
                let start = (-1.0 / s).floor() as isize + 1;
                let c = (start..2 - start)
                    .map(|i| (1.0 - ((i as f32 - t) * s).abs()).clamp(0.0, 1.0))
                    .collect();
                (start, c)
            };
            let mut taps: Vec<(isize, f32)> = coeffs
                .into_iter()
                .enumerate()
                .map(|(k, c)| (base + first + k as isize, c))
                .collect();
            if m.exclude_outside {
                taps.retain(|&(i, _)| i >= 0 && i < len_in as isize);
            }
            let sum: f32 = taps.iter().map(|t| t.1).sum();
            let norm = if m.antialias || m.exclude_outside {
                sum
            } else {
                1.0
            };
            Some(
                taps.into_iter()
                    .map(|(i, c)| (clamp(i), c / norm))
                    .collect(),
            )
        })
        .collect()
}

/// Interpolates `data` (`dims`) along `axis` with `plan`.
fn apply(data: &[f32], dims: &[usize], axis: usize, plan: &AxisPlan, fill: f32) -> Vec<f32> {
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let len_in = dims[axis];
    let mut out = vec![0f32; outer * plan.len() * inner];
    for b in 0..outer {
        let src = &data[b * len_in * inner..(b + 1) * len_in * inner];
        for (o, taps) in plan.iter().enumerate() {
            let dst = &mut out[(b * plan.len() + o) * inner..(b * plan.len() + o + 1) * inner];
            match taps {
                None => dst.fill(fill),
                Some(taps) => {
                    for &(i, w) in taps {
                        for (d, s) in dst.iter_mut().zip(&src[i * inner..(i + 1) * inner]) {
                            *d += w * s;
                        }
                    }
                }
            }
        }
    }
    out
}

/// A float-list input, if present and not empty.
fn floats(t: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    match t {
        Some(t) if t.elem_count() > 0 => {
            Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
        }
        _ => Ok(None),
    }
}

/// Runs `Resize` (or `Upsample`) on `ins`.
pub fn resize(node: &NodeProto, ins: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let Some(x) = ins.first().and_then(|t| t.as_ref()) else {
        bail!("{}: input X is missing", node.op_type)
    };
    let legacy = node.op_type == "Upsample" || opset < 11;
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (roi, scales, sizes) = if legacy {
        (None, floats(get(1))?, None)
    } else {
        let sizes = match get(3) {
            Some(t) if t.elem_count() > 0 => Some(crate::ops::i64s(t)?),
            _ => None,
        };
        (floats(get(1))?, floats(get(2))?, sizes)
    };
    let m = Mode {
        interp: attrs::string(node, "mode", "nearest"),
        coord: if legacy {
            "asymmetric".into()
        } else {
            attrs::string(node, "coordinate_transformation_mode", "half_pixel")
        },
        nearest: if legacy {
            "floor".into()
        } else {
            attrs::string(node, "nearest_mode", "round_prefer_floor")
        },
        cubic_a: attrs::float(node, "cubic_coeff_a", -0.75),
        exclude_outside: attrs::int(node, "exclude_outside", 0) != 0,
        antialias: attrs::int(node, "antialias", 0) != 0,
        extrapolation: attrs::float(node, "extrapolation_value", 0.0),
    };
    let rank = x.rank();
    let axes: Vec<usize> = match attrs::ints(node, "axes") {
        Some(a) => a
            .iter()
            .map(|&v| if v < 0 { v + rank as i64 } else { v } as usize)
            .collect(),
        None => (0..rank).collect(),
    };
    if axes.iter().any(|&a| a >= rank) {
        bail!("Resize: axes {axes:?} out of range for rank {rank}")
    }
    let dims_in = x.dims().to_vec();
    let mut scale = vec![1f32; rank];
    let mut out = dims_in.clone();
    match (&scales, &sizes) {
        (_, Some(sizes)) => {
            if sizes.len() != axes.len() {
                bail!("Resize: {} sizes for {} axes", sizes.len(), axes.len())
            }
            let ratio = |k: usize| sizes[k] as f32 / dims_in[axes[k]] as f32;
            let policy = attrs::string(node, "keep_aspect_ratio_policy", "stretch");
            let pick = match policy.as_str() {
                "not_larger" => (0..axes.len()).map(ratio).reduce(f32::min),
                "not_smaller" => (0..axes.len()).map(ratio).reduce(f32::max),
                _ => None,
            };
            for (k, &a) in axes.iter().enumerate() {
                match pick {
                    Some(r) => {
                        out[a] = (r * dims_in[a] as f32).round() as usize;
                        scale[a] = r;
                    }
                    None => {
                        out[a] = sizes[k].max(0) as usize;
                        scale[a] = ratio(k);
                    }
                }
            }
        }
        (Some(s), None) => {
            if s.len() != axes.len() {
                bail!("Resize: {} scales for {} axes", s.len(), axes.len())
            }
            for (k, &a) in axes.iter().enumerate() {
                scale[a] = s[k];
                out[a] = (dims_in[a] as f32 * s[k]).floor() as usize;
            }
        }
        (None, None) => bail!("Resize: neither scales nor sizes given"),
    }
    crate::size_guard::check(&out, x.dtype().size_in_bytes())?;
    let roi_of = |a: usize| -> (f32, f32) {
        match &roi {
            Some(r) if r.len() == 2 * axes.len() => {
                let k = axes.iter().position(|&b| b == a).unwrap_or(0);
                (r[k], r[axes.len() + k])
            }
            _ => (0.0, 1.0),
        }
    };
    let dtype = x.dtype();
    let mut data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut dims = dims_in.clone();
    for a in 0..rank {
        if out[a] == dims[a] && scale[a] == 1.0 && m.coord != "tf_crop_and_resize" {
            continue;
        }
        if dims[a] == 0 {
            bail!("Resize: cannot resize an empty axis")
        }
        let plan = axis_plan(&m, dims[a], out[a], scale[a], roi_of(a));
        data = apply(&data, &dims, a, &plan, m.extrapolation);
        dims[a] = out[a];
    }
    let t = Tensor::from_vec(data, dims, &Device::Cpu)?;
    let t = if dtype.is_float() { t } else { t.round()? };
    t.to_dtype(dtype)?.to_device(x.device())
}
