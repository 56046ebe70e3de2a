//! A BERT encoder (as in `transformers`' `BertModel`) on candle, for sentence embeddings.
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{
    embedding, layer_norm, linear, Embedding, LayerNorm, LayerNormConfig, Linear, VarBuilder,
};
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` that BERT needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

fn ln(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let cfg = LayerNormConfig {
        eps,
        ..Default::default()
    };
    // Old checkpoints name the parameters gamma/beta.
    if vb.contains_tensor("weight") {
        layer_norm(size, cfg, vb)
    } else {
        let w = vb.get(size, "gamma")?;
        let b = vb.get(size, "beta")?;
        Ok(LayerNorm::new(w, b, eps))
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
    heads: usize,
    head_dim: usize,
    gelu_tanh: bool,
}

impl Layer {
    fn new(c: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let att = vb.pp("attention");
        Ok(Layer {
            query: linear(h, h, att.pp("self").pp("query"))?,
            key: linear(h, h, att.pp("self").pp("key"))?,
            value: linear(h, h, att.pp("self").pp("value"))?,
            attn_out: linear(h, h, att.pp("output").pp("dense"))?,
            attn_ln: ln(h, c.layer_norm_eps, att.pp("output").pp("LayerNorm"))?,
            intermediate: linear(h, c.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(c.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_ln: ln(h, c.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
            gelu_tanh: c.hidden_act == "gelu_new" || c.hidden_act == "gelu_pytorch_tanh",
        })
    }

    /// `x`: [B, L, H]; `bias`: [B, 1, 1, L] additive attention mask.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?;
        let a = self.attn_ln.forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let inter = self.intermediate.forward(&a)?;
        let inter = if self.gelu_tanh {
            inter.gelu()?
        } else {
            inter.gelu_erf()?
        };
        self.out_ln.forward(&(self.output.forward(&inter)? + a)?)
    }
}

/// BERT: embeddings + encoder layers; returns the last hidden state.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    max_positions: usize,
}

impl Bert {
    /// Loads the weights under `vb` (with or without a `bert.` prefix).
    pub fn new(c: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let e = vb.pp("embeddings");
        let h = c.hidden_size;
        Ok(Bert {
            word: embedding(c.vocab_size, h, e.pp("word_embeddings"))?,
            position: embedding(c.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: embedding(c.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            emb_ln: ln(h, c.layer_norm_eps, e.pp("LayerNorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(c, vb.pp("encoder").pp("layer").pp(i)))
                .collect::<Result<_>>()?,
            max_positions: c.max_position_embeddings,
        })
    }

    /// Longest sequence the position embeddings cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `ids`, `mask`: [B, L] (u32 ids, f32 mask of 1 = token / 0 = padding) → [B, L, H].
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        let dev = ids.device();
        let positions = Tensor::arange(0u32, l as u32, dev)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(
                &self
                    .token_type
                    .forward(&Tensor::zeros(l, DType::U32, dev)?)?,
            )?;
        let mut x = self.emb_ln.forward(&x)?;
        // 0 where attended, a large negative number on padding: [B, 1, 1, L].
        let bias = ((mask.ones_like()? - mask)? * -1e4f64)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }
}

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the attended tokens.
    Mean,
    /// The first token's state.
    Cls,
}

/// Pools `states` [B, L, H] with `mask` [B, L] and optionally L2-normalises → [B, H].
pub fn pool(states: &Tensor, mask: &Tensor, pooling: Pooling, normalize: bool) -> Result<Tensor> {
    let v = match pooling {
        Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => {
            let m = mask.unsqueeze(D::Minus1)?;
            let sum = states.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            sum.broadcast_div(&count)?
        }
    };
    if !normalize {
        return Ok(v);
    }
    let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    v.broadcast_div(&norm)
}
