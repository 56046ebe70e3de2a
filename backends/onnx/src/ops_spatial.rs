//! Spatial sampling and rearrangement operators of detection and spatial-transformer
//! models: GridSample, AffineGrid, RoiAlign, MaxUnpool and Col2Im. They run on the host in
//! f64 and convert back.
use candle_core::{bail, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::ops::i64s;

/// GridSample (2-D and 3-D or more): `x` `[n, c, spatial...]` sampled at `grid`
/// `[n, out..., r]` (normalised coordinates, last spatial dimension first) with nearest,
/// (bi)linear or (bi)cubic interpolation and zeros / border / reflection padding.
pub fn grid_sample(node: &NodeProto, x: &Tensor, grid: &Tensor) -> Result<Tensor> {
    let r = x.rank().saturating_sub(2);
    if r == 0 || grid.rank() != r + 2 || grid.dims()[r + 1] != r || grid.dims()[0] != x.dims()[0] {
        bail!(
            "GridSample: grid {:?} does not fit input {:?}",
            grid.dims(),
            x.dims()
        )
    }
    let mode = attrs::string(node, "mode", "linear");
    let pad = attrs::string(node, "padding_mode", "zeros");
    let align = attrs::int(node, "align_corners", 0) != 0;
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let dims = &x.dims()[2..];
    let outs = &grid.dims()[1..=r];
    let (size_in, size_out) = (
        dims.iter().product::<usize>(),
        outs.iter().product::<usize>(),
    );
    let xv: Vec<f64> = crate::ops::f64s(x)?;
    let gv: Vec<f64> = crate::ops::f64s(grid)?;
    let (lo, hi): (Vec<f64>, Vec<f64>) = dims
        .iter()
        .map(|&d| {
            if align {
                (0.0, d as f64 - 1.0)
            } else {
                (-0.5, d as f64 - 0.5)
            }
        })
        .unzip();
    let reflect = |v: f64, lo: f64, hi: f64| {
        let span = hi - lo;
        if span <= 0.0 {
            return lo;
        }
        let (dist, from_lo) = if v < lo {
            (lo - v, true)
        } else if v > hi {
            (v - hi, false)
        } else {
            return v;
        };
        let flips = (dist / span) as i64;
        let rest = dist - flips as f64 * span;
        if (flips % 2 == 0) == from_lo {
            lo + rest
        } else {
            hi - rest
        }
    };
    // An integer index in dimension d after padding, or None (zeros outside).
    let index = |i: i64, d: usize| -> Option<usize> {
        let len = dims[d] as i64;
        match pad.as_str() {
            "border" => Some(i.clamp(0, len - 1) as usize),
            "reflection" => {
                Some((reflect(i as f64, lo[d], hi[d]) as i64).clamp(0, len - 1) as usize)
            }
            _ => (0..len).contains(&i).then_some(i as usize),
        }
    };
    let cubic = |t: f64| {
        let w = |x: f64| crate::resize::cubic(x as f32, -0.75) as f64;
        [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
    };
    let mut out = vec![0f64; n * c * size_out];
    for b in 0..n {
        for o in 0..size_out {
            let g = &gv[(b * size_out + o) * r..(b * size_out + o + 1) * r];
            // Per spatial dimension: the (index, weight) taps.
            let mut taps: Vec<Vec<(Option<usize>, f64)>> = Vec::with_capacity(r);
            for d in 0..r {
                let norm = g[r - 1 - d];
                let len = dims[d] as f64;
                // In f32, as the reference computes it (rounding ties depend on it).
                let (nf, lf) = (norm as f32, len as f32);
                let mut v = if align {
                    (nf + 1.0) / 2.0 * (lf - 1.0)
                } else {
                    ((nf + 1.0) * lf - 1.0) / 2.0
                } as f64;
                if mode == "nearest" {
                    // Ties to even, as the reference rounds (numpy's rint).
                    let f = v.round();
                    v = if (f - v).abs() == 0.5 {
                        2.0 * (v / 2.0).round()
                    } else {
                        f
                    };
                }
                if v < lo[d] || v > hi[d] {
                    v = match pad.as_str() {
                        "border" => v.clamp(0.0, len - 1.0),
                        "reflection" => reflect(v, lo[d], hi[d]),
                        _ => v,
                    };
                }
                let base = v.floor();
                let t = v - base;
                let i0 = base as i64;
                taps.push(match mode.as_str() {
                    "nearest" => vec![(index(v as i64, d), 1.0)],
                    "cubic" | "bicubic" => {
                        let w = cubic(t);
                        (0..4)
                            .map(|k| (index(i0 - 1 + k as i64, d), w[k]))
                            .collect()
                    }
                    _ => vec![(index(i0, d), 1.0 - t), (index(i0 + 1, d), t)],
                });
            }
            for ch in 0..c {
                let src = &xv[(b * c + ch) * size_in..(b * c + ch + 1) * size_in];
                // Sum over every combination of taps.
                let mut acc = 0.0;
                let mut pick = vec![0usize; r];
                loop {
                    let mut w = 1.0;
                    let mut at = Some(0usize);
                    for d in 0..r {
                        let (i, wd) = taps[d][pick[d]];
                        w *= wd;
                        at = match (at, i) {
                            (Some(a), Some(i)) => Some(a * dims[d] + i),
                            _ => None,
                        };
                    }
                    if let Some(a) = at {
                        acc += w * src[a];
                    }
                    let mut d = r;
                    loop {
                        if d == 0 {
                            break;
                        }
                        d -= 1;
                        pick[d] += 1;
                        if pick[d] < taps[d].len() {
                            break;
                        }
                        pick[d] = 0;
                        if d == 0 {
                            d = usize::MAX;
                            break;
                        }
                    }
                    if d == usize::MAX {
                        break;
                    }
                }
                out[(b * c + ch) * size_out + o] = acc;
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend(outs);
    crate::ops::like(out, shape, x)
}

/// AffineGrid(theta [n, r, r+1], size [n, c, spatial...]): the sampling grid
/// `[n, spatial..., r]` (x first) of each affine transform, for GridSample.
pub fn affine_grid(node: &NodeProto, theta: &Tensor, size: &Tensor) -> Result<Tensor> {
    let size: Vec<usize> = i64s(size)?.iter().map(|&v| v.max(0) as usize).collect();
    let r = size.len().saturating_sub(2);
    let n = *size.first().unwrap_or(&0);
    if r == 0 || theta.dims() != [n, r, r + 1] {
        bail!(
            "AffineGrid: theta {:?} does not fit size {size:?}",
            theta.dims()
        )
    }
    let align = attrs::int(node, "align_corners", 0) != 0;
    let spatial = &size[2..];
    let th: Vec<f64> = crate::ops::f64s(theta)?;
    // Normalised coordinate of index i of an axis of length len.
    let coord = |i: usize, len: usize| {
        if align {
            if len <= 1 {
                0.0
            } else {
                -1.0 + 2.0 * i as f64 / (len - 1) as f64
            }
        } else {
            (2.0 * i as f64 + 1.0) / len as f64 - 1.0
        }
    };
    let points: usize = spatial.iter().product();
    let mut out = Vec::with_capacity(n * points * r);
    for b in 0..n {
        let t = &th[b * r * (r + 1)..(b + 1) * r * (r + 1)];
        for p in 0..points {
            // Spatial index (last axis fastest) → base point (x = last axis first).
            let mut rest = p;
            let mut base = vec![0f64; r];
            for d in (0..r).rev() {
                base[r - 1 - d] = coord(rest % spatial[d], spatial[d]);
                rest /= spatial[d];
            }
            for row in 0..r {
                let m = &t[row * (r + 1)..(row + 1) * (r + 1)];
                out.push((0..r).map(|k| m[k] * base[k]).sum::<f64>() + m[r]);
            }
        }
    }
    let mut shape = vec![n];
    shape.extend(spatial);
    shape.push(r);
    crate::ops::like(out, shape, theta)
}

/// MaxUnpool(x, indices, output_shape?): zeros with each value of `x` written at its flat
/// index (as MaxPool's Indices output gives it).
pub fn max_unpool(
    node: &NodeProto,
    x: &Tensor,
    idx: &Tensor,
    out_shape: Option<&Tensor>,
) -> Result<Tensor> {
    // The indices are positions in the shape the pooling came from (inferred from the
    // window); an explicit output_shape places each at the same coordinates in it.
    let w = crate::pool::window(node, &x.dims()[2..], None)?;
    let mut inferred = x.dims()[..2].to_vec();
    for d in 0..w.input.len() {
        let span = (w.input[d].max(1) - 1) * w.stride[d] + w.kernel[d];
        inferred.push(span.saturating_sub(w.pads[d].0 + w.pads[d].1));
    }
    let shape: Vec<usize> = match out_shape.filter(|t| t.elem_count() > 0) {
        Some(s) => i64s(s)?.iter().map(|&v| v.max(0) as usize).collect(),
        None => inferred.clone(),
    };
    if shape.len() != inferred.len() {
        bail!("MaxUnpool: output_shape {shape:?} has a different rank than the input")
    }
    let remap = |i: usize| -> Option<usize> {
        if shape == inferred {
            return Some(i);
        }
        let (mut rem, mut flat) = (i, 0usize);
        let mut coords = vec![0usize; shape.len()];
        for d in (0..shape.len()).rev() {
            coords[d] = rem % inferred[d].max(1);
            rem /= inferred[d].max(1);
        }
        for (d, &c) in coords.iter().enumerate() {
            if c >= shape[d] {
                return None;
            }
            flat = flat * shape[d] + c;
        }
        Some(flat)
    };
    let total: usize = shape.iter().product();
    let vals: Vec<f64> = crate::ops::f64s(x)?;
    let mut out = vec![0f64; total];
    for (&i, &v) in i64s(idx)?.iter().zip(&vals) {
        match usize::try_from(i)
            .ok()
            .and_then(remap)
            .filter(|&i| i < total)
        {
            Some(i) => out[i] = v,
            None => bail!("MaxUnpool: index {i} outside the output of {total} values"),
        }
    }
    crate::ops::like(out, shape, x)
}

/// Col2Im(input [n, c·prod(block), l], image_shape, block_shape): the blocks summed back
/// into `[n, c, image...]` (dilations, pads, strides as for a convolution).
pub fn col2im(node: &NodeProto, x: &Tensor, image: &Tensor, block: &Tensor) -> Result<Tensor> {
    let image: Vec<usize> = i64s(image)?.iter().map(|&v| v.max(0) as usize).collect();
    let block: Vec<usize> = i64s(block)?.iter().map(|&v| v.max(1) as usize).collect();
    let r = image.len();
    let ints = |name: &str, default: usize, len: usize| -> Vec<usize> {
        attrs::ints(node, name).map_or(vec![default; len], |v| {
            v.iter().map(|&x| x.max(0) as usize).collect()
        })
    };
    let (dil, pads, strides) = (
        ints("dilations", 1, r),
        ints("pads", 0, 2 * r),
        ints("strides", 1, r),
    );
    if dil.len() != r || pads.len() != 2 * r || strides.len() != r || strides.contains(&0) {
        bail!("Col2Im: dilations, pads and strides must fit {r} spatial dimensions")
    }
    let (n, ck, l) = x.dims3()?;
    let taps: usize = block.iter().product();
    if block.len() != r || ck % taps != 0 {
        bail!("Col2Im: block {block:?} does not fit input {:?}", x.dims())
    }
    let c = ck / taps;
    // Blocks per spatial dimension.
    let counts: Vec<usize> = (0..r)
        .map(|d| (image[d] + pads[d] + pads[r + d] - dil[d] * (block[d] - 1) - 1) / strides[d] + 1)
        .collect();
    if counts.iter().product::<usize>() != l {
        bail!("Col2Im: {l} blocks do not fit image {image:?}")
    }
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let size: usize = image.iter().product();
    let mut out = vec![0f64; n * c * size];
    for b in 0..n {
        for ch in 0..c {
            for tap in 0..taps {
                let row = (b * ck + ch * taps + tap) * l;
                let mut k = vec![0usize; r];
                let mut rest = tap;
                for d in (0..r).rev() {
                    k[d] = rest % block[d];
                    rest /= block[d];
                }
                for j in 0..l {
                    let (mut rest, mut at, mut inside) = (j, 0usize, true);
                    let mut pos = vec![0usize; r];
                    for d in (0..r).rev() {
                        pos[d] = rest % counts[d];
                        rest /= counts[d];
                    }
                    for d in 0..r {
                        let o = (pos[d] * strides[d] + k[d] * dil[d]) as i64 - pads[d] as i64;
                        if o < 0 || o >= image[d] as i64 {
                            inside = false;
                            break;
                        }
                        at = at * image[d] + o as usize;
                    }
                    if inside {
                        out[(b * c + ch) * size + at] += v[row + j];
                    }
                }
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend(&image);
    crate::ops::like(out, shape, x)
}

/// RoiAlign(`x [n, c, h, w]`, `rois [r, 4]` (x1, y1, x2, y2), `batch_indices [r]`) → `[r, c,
/// output_height, output_width]`: each bin is the average (or, as onnxruntime defines
/// `max`, the largest weighted corner) of bilinear samples on a regular grid.
pub fn roi_align(node: &NodeProto, x: &Tensor, rois: &Tensor, batch: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (r, four) = rois.dims2()?;
    if four != 4 {
        bail!("RoiAlign: rois must be [R, 4], got {:?}", rois.dims())
    }
    let oh = attrs::int(node, "output_height", 1).max(1) as usize;
    let ow = attrs::int(node, "output_width", 1).max(1) as usize;
    let ratio = attrs::int(node, "sampling_ratio", 0).max(0) as usize;
    let scale = attrs::float(node, "spatial_scale", 1.0) as f64;
    let half = attrs::string(node, "coordinate_transformation_mode", "half_pixel") == "half_pixel";
    let max_mode = attrs::string(node, "mode", "avg") == "max";
    let xv: Vec<f64> = crate::ops::f64s(x)?;
    let rv: Vec<f64> = crate::ops::f64s(rois)?;
    let bv = i64s(batch)?;
    let mut out = vec![0f64; r * c * oh * ow];
    let offset = if half { 0.5 } else { 0.0 };
    for k in 0..r {
        let b = bv.get(k).copied().unwrap_or(0);
        if !(0..n as i64).contains(&b) {
            bail!("RoiAlign: batch index {b} out of range")
        }
        let roi = &rv[k * 4..k * 4 + 4];
        let (sx, sy) = (roi[0] * scale - offset, roi[1] * scale - offset);
        let (mut rw, mut rh) = (roi[2] * scale - offset - sx, roi[3] * scale - offset - sy);
        if !half {
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bh, bw) = (rh / oh as f64, rw / ow as f64);
        let gh = if ratio > 0 {
            ratio
        } else {
            (rh / oh as f64).ceil() as usize
        };
        let gw = if ratio > 0 {
            ratio
        } else {
            (rw / ow as f64).ceil() as usize
        };
        let count = (gh * gw).max(1) as f64;
        // Along one axis of `len`: the two neighbouring indices and the weight of the second
        // (a coordinate past the last index sticks to it).
        let axis = |v: f64, len: usize| {
            let v = v.max(0.0);
            let lo = v.floor() as usize;
            if lo >= len - 1 {
                (len - 1, len - 1, 0.0)
            } else {
                (lo, lo + 1, v - lo as f64)
            }
        };
        // Bilinear corners and weights of one sample (None outside the image).
        let corners = |yy: f64, xx: f64| -> Option<[(usize, f64); 4]> {
            if yy < -1.0 || yy > h as f64 || xx < -1.0 || xx > w as f64 {
                return None;
            }
            let ((y0, y1, ly), (x0, x1, lx)) = (axis(yy, h), axis(xx, w));
            let (hy, hx) = (1.0 - ly, 1.0 - lx);
            Some([
                (y0 * w + x0, hy * hx),
                (y0 * w + x1, hy * lx),
                (y1 * w + x0, ly * hx),
                (y1 * w + x1, ly * lx),
            ])
        };
        for ch in 0..c {
            let plane = &xv[(b as usize * c + ch) * h * w..(b as usize * c + ch + 1) * h * w];
            for py in 0..oh {
                for px in 0..ow {
                    let mut acc = if max_mode { f64::NEG_INFINITY } else { 0.0 };
                    let mut any = false;
                    for iy in 0..gh {
                        let yy = sy + py as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = sx + px as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            let Some(cs) = corners(yy, xx) else {
                                if max_mode {
                                    acc = acc.max(0.0);
                                    any = true;
                                }
                                continue;
                            };
                            if max_mode {
                                let m = cs
                                    .iter()
                                    .map(|&(i, wt)| wt * plane[i])
                                    .fold(f64::NEG_INFINITY, f64::max);
                                acc = acc.max(m);
                                any = true;
                            } else {
                                acc += cs.iter().map(|&(i, wt)| wt * plane[i]).sum::<f64>();
                            }
                        }
                    }
                    out[((k * c + ch) * oh + py) * ow + px] = if max_mode {
                        if any {
                            acc
                        } else {
                            0.0
                        }
                    } else {
                        acc / count
                    };
                }
            }
        }
    }
    crate::ops::like(out, (r, c, oh, ow), x)
}
