//! `config.pbtxt` parsing (protobuf text format against Triton's schema), normalization
//! with Triton's defaults, and the JSON form served by `/v2/models/<m>/config`.
use std::path::Path;

use kiln_proto::inference::{
    model_config::SchedulingChoice,
    model_instance_group::Kind,
    model_optimization_policy::PinnedMemoryBuffer,
    model_sequence_batching,
    model_version_policy::{Latest, PolicyChoice},
    DataType as PbDataType, ModelConfig, ModelInstanceGroup, ModelOptimizationPolicy,
    ModelVersionPolicy,
};
use kiln_sdk::DataType;
use prost_reflect::{DynamicMessage, SerializeOptions};
use thiserror::Error;

/// A config that could not be read or is invalid.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Syntax error or unknown field, with its position.
    #[error("{file}:{line}: {message}")]
    Parse {
        file: String,
        line: usize,
        message: String,
    },
    /// A well-formed config that breaks a rule.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Parses protobuf text format into a `ModelConfig`; errors name the file and line.
pub fn parse_pbtxt(file: &Path, text: &str) -> Result<ModelConfig, ConfigError> {
    let desc = kiln_proto::model_config_descriptor();
    // Newer Triton releases call field 2 of `ensemble_scheduling` `max_inflight_requests`.
    let text = &colon_before_lists(text).replace("max_inflight_requests", "max_inflight_responses");
    match DynamicMessage::parse_text_format(desc, text) {
        Ok(msg) => msg
            .transcode_to::<ModelConfig>()
            .map_err(|e| ConfigError::Invalid {
                file: file.display().to_string(),
                message: e.to_string(),
            }),
        Err(e) => {
            let offset = miette::Diagnostic::labels(&e)
                .and_then(|mut l| l.next())
                .map(|l| l.offset())
                .unwrap_or(text.len());
            Err(ConfigError::Parse {
                file: file.display().to_string(),
                line: line_of(text, offset),
                message: e.to_string(),
            })
        }
    }
}

/// Parses Triton's JSON form of a config (as accepted by the load API's `config` parameter).
pub fn parse_json(text: &str) -> Result<ModelConfig, ConfigError> {
    let desc = kiln_proto::model_config_descriptor();
    let mut de = serde_json::Deserializer::from_str(text);
    let msg = DynamicMessage::deserialize(desc, &mut de).map_err(|e| ConfigError::Invalid {
        file: "<config parameter>".into(),
        message: e.to_string(),
    })?;
    msg.transcode_to::<ModelConfig>()
        .map_err(|e| ConfigError::Invalid {
            file: "<config parameter>".into(),
            message: e.to_string(),
        })
}

/// The config as Triton prints it: snake_case names, enum names, 64-bit ints as numbers,
/// default values included.
pub fn to_json(config: &ModelConfig) -> serde_json::Value {
    let mut msg = DynamicMessage::new(kiln_proto::model_config_descriptor());
    // Transcoding our own generated type into its own descriptor cannot fail.
    if msg.transcode_from(config).is_err() {
        return serde_json::Value::Null;
    }
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap_or(serde_json::Value::Null)
}

