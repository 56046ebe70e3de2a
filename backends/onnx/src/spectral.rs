//! ONNX `DFT` and `STFT`: discrete Fourier transforms computed directly (O(n²) per signal,
//! in f64 on the host) — enough for feature extraction at audio frame sizes. Complex values
//! are a trailing axis of 2 (real, imaginary); a real input has a trailing axis of 1.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::ops::{axis, i64s};

/// The DFT of one complex signal `x` (pairs), `n` points out (zero-padded or truncated
/// input), the first `keep` frequencies.
fn dft1(x: &[(f64, f64)], n: usize, keep: usize, inverse: bool) -> Vec<(f64, f64)> {
    let sign = if inverse { 1.0 } else { -1.0 };
    let len = x.len().min(n);
    (0..keep)
        .map(|k| {
            let (mut re, mut im) = (0.0, 0.0);
            for (j, &(a, b)) in x.iter().take(len).enumerate() {
                let ang = sign * std::f64::consts::TAU * ((j * k) % n) as f64 / n as f64;
                let (s, c) = ang.sin_cos();
                re += a * c - b * s;
                im += a * s + b * c;
            }
            if inverse {
                (re / n as f64, im / n as f64)
            } else {
                (re, im)
            }
        })
        .collect()
}

/// DFT(input, dft_length?, axis?) with `inverse` and `onesided`.
pub fn dft(node: &NodeProto, ins: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .filter(|t| t.elem_count() > 0)
    };
    let Some(x) = get(0) else {
        bail!("DFT: input missing")
    };
    let rank = x.rank();
    let comp = x.dims().last().copied().unwrap_or(0);
    if rank < 2 || !(comp == 1 || comp == 2) {
        bail!(
            "DFT: the last axis must hold 1 (real) or 2 (complex) values, got {:?}",
            x.dims()
        )
    }
    // The transformed axis: attribute before opset 20 (default 1), input 2 since (default -2).
    let a = if opset < 20 {
        axis(attrs::int(node, "axis", 1), rank)?
    } else {
        let v = match get(2) {
            Some(t) => *i64s(t)?.first().unwrap_or(&-2),
            None => -2,
        };
        axis(v, rank)?
    };
    if a == rank - 1 {
        bail!("DFT: the axis cannot be the complex axis")
    }
    let len = x.dims()[a];
    let n = match get(1) {
        Some(t) => (*i64s(t)?.first().unwrap_or(&(len as i64))).max(1) as usize,
        None => len,
    };
    let inverse = attrs::int(node, "inverse", 0) != 0;
    let keep = if attrs::int(node, "onesided", 0) != 0 {
        n / 2 + 1
    } else {
        n
    };
    // Move the axis next to the complex axis: [outer, len, comp].
    let moved = x.transpose(a, rank - 2)?.contiguous()?;
    let mdims = moved.dims().to_vec();
    let v: Vec<f64> = crate::ops::f64s(&moved)?;
    let outer = v.len() / (len * comp).max(1);
    let mut out = Vec::with_capacity(outer * keep * 2);
    for o in 0..outer {
        let sig: Vec<(f64, f64)> = (0..len)
            .map(|j| {
                let at = (o * len + j) * comp;
                (v[at], if comp == 2 { v[at + 1] } else { 0.0 })
            })
            .collect();
        for (re, im) in dft1(&sig, n, keep, inverse) {
            out.push(re);
            out.push(im);
        }
    }
    let mut dims = mdims;
    dims[rank - 2] = keep;
    dims[rank - 1] = 2;
    Tensor::from_vec(out, dims, &Device::Cpu)?
        .transpose(a, rank - 2)?
        .contiguous()?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

