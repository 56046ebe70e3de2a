//! The `candle` backend: native [candle](https://github.com/huggingface/candle) models.
//!
//! Architecture `bert` (parameter `architecture`, the default): sentence embeddings from a
//! sentence-transformers BERT folder (`model.safetensors`, `config.json`, `tokenizer.json`,
//! optional `1_Pooling/config.json`, `modules.json`, `sentence_bert_config.json`) in the
//! model's version directory — e.g. all-MiniLM-L6-v2.
//!
//! Inputs per request: `TEXT` (BYTES, one string per batch row), or token ids `INPUT_IDS`
//! (INT64 [rows, L]) with an optional `ATTENTION_MASK` (INT64 [rows, L]). Output `EMBEDDING`
//! (FP32 [rows, hidden]). A batch of requests runs as one forward pass, padded to its
//! longest sequence. `KIND_GPU` instances run on CUDA in the `cuda` build.
pub mod bert;
mod files;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kiln_sdk::{
    export_backend, Backend, DataType, Error, ErrorCode, Instance, InstanceInfo, InstanceKind,
    Model, ModelInfo, Request, Response, Result,
};
use tokenizers::Tokenizer;

use bert::{pool, Bert};
use files::{parameter, ModelFiles};

/// The backend (stateless).
pub struct CandleBackend;

/// A loaded model: files, settings and the tokenizer (shared by instances).
pub struct EmbeddingModel {
    files: Arc<ModelFiles>,
    tokenizer: Option<Arc<Tokenizer>>,
}

/// One instance: the network's weights on its device.
pub struct EmbeddingInstance {
    bert: Bert,
    device: Device,
    files: Arc<ModelFiles>,
    tokenizer: Option<Arc<Tokenizer>>,
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::internal(format!("candle: {e}"))
}

impl Backend for CandleBackend {
    type Model = EmbeddingModel;

    fn initialize() -> Result<Self> {
        Ok(CandleBackend)
    }

    fn load_model(&self, info: &ModelInfo) -> Result<EmbeddingModel> {
        let config: serde_json::Value = serde_json::from_str(&info.config_json)
            .map_err(|e| Error::internal(format!("bad config JSON: {e}")))?;
        match parameter(&config, "architecture").unwrap_or("bert") {
            "bert" => {}
            other => {
                return Err(Error::unsupported(format!(
                    "candle backend: unknown architecture '{other}' (supported: bert)"
                )))
            }
        }
        let files = ModelFiles::load(&info.version_path(), &config)?;
        let tokenizer = match &files.tokenizer {
            Some(path) => Some(Arc::new(load_tokenizer(path, files.max_len)?)),
            None => None,
        };
        Ok(EmbeddingModel {
            files: Arc::new(files),
            tokenizer,
        })
    }
}

/// Reads `tokenizer.json`. The batch is padded to its longest sequence at execution, not to
/// the file's fixed length; sequences are cut at the model's max_seq_length as
/// sentence-transformers does.
fn load_tokenizer(path: &std::path::Path, max_len: usize) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| Error::invalid_arg(format!("{}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::invalid_arg(format!("tokenizer truncation: {e}")))?;
    Ok(tokenizer)
}

/// The device an instance asks for.
fn device(kind: InstanceKind) -> Result<Device> {
    match kind {
        InstanceKind::Cpu | InstanceKind::Model => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        InstanceKind::Gpu(id) => Device::new_cuda(id.max(0) as usize).map_err(|e| {
            Error::new(
                ErrorCode::Unavailable,
                format!("KIND_GPU instance: cannot open CUDA device {id}: {e}"),
            )
        }),
        #[cfg(not(feature = "cuda"))]
        InstanceKind::Gpu(_) => Err(Error::new(
            ErrorCode::Unsupported,
            "KIND_GPU instance: this candle backend was built without CUDA; build the CUDA variant with `cargo xtask build-cuda` (or use KIND_CPU)",
        )),
    }
}

impl Model for EmbeddingModel {
    type Instance = EmbeddingInstance;

    fn new_instance(&self, info: &InstanceInfo) -> Result<EmbeddingInstance> {
        let device = device(info.kind)?;
        // SAFETY: the weights file is mapped read-only and not modified while loaded.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&self.files.weights], DType::F32, &device)
        }
        .map_err(candle_err)?;
        let bert = Bert::new(&self.files.config, vb).map_err(|e| {
            Error::invalid_arg(format!(
                "{} does not hold a BERT with the shapes of config.json: {e}",
                self.files.weights.display()
            ))
        })?;
        Ok(EmbeddingInstance {
            bert,
            device,
            files: self.files.clone(),
            tokenizer: self.tokenizer.clone(),
        })
    }
}

