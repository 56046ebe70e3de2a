//! ONNX `DeformConv` (2-D): a convolution whose kernel taps sample the input at learned
//! fractional offsets (bilinear, zero outside the image), each tap optionally scaled by a
//! mask, as in deformable convolution networks (DCNv1/v2). The sampled patches are gathered
//! on the host into a column matrix per image and group and multiplied by the weight.
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;

/// Bilinear sample of the `h × w` plane `p` at (`y`, `x`); neighbours outside count as 0.
fn bilinear(p: &[f32], h: usize, w: usize, y: f32, x: f32) -> f32 {
    if y <= -1.0 || x <= -1.0 || y >= h as f32 || x >= w as f32 {
        return 0.0;
    }
    let (y0, x0) = (y.floor(), x.floor());
    let (ly, lx) = (y - y0, x - x0);
    let at = |yy: f32, xx: f32| {
        if yy < 0.0 || xx < 0.0 || yy >= h as f32 || xx >= w as f32 {
            0.0
        } else {
            p[yy as usize * w + xx as usize]
        }
    };
    (1.0 - ly) * (1.0 - lx) * at(y0, x0)
        + (1.0 - ly) * lx * at(y0, x0 + 1.0)
        + ly * (1.0 - lx) * at(y0 + 1.0, x0)
        + ly * lx * at(y0 + 1.0, x0 + 1.0)
}

/// DeformConv(X, W, offset, B?, mask?) for 4-D X; the output's spatial size is offset's.
pub fn deform_conv(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let get = |i: usize| ins.get(i).and_then(|t| t.as_ref());
    let (Some(x), Some(wt), Some(off)) = (get(0), get(1), get(2)) else {
        bail!("DeformConv: needs X, W and offset")
    };
    if x.rank() != 4 || wt.rank() != 4 || off.rank() != 4 {
        bail!("DeformConv: only 2-D convolutions (4-D X, W and offset) are supported")
    }
    let (n, c, h, w) = x.dims4()?;
    let (oc, icg, kh, kw) = wt.dims4()?;
    let (_, offc, oh, ow) = off.dims4()?;
    let group = attrs::int(node, "group", 1).max(1) as usize;
    let og = attrs::int(node, "offset_group", 1).max(1) as usize;
    let two = |name: &str, d: i64| {
        let v = attrs::ints(node, name).unwrap_or_default();
        [
            v.first().copied().unwrap_or(d),
            v.get(1).copied().unwrap_or(d),
        ]
    };
    let (st, dil) = (two("strides", 1), two("dilations", 1));
    let pads = attrs::ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
    let taps = kh * kw;
    if icg * group != c || oc % group != 0 || c % og != 0 || offc != og * 2 * taps {
        bail!(
            "DeformConv: shapes do not agree (X {:?}, W {:?}, offset {:?}, group {group}, offset_group {og})",
            x.dims(),
            wt.dims(),
            off.dims()
        )
    }
    let host =
        |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let (xv, ov) = (host(x)?, host(off)?);
    let mv = match get(4) {
        Some(m) if m.elem_count() == n * og * taps * oh * ow => Some(host(m)?),
        Some(m) => bail!("DeformConv: mask of shape {:?} does not fit", m.dims()),
        None => None,
    };
    let l = oh * ow;
    let dev = x.device();
    let ocg = oc / group;
    let wg = wt.to_dtype(DType::F32)?.reshape((group, ocg, icg * taps))?;
    let mut images = Vec::with_capacity(n);
    for b in 0..n {
        let mut cols = vec![0f32; c * taps * l];
        for ch in 0..c {
            let g = ch / (c / og);
            let plane = &xv[(b * c + ch) * h * w..][..h * w];
            for (k, (i, j)) in (0..kh)
                .flat_map(|i| (0..kw).map(move |j| (i, j)))
                .enumerate()
            {
                let o_at =
                    |comp: usize, p: usize| ov[((b * og + g) * 2 * taps + 2 * k + comp) * l + p];
                for p in 0..l {
                    let (y, xx) = (p / ow, p % ow);
                    let sy = (y as i64 * st[0] - pads[0] + i as i64 * dil[0]) as f32 + o_at(0, p);
                    let sx = (xx as i64 * st[1] - pads[1] + j as i64 * dil[1]) as f32 + o_at(1, p);
                    let mut v = bilinear(plane, h, w, sy, sx);
                    if let Some(m) = &mv {
                        v *= m[((b * og + g) * taps + k) * l + p];
                    }
                    cols[(ch * taps + k) * l + p] = v;
                }
            }
        }
        let cols = Tensor::from_vec(cols, (group, icg * taps, l), &Device::Cpu)?.to_device(dev)?;
        images.push(wg.matmul(&cols)?.reshape((oc, oh, ow))?);
    }
    let mut y = Tensor::stack(&images, 0)?;
    if let Some(bias) = get(3) {
        y = y.broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, oc, 1, 1))?)?;
    }
    y.to_dtype(x.dtype())
}