/// Protobuf's C++ text parser (which Triton uses) accepts a repeated message field without
/// a colon before its list (`input [ { ... } ]`); prost-reflect requires `input: [ ... ]`.
/// This inserts the optional colon after a field name that is directly followed by `[`,
/// skipping strings and comments. No newline is added, so line numbers are unchanged.
fn colon_before_lists(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    let mut last_ident_end: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        match c {
            b'#' => {
                let end = text[i..].find('\n').map(|n| i + n).unwrap_or(b.len());
                out.push_str(&text[i..end]);
                i = end;
                continue;
            }
            b'"' | b'\'' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != c && b[j] != b'\n' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(b.len());
                out.push_str(&text[i..end]);
                i = end;
                last_ident_end = None;
                continue;
            }
            b'[' => {
                if last_ident_end.is_some() {
                    out.push(':');
                }
                last_ident_end = None;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push_str(&text[start..i]);
                last_ident_end = Some(i);
                continue;
            }
            c if c.is_ascii_whitespace() => {}
            _ => last_ident_end = None,
        }
        let ch = text[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Maps a config data type to the tensor type (`None` for TYPE_INVALID).
pub fn data_type(t: i32) -> Option<DataType> {
    DataType::from_abi(u32::try_from(t).ok()?)
}

/// Fills Triton's defaults and checks the rules the core relies on.
/// `model_name` is the directory name; `gpu_count` the GPUs this machine has.
pub fn normalize(
    cfg: &mut ModelConfig,
    file: &Path,
    text: &str,
    model_name: &str,
    gpu_count: u32,
) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        file: file.display().to_string(),
        message,
    };
    let at = |needle: &str, message: String| match text.find(&format!("\"{needle}\"")) {
        Some(off) => ConfigError::Parse {
            file: file.display().to_string(),
            line: line_of(text, off),
            message,
        },
        None => invalid(message),
    };
    if cfg.name.is_empty() {
        cfg.name = model_name.to_string();
    } else if cfg.name != model_name {
        return Err(at(
            &cfg.name.clone(),
            format!(
                "model name '{}' in the config does not match the model directory '{model_name}'",
                cfg.name
            ),
        ));
    }
    if cfg.max_batch_size < 0 {
        return Err(invalid(format!(
            "'max_batch_size' must be >= 0, got {}",
            cfg.max_batch_size
        )));
    }
    // An ensemble runs other models: no backend, no instances (as Triton shows it).
    let ensemble = crate::ensemble::is_ensemble(cfg);
    if cfg.backend.is_empty() && !ensemble {
        cfg.backend = match cfg.platform.as_str() {
            "onnxruntime_onnx" => "onnxruntime".into(),
            "" if cfg.default_model_filename == "model.onnx" => "onnxruntime".into(),
            "" => {
                return Err(invalid(
                    "the config must set 'backend' (or 'platform')".into(),
                ))
            }
            other => other.to_string(),
        };
    }
    // As Triton: an onnxruntime model names its platform and model file.
    if cfg.backend == "onnxruntime" {
        if cfg.platform.is_empty() {
            cfg.platform = "onnxruntime_onnx".into();
        }
        if cfg.default_model_filename.is_empty() {
            cfg.default_model_filename = "model.onnx".into();
        }
    }
    if cfg
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
        .is_none()
    {
        cfg.version_policy = Some(ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        });
    }
    // Triton's sequence batcher defaults: the Direct strategy, 1 s of idle time.
    if let Some(SchedulingChoice::SequenceBatching(sb)) = &mut cfg.scheduling_choice {
        if sb.max_sequence_idle_microseconds == 0 {
            sb.max_sequence_idle_microseconds = 1_000_000;
        }
        if sb.strategy_choice.is_none() {
            sb.strategy_choice = Some(model_sequence_batching::StrategyChoice::Direct(
                model_sequence_batching::StrategyDirect::default(),
            ));
        }
    }
    // As Triton: dynamic batching without preferred sizes prefers max_batch_size.
    if let Some(SchedulingChoice::DynamicBatching(db)) = &mut cfg.scheduling_choice {
        if db.preferred_batch_size.is_empty() && cfg.max_batch_size > 0 {
            db.preferred_batch_size.push(cfg.max_batch_size);
        }
    }
    let opt = cfg
        .optimization
        .get_or_insert_with(ModelOptimizationPolicy::default);
    opt.input_pinned_memory
        .get_or_insert(PinnedMemoryBuffer { enable: true });
    opt.output_pinned_memory
        .get_or_insert(PinnedMemoryBuffer { enable: true });

    if cfg.instance_group.is_empty() && !ensemble {
        cfg.instance_group.push(ModelInstanceGroup::default());
    }
    for (i, g) in cfg.instance_group.iter_mut().enumerate() {
        if g.name.is_empty() {
            g.name = format!("{}_{}", cfg.name, i);
        }
        if g.count < 1 {
            g.count = 1;
        }
        if g.kind == Kind::Auto as i32 {
            g.kind = if gpu_count > 0 {
                Kind::Gpu as i32
            } else {
                Kind::Cpu as i32
            };
        }
        if g.kind == Kind::Gpu as i32 && g.gpus.is_empty() {
            g.gpus = (0..gpu_count.max(1) as i32).collect();
        }
        if g.kind == Kind::Gpu as i32 {
            if let Some(bad) = g.gpus.iter().find(|&&id| id < 0 || id as u32 >= gpu_count) {
                return Err(invalid(format!(
                    "instance group {} of model {} specifies invalid or unsupported gpu id {bad}: this machine has {gpu_count} NVIDIA GPU(s)",
                    g.name, cfg.name
                )));
            }
        }
    }

    let mut seen = std::collections::HashSet::new();
    for input in &cfg.input {
        check_tensor(&input.name, input.data_type, &input.dims, "input")
            .and_then(|()| match &input.reshape {
                Some(r) => crate::reshape::check(&input.name, "input", &input.dims, &r.shape),
                None => Ok(()),
            })
            .map_err(|m| at(&input.name, m))?;
        if !seen.insert(input.name.clone()) {
            return Err(at(
                &input.name,
                format!("input '{}' is declared twice", input.name),
            ));
        }
    }
    seen.clear();
    for output in &cfg.output {
        check_tensor(&output.name, output.data_type, &output.dims, "output")
            .and_then(|()| match &output.reshape {
                Some(r) => crate::reshape::check(&output.name, "output", &output.dims, &r.shape),
                None => Ok(()),
            })
            .map_err(|m| at(&output.name, m))?;
        if !seen.insert(output.name.clone()) {
            return Err(at(
                &output.name,
                format!("output '{}' is declared twice", output.name),
            ));
        }
    }
    crate::batch_io::check(cfg).map_err(invalid)?;
    crate::config_rules::check(cfg).map_err(invalid)?;
    Ok(())
}