/// Token ids and attention mask of one sequence.
type Tokens = (Vec<u32>, Vec<u32>);

impl EmbeddingInstance {
    /// The sequences of one request (one per batch row).
    fn sequences(&self, request: &Request<'_>) -> Result<Vec<Tokens>> {
        if let Some(text) = request.input("TEXT") {
            let strings = text
                .bytes_elements()?
                .into_iter()
                .map(|b| {
                    std::str::from_utf8(b)
                        .map(str::to_owned)
                        .map_err(|_| Error::invalid_arg("TEXT must be UTF-8"))
                })
                .collect::<Result<Vec<_>>>()?;
            let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
                Error::invalid_arg(
                    "this model has no tokenizer.json: send INPUT_IDS instead of TEXT",
                )
            })?;
            let enc = tokenizer
                .encode_batch(strings, true)
                .map_err(|e| Error::invalid_arg(format!("tokenizer: {e}")))?;
            return Ok(enc
                .into_iter()
                .map(|e| (e.get_ids().to_vec(), e.get_attention_mask().to_vec()))
                .collect());
        }
        let ids = request
            .input("INPUT_IDS")
            .ok_or_else(|| Error::invalid_arg("the request needs input TEXT or INPUT_IDS"))?;
        let (rows, len) = match ids.shape {
            [r, l] => (*r as usize, *l as usize),
            _ => {
                return Err(Error::invalid_arg(
                    "INPUT_IDS must have shape [rows, length]",
                ))
            }
        };
        if len == 0 || len > self.bert.max_positions() {
            return Err(Error::invalid_arg(format!(
                "INPUT_IDS length must be 1..={}",
                self.bert.max_positions()
            )));
        }
        let id_vals: Vec<i64> = ids.to_vec()?;
        let mask_vals: Vec<i64> = match request.input("ATTENTION_MASK") {
            Some(m) if m.shape == ids.shape => m.to_vec()?,
            Some(_) => {
                return Err(Error::invalid_arg(
                    "ATTENTION_MASK must have INPUT_IDS' shape",
                ))
            }
            None => vec![1; id_vals.len()],
        };
        let vocab = self.files.config.vocab_size as i64;
        if id_vals.iter().any(|&v| v < 0 || v >= vocab) {
            return Err(Error::invalid_arg(format!(
                "INPUT_IDS must be in 0..{vocab}"
            )));
        }
        Ok((0..rows)
            .map(|r| {
                let s = r * len..(r + 1) * len;
                (
                    id_vals[s.clone()].iter().map(|&v| v as u32).collect(),
                    mask_vals[s].iter().map(|&v| (v != 0) as u32).collect(),
                )
            })
            .collect())
    }

    /// Embeds every sequence: [n, hidden] row-major, in input order. Sequences of similar
    /// length run together (see [`length_groups`]), so one long text does not make the
    /// whole batch pay for its padding.
    fn embed(&self, seqs: &[Tokens]) -> Result<Vec<f32>> {
        kiln_sdk::compute(|| self.embed_groups(seqs))
    }

    fn embed_groups(&self, seqs: &[Tokens]) -> Result<Vec<f32>> {
        let h = self.files.config.hidden_size;
        let lens: Vec<usize> = seqs.iter().map(|(ids, _)| ids.len()).collect();
        let mut out = vec![0f32; seqs.len() * h];
        for group in length_groups(&lens) {
            let part: Vec<Tokens> = group.iter().map(|&i| seqs[i].clone()).collect();
            let v = self.embed_padded(&part)?;
            for (k, &i) in group.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&v[k * h..(k + 1) * h]);
            }
        }
        Ok(out)
    }

    /// Embeds sequences in one forward pass, padded to the longest: [n, hidden].
    fn embed_padded(&self, seqs: &[Tokens]) -> Result<Vec<f32>> {
        let n = seqs.len();
        let len = seqs
            .iter()
            .map(|(ids, _)| ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (r, (i, m)) in seqs.iter().enumerate() {
            ids[r * len..r * len + i.len()].copy_from_slice(i);
            for (k, &v) in m.iter().enumerate() {
                mask[r * len + k] = v as f32;
            }
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device).map_err(candle_err)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device).map_err(candle_err)?;
        let states = self.bert.forward(&ids, &mask).map_err(candle_err)?;
        let v =
            pool(&states, &mask, self.files.pooling, self.files.normalize).map_err(candle_err)?;
        v.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err)
    }
}

