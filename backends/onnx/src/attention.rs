//! onnxruntime's fused transformer operators `com.microsoft.Attention` (BERT-style
//! self-attention with packed QKV weights) and `com.microsoft.EmbedLayerNormalization`
//! (word + position + segment embeddings, then LayerNorm), as its optimizer writes them.
use candle_core::{bail, DType, Result, Tensor, D};
use candle_onnx::onnx::NodeProto;

use crate::attrs;

use crate::ops::{opt as input, req};

/// Attention(input [B, S, Hin], weights [Hin, 3H], bias [3H], mask_index?): multi-head
/// self-attention. Masks: absent, key lengths [B], or a 0/1 mask [B, S] or [B, S, S]
/// (0 adds `mask_filter_value`, default −10000, to the scores). `unidirectional` masks
/// future positions. Past/present key-value caches are not supported.
pub fn attention(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let x = req(ins, 0, node)?;
    let (w, b) = (req(ins, 1, node)?, input(ins, 2));
    if input(ins, 4).is_some() || input(ins, 5).is_some() {
        bail!(
            "Attention node '{}': past state and relative position bias are not supported",
            node.name
        )
    }
    let heads = attrs::int(node, "num_heads", 0).max(1) as usize;
    let (bsz, seq, _) = x.dims3()?;
    let sizes = attrs::ints(node, "qkv_hidden_sizes");
    let total = w.dim(1)?;
    let (hq, hk, hv) = match sizes.as_deref() {
        Some([q, k, v]) => (*q as usize, *k as usize, *v as usize),
        _ => (total / 3, total / 3, total / 3),
    };
    if hq + hk + hv != total || hq % heads != 0 || hv % heads != 0 {
        bail!("Attention node '{}': hidden sizes {hq}/{hk}/{hv} do not fit weights of {total} columns and {heads} heads", node.name)
    }
    let mut qkv = x.broadcast_matmul(w)?;
    if let Some(b) = b {
        qkv = qkv.broadcast_add(b)?;
    }
    // [B, S, hidden] → [B, heads, S, hidden / heads]
    let split = |t: Tensor| -> Result<Tensor> {
        let h = t.dim(2)?;
        t.reshape((bsz, seq, heads, h / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(qkv.narrow(2, 0, hq)?)?;
    let k = split(qkv.narrow(2, hq, hk)?)?;
    let v = split(qkv.narrow(2, hq + hk, hv)?)?;
    let head = (hq / heads) as f64;
    let scale = match attrs::float(node, "scale", 0.0) {
        s if s != 0.0 => s as f64,
        _ => 1.0 / head.sqrt(),
    };
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?; // [B, N, S, S]
    let filter = attrs::float(node, "mask_filter_value", -10000.0) as f64;
    if let Some(m) = input(ins, 3) {
        let keep = match m.rank() {
            // Key lengths: positions from the length on are masked.
            1 => {
                let lens = crate::ops::i64s(m)?;
                let mut v = Vec::with_capacity(bsz * seq);
                for bi in 0..bsz {
                    let len = lens.get(bi).copied().unwrap_or(seq as i64);
                    v.extend((0..seq).map(|j| if (j as i64) < len { 1f32 } else { 0.0 }));
                }
                Tensor::from_vec(v, (bsz, 1, 1, seq), x.device())?
            }
            2 => m.to_dtype(DType::F32)?.reshape((bsz, 1, 1, seq))?,
            3 => m.to_dtype(DType::F32)?.unsqueeze(1)?,
            r => bail!(
                "Attention node '{}': a mask of rank {r} is not supported",
                node.name
            ),
        };
        let add = ((keep.affine(-1.0, 1.0))? * filter)?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&add)?;
    }
    if attrs::int(node, "unidirectional", 0) != 0 {
        let v: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { filter as f32 } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(v, (seq, seq), x.device())?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&causal)?;
    }
    let p = crate::ops::softmax(&scores, 3, false)?;
    let out = p.matmul(&v)?; // [B, N, S, hv / N]
    out.transpose(1, 2)?.contiguous()?.reshape((bsz, seq, hv))
}

/// EmbedLayerNormalization: LayerNorm(word[ids] + position[0..S or position_ids] +
/// segment[segment_ids]) · gamma + beta, and the mask index (ones per row of `mask`, INT32).
pub fn embed_layer_norm(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let ids = req(ins, 0, node)?;
    let (bsz, seq) = ids.dims2()?;
    let gather = |table: &Tensor, idx: &Tensor| -> Result<Tensor> {
        let flat = idx.to_dtype(DType::U32)?.flatten_all()?;
        table
            .index_select(&flat, 0)?
            .reshape((bsz, seq, table.dim(1)?))
    };
    let word = req(ins, 2, node)?;
    let mut sum = gather(word, ids)?;
    let position = req(ins, 3, node)?;
    let pos = match input(ins, 8) {
        Some(p) => {
            let p = p.broadcast_as((bsz, seq))?.contiguous()?;
            gather(position, &p)?
        }
        None => position
            .narrow(0, 0, seq)?
            .unsqueeze(0)?
            .broadcast_as(sum.shape())?
            .contiguous()?,
    };
    sum = (sum + pos)?;
    if let (Some(seg_ids), Some(seg)) = (input(ins, 1), input(ins, 4)) {
        sum = (sum + gather(seg, seg_ids)?)?;
    }
    let (gamma, beta) = (req(ins, 5, node)?, req(ins, 6, node)?);
    let eps = attrs::float(node, "epsilon", 1e-12) as f64;
    let mean = sum.mean_keepdim(D::Minus1)?;
    let centered = sum.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.broadcast_mul(gamma)?.broadcast_add(beta)?;
    let mask_index = match input(ins, 7) {
        Some(m) => m.to_dtype(DType::I64)?.sum(1)?.to_dtype(DType::I32)?,
        None => Tensor::zeros(bsz, DType::I32, ids.device())?,
    };
    let mut outs = vec![out, mask_index];
    if node.output.get(2).is_some_and(|o| !o.is_empty()) {
        outs.push(sum);
    }
    Ok(outs)
}

/// RMS normalisation over the dimensions from `axis` on: `x / √(mean(x²) + ε) · scale`;
/// also returns `1 / √(mean(x²) + ε)` (kept dimensions).
fn rms_norm(x: &Tensor, scale: &Tensor, axis: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let dims = x.dims();
    let rows: usize = dims[..axis].iter().product();
    let flat = x.reshape((rows, dims[axis..].iter().product::<usize>()))?;
    let inv = (flat.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let y = flat
        .broadcast_mul(&inv)?
        .reshape(dims)?
        .broadcast_mul(scale)?;
    let mut kept = dims[..axis].to_vec();
    kept.extend(std::iter::repeat_n(1, dims.len() - axis));
    Ok((y, inv.reshape(kept)?))
}

/// `SimplifiedLayerNormalization` (onnxruntime's RMSNorm, in the default domain): Y and
/// the inverse standard deviation.
pub fn simplified_layer_norm(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let x = req(ins, 0, node)?;
    let axis = crate::ops::axis(attrs::int(node, "axis", -1), x.rank())?;
    let eps = attrs::float(node, "epsilon", 1e-5) as f64;
    let (y, inv) = rms_norm(x, req(ins, 1, node)?, axis, eps)?;
    Ok(vec![y, inv])
}

/// `com.microsoft.SkipSimplifiedLayerNormalization`: RMSNorm(input + skip + bias) · gamma;
/// outputs Y, (mean: unused), inverse standard deviation, and the sum.
pub fn skip_simplified_layer_norm(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Vec<Tensor>> {
    let mut sum = req(ins, 0, node)?.broadcast_add(req(ins, 1, node)?)?;
    if let Some(b) = input(ins, 3) {
        sum = sum.broadcast_add(b)?;
    }
    let eps = attrs::float(node, "epsilon", 1e-12) as f64;
    let axis = sum.rank().saturating_sub(1);
    let (y, inv) = rms_norm(&sum, req(ins, 2, node)?, axis, eps)?;
    let mean = Tensor::zeros(inv.shape(), inv.dtype(), inv.device())?;
    Ok(vec![y, mean, inv, sum])
}
