//! ONNX `ConvTranspose` in any number of spatial dimensions: per image and group, one
//! matrix product `Wᵀ · X` gives every (output channel, kernel tap) row for every input
//! position, and col2im adds each into the output position it lands on. Strides,
//! dilations, pads, `output_padding`, `output_shape` and `auto_pad` as ONNX defines them.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;

/// Runs ConvTranspose: `x` `[n, c, in...]`, `w` `[c, m/group, k...]`, optional bias `[m]`.
pub fn conv_transpose(
    node: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let sd = x.rank().saturating_sub(2);
    if sd > 8 {
        bail!("ConvTranspose: at most 8 spatial dimensions")
    }
    if sd == 0 || w.rank() != x.rank() {
        bail!(
            "ConvTranspose: input {:?} and weight {:?} do not match",
            x.dims(),
            w.dims()
        )
    }
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let groups = attrs::int(node, "group", 1).max(1) as usize;
    let (wc, mg) = (w.dims()[0], w.dims()[1]);
    if wc != c || c % groups != 0 {
        bail!("ConvTranspose: {c} input channels do not match the weight's {wc} in {groups} groups")
    }
    let (cg, m) = (c / groups, mg * groups);
    let input = &x.dims()[2..];
    let kernel = &w.dims()[2..];
    let ints = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
        match attrs::ints(node, name) {
            Some(v) if v.len() == len => Ok(v),
            Some(v) => {
                bail!("ConvTranspose: attribute {name} {v:?} does not fit {sd} spatial dimensions")
            }
            None => Ok(vec![default; len]),
        }
    };
    let stride = ints("strides", 1, sd)?;
    let dil = ints("dilations", 1, sd)?;
    let out_pad = ints("output_padding", 0, sd)?;
    let mut pads = ints("pads", 0, 2 * sd)?;
    let auto = attrs::string(node, "auto_pad", "NOTSET");
    let full = |d: usize| {
        stride[d] * (input[d] as i64 - 1) + out_pad[d] + (kernel[d] as i64 - 1) * dil[d] + 1
    };
    // Wanted output extent: output_shape, or the input times the stride for SAME padding.
    let wanted: Option<Vec<i64>> = match attrs::ints(node, "output_shape") {
        Some(s) => Some(s[s.len().saturating_sub(sd)..].to_vec()),
        None if auto.starts_with("SAME") => {
            Some((0..sd).map(|d| input[d] as i64 * stride[d]).collect())
        }
        None => None,
    };
    if let Some(shape) = &wanted {
        for d in 0..sd {
            let total = full(d) - shape[d];
            // Floor division: a negative total (output_shape beyond the full extent) pads
            // the end negatively, i.e. extends the output there.
            let (small, big) = (total.div_euclid(2), total - total.div_euclid(2));
            (pads[d], pads[sd + d]) = if auto == "SAME_UPPER" {
                (small, big)
            } else {
                (big, small)
            };
        }
    } else if auto == "VALID" {
        pads.iter_mut().for_each(|p| *p = 0);
    }
    let out: Vec<usize> = (0..sd)
        .map(|d| (full(d) - pads[d] - pads[sd + d]).max(0) as usize)
        .collect();
    let taps: usize = kernel.iter().product();
    let (size_in, size_out) = (
        input.iter().product::<usize>(),
        out.iter().product::<usize>(),
    );
    let xf = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let wf = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let mut y = vec![0f32; n * m * size_out];
    for b in 0..n {
        for g in 0..groups {
            // [cg, mg·taps]ᵀ · [cg, in] = [mg·taps, in]
            let wg = wf.narrow(0, g * cg, cg)?.reshape((cg, mg * taps))?;
            let xg = xf.get(b)?.narrow(0, g * cg, cg)?.reshape((cg, size_in))?;
            let col: Vec<f32> = wg.t()?.matmul(&xg)?.flatten_all()?.to_vec1()?;
            for (r, row) in col.chunks(size_in).enumerate() {
                let (oc, tap) = (g * mg + r / taps, r % taps);
                let dst = &mut y[(b * m + oc) * size_out..(b * m + oc + 1) * size_out];
                // The tap's offset per spatial dimension.
                let mut k = vec![0i64; sd];
                let mut rest = tap;
                for d in (0..sd).rev() {
                    k[d] = (rest % kernel[d]) as i64;
                    rest /= kernel[d];
                }
                for (l, &v) in row.iter().enumerate() {
                    let (mut at, mut rest, mut inside) = (0usize, l, true);
                    let mut coords = [0i64; 8];
                    for d in (0..sd).rev() {
                        coords[d] = (rest % input[d]) as i64;
                        rest /= input[d];
                    }
                    for d in 0..sd {
                        let o = coords[d] * stride[d] + k[d] * dil[d] - pads[d];
                        if o < 0 || o >= out[d] as i64 {
                            inside = false;
                            break;
                        }
                        at = at * out[d] + o as usize;
                    }
                    if inside {
                        dst[at] += v;
                    }
                }
            }
        }
    }
    let mut dims = vec![n, m];
    dims.extend(&out);
    let mut t = Tensor::from_vec(y, dims, &Device::Cpu)?;
    if let Some(bias) = bias {
        let mut shape = vec![1usize; t.rank()];
        shape[1] = m;
        t = t.broadcast_add(
            &bias
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .reshape(shape)?,
        )?;
    }
    t.to_dtype(x.dtype())?.to_device(x.device())
}