/// Most tokens (rows × padded length) one forward pass holds.
const MAX_GROUP_TOKENS: usize = 16 * 1024;

/// Splits sequence indices into groups of similar length: sorted by length, a group ends
/// when the next sequence is more than 1.5× (+8 tokens) the group's shortest, or when the
/// padded group would exceed [`MAX_GROUP_TOKENS`].
pub fn length_groups(lens: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut shortest = 0;
    for i in order {
        let len = lens[i].max(1);
        let fits = groups.last().is_some_and(|g| {
            len * 2 <= shortest * 3 + 16 && len * (g.len() + 1) <= MAX_GROUP_TOKENS
        });
        if fits {
            if let Some(g) = groups.last_mut() {
                g.push(i);
            }
        } else {
            shortest = len;
            groups.push(vec![i]);
        }
    }
    groups
}

impl Instance for EmbeddingInstance {
    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()> {
        let seqs = self.sequences(request)?;
        let out = self.embed(&seqs)?;
        let h = self.files.config.hidden_size as i64;
        response.output_from("EMBEDDING", DataType::Fp32, &[seqs.len() as i64, h], &out)
    }

    /// Tokenizes every request, runs the whole batch as one forward pass and answers each
    /// request with its rows. A request that fails to tokenize fails alone.
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        let mut seqs = Vec::new();
        let mut spans = Vec::with_capacity(requests.len());
        for r in requests {
            match self.sequences(r) {
                Ok(s) => {
                    spans.push(Some((seqs.len(), s.len())));
                    seqs.extend(s);
                }
                Err(e) => {
                    r.response()?.send_error(e)?;
                    spans.push(None);
                }
            }
        }
        if seqs.is_empty() {
            return Ok(());
        }
        let out = self.embed(&seqs)?;
        let h = self.files.config.hidden_size;
        for (r, span) in requests.iter().zip(spans) {
            let Some((first, rows)) = span else { continue };
            let mut resp = r.response()?;
            resp.output_from(
                "EMBEDDING",
                DataType::Fp32,
                &[rows as i64, h as i64],
                &out[first * h..(first + rows) * h],
            )?;
            resp.send()?;
        }
        Ok(())
    }
}

export_backend!(CandleBackend);

#[cfg(test)]
mod tests {
    use super::length_groups;

    #[test]
    fn long_outliers_get_their_own_group_and_every_index_appears_once() {
        let lens = [12, 256, 10, 14, 11, 30, 9];
        let groups = length_groups(&lens);
        assert_eq!(groups, vec![vec![6, 2, 4, 0, 3], vec![5], vec![1]]);
        let mut all: Vec<usize> = groups.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
    }

    #[test]
    fn groups_respect_the_token_budget() {
        let lens = vec![256; 200];
        for g in length_groups(&lens) {
            assert!(g.len() * 256 <= super::MAX_GROUP_TOKENS);
        }
    }
}