/// STFT(signal [batch, length, 1|2], frame_step, window?, frame_length?) with `onesided`:
/// `[batch, frames, bins, 2]`.
pub fn stft(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| {
        ins.get(i)
            .and_then(|t| t.as_ref())
            .filter(|t| t.elem_count() > 0)
    };
    let (Some(x), Some(step)) = (get(0), get(1)) else {
        bail!("STFT: needs the signal and frame_step")
    };
    let (batch, length, comp) = x.dims3()?;
    let step = (*i64s(step)?.first().unwrap_or(&1)).max(1) as usize;
    let window: Option<Vec<f64>> = get(2)
        .map(|w| w.to_dtype(DType::F64)?.flatten_all()?.to_vec1())
        .transpose()?;
    let frame = match (get(3), &window) {
        (Some(f), _) => (*i64s(f)?.first().unwrap_or(&1)).max(1) as usize,
        (None, Some(w)) => w.len(),
        (None, None) => bail!("STFT: needs a window or a frame_length"),
    };
    if frame > length {
        bail!("STFT: frame length {frame} exceeds the signal length {length}")
    }
    let frames = 1 + (length - frame) / step;
    let keep = if attrs::int(node, "onesided", 1) != 0 {
        frame / 2 + 1
    } else {
        frame
    };
    let v: Vec<f64> = crate::ops::f64s(x)?;
    let mut out = Vec::with_capacity(batch * frames * keep * 2);
    for b in 0..batch {
        for f in 0..frames {
            let sig: Vec<(f64, f64)> = (0..frame)
                .map(|j| {
                    let at = (b * length + f * step + j) * comp;
                    let w = window
                        .as_ref()
                        .map_or(1.0, |w| w.get(j).copied().unwrap_or(0.0));
                    (v[at] * w, if comp == 2 { v[at + 1] * w } else { 0.0 })
                })
                .collect();
            for (re, im) in dft1(&sig, frame, keep, false) {
                out.push(re);
                out.push(im);
            }
        }
    }
    crate::ops::like(out, (batch, frames, keep, 2), x)
}

/// MelWeightMatrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz,
/// upper_edge_hertz): `[dft_length / 2 + 1, num_mel_bins]` triangular filters between
/// mel-spaced bins (the step over `num_mel_bins + 2` points, as ONNX's reference and
/// onnxruntime compute it), in `output_datatype` (FLOAT by default).
pub fn mel_weight_matrix(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let scalar = |i: usize| -> Result<f64> {
        let Some(Some(t)) = ins.get(i) else {
            bail!("MelWeightMatrix: input {i} is missing")
        };
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
    };
    let (mels, dft_len, rate) = (scalar(0)? as i64, scalar(1)? as i64, scalar(2)? as i64);
    let (lo, hi) = (scalar(3)? as f32, scalar(4)? as f32);
    if mels < 1 || dft_len < 1 || rate < 1 {
        bail!("MelWeightMatrix: num_mel_bins, dft_length and sample_rate must be positive")
    }
    let (mels, bins) = (mels as usize, (dft_len / 2 + 1) as usize);
    // Mel edges in single precision, as the reference does with FLOAT inputs.
    let mel = |hz: f32| 2595f32 * (1f32 + hz / 700f32).log10();
    let (lo_mel, hi_mel) = (mel(lo), mel(hi));
    let step = (hi_mel - lo_mel) / (mels + 2) as f32;
    let edges: Vec<usize> = (0..mels + 2)
        .map(|k| {
            let m = k as f64 * step as f64 + lo_mel as f64;
            let hz = 700.0 * (10f64.powf(m / 2595.0) - 1.0);
            (((dft_len + 1) as f64 * hz) / rate as f64).floor().max(0.0) as usize
        })
        .collect();
    let mut w = vec![0f64; bins * mels];
    let mut set = |j: usize, i: usize, v: f64| {
        if j < bins {
            w[j * mels + i] = v;
        }
    };
    for i in 0..mels {
        let (l, c, h) = (edges[i], edges[i + 1], edges[i + 2]);
        if c == l {
            set(c, i, 1.0);
        } else {
            for j in l..=c {
                set(j, i, (j - l) as f64 / (c - l) as f64);
            }
        }
        if h > c {
            for j in c..h {
                set(j, i, (h - j) as f64 / (h - c) as f64);
            }
        }
    }
    let dt = crate::convert::onnx_dtype(attrs::int(node, "output_datatype", 1) as i32)
        .unwrap_or(DType::F32);
    Tensor::from_vec(w, (bins, mels), &Device::Cpu)?.to_dtype(dt)
}