fn check_tensor(name: &str, dtype: i32, dims: &[i64], what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("every model {what} must have a 'name'"));
    }
    if dtype == PbDataType::TypeInvalid as i32 || data_type(dtype).is_none() {
        return Err(format!(
            "model {what} '{name}' must specify a valid 'data_type'"
        ));
    }
    if dims.is_empty() {
        return Err(format!("model {what} '{name}' must specify 'dims'"));
    }
    if let Some(d) = dims.iter().find(|&&d| d == 0 || d < -1) {
        return Err(format!(
            "model {what} '{name}' has invalid dimension {d}: dimensions must be >= 1, or -1 for a variable size"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = r#"
name: "simple"
backend: "simple_math"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }
]
"#;

    #[test]
    fn parses_and_normalizes_simple() {
        let p = Path::new("simple/config.pbtxt");
        let mut c = parse_pbtxt(p, SIMPLE).unwrap();
        normalize(&mut c, p, SIMPLE, "simple", 0).unwrap();
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.input.len(), 2);
        assert_eq!(c.instance_group[0].name, "simple_0");
        assert_eq!(c.instance_group[0].kind, Kind::Cpu as i32);
        let j = to_json(&c);
        assert_eq!(j["input"][0]["data_type"], "TYPE_INT32");
        assert_eq!(j["input"][0]["dims"][0], 16);
        assert_eq!(j["max_batch_size"], 8);
        assert_eq!(j["version_policy"]["latest"]["num_versions"], 1);
        assert_eq!(j["instance_group"][0]["kind"], "KIND_CPU");
        assert_eq!(j["optimization"]["input_pinned_memory"]["enable"], true);
        // default-valued scalars are printed, as Triton does
        assert_eq!(j["input"][0]["optional"], false);
        let back = parse_json(&j.to_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn list_colon_shim_leaves_strings_comments_and_lines_alone() {
        let t = "input [ { name: \"a [\" } ] # x [\nout: [1]\nname: \"é\" tags [ ]";
        let s = colon_before_lists(t);
        assert_eq!(
            s,
            "input :[ { name: \"a [\" } ] # x [\nout: [1]\nname: \"é\" tags :[ ]"
        );
    }

    #[test]
    fn unknown_field_reports_file_and_line() {
        let text = "name: \"m\"\nbackend: \"x\"\nmax_batch_sise: 4\n";
        let err = parse_pbtxt(Path::new("m/config.pbtxt"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m/config.pbtxt:3:"), "{err}");
        assert!(err.contains("max_batch_sise"), "{err}");
    }

    #[test]
    fn invalid_dims_name_the_tensor_line() {
        let text =
            "backend: \"x\"\ninput [\n { name: \"A\" data_type: TYPE_FP32 dims: [ 0 ] }\n]\n";
        let p = Path::new("m/config.pbtxt");
        let mut c = parse_pbtxt(p, text).unwrap();
        let err = normalize(&mut c, p, text, "m", 0).unwrap_err().to_string();
        assert!(err.starts_with("m/config.pbtxt:3:"), "{err}");
        assert!(err.contains("'A'"), "{err}");
    }

    #[test]
    fn name_mismatch_and_missing_backend_rejected() {
        let p = Path::new("m/config.pbtxt");
        let mut c = parse_pbtxt(p, "name: \"other\" backend: \"x\"").unwrap();
        assert!(normalize(&mut c, p, "", "m", 0).is_err());
        let mut c = parse_pbtxt(p, "max_batch_size: 1").unwrap();
        assert!(normalize(&mut c, p, "", "m", 0)
            .unwrap_err()
            .to_string()
            .contains("backend"));
        let mut c = parse_pbtxt(p, "platform: \"onnxruntime_onnx\"").unwrap();
        normalize(&mut c, p, "", "m", 0).unwrap();
        assert_eq!(c.backend, "onnxruntime");
    }

    #[test]
    fn dynamic_batching_prefers_max_batch_size_and_allows_no_batching() {
        let p = Path::new("m/config.pbtxt");
        let preferred = |c: &ModelConfig| match &c.scheduling_choice {
            Some(SchedulingChoice::DynamicBatching(db)) => db.preferred_batch_size.clone(),
            _ => panic!("no dynamic batching"),
        };
        let mut c =
            parse_pbtxt(p, "backend: \"x\" max_batch_size: 8 dynamic_batching { }").unwrap();
        normalize(&mut c, p, "", "m", 0).unwrap();
        assert_eq!(preferred(&c), [8]);
        let mut c = parse_pbtxt(
            p,
            "backend: \"x\" max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 2 ] }",
        )
        .unwrap();
        normalize(&mut c, p, "", "m", 0).unwrap();
        assert_eq!(preferred(&c), [2]);
        // Without batching: the dynamic batcher's queues only, no preferred size.
        let mut c = parse_pbtxt(p, "backend: \"x\" dynamic_batching { }").unwrap();
        normalize(&mut c, p, "", "m", 0).unwrap();
        assert!(preferred(&c).is_empty());
    }
}
