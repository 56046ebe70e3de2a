//! Triton's ragged batching, as far as the core is concerned: the `batch_input` and
//! `batch_output` of a config are checked as Triton checks them (with its messages), and
//! inputs with `allow_ragged_batch` join a dynamic batch whatever their shapes (see
//! [`crate::model::ModelShared::validate`]). The backend builds the batch inputs and
//! scatters the batch outputs (`kiln_sdk::BatchIo`), as Triton's backends do.
use std::collections::HashSet;

use kiln_proto::inference::{batch_input, batch_output, DataType as PbDataType, ModelConfig};

/// Checks the batch inputs and outputs against the config's inputs and outputs.
pub fn check(cfg: &ModelConfig) -> Result<(), String> {
    let inputs: HashSet<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
    let outputs: HashSet<&str> = cfg.output.iter().map(|o| o.name.as_str()).collect();
    let known_source =
        |sources: &[String]| match sources.iter().find(|s| !inputs.contains(s.as_str())) {
            Some(s) => Err(format!("unknown source input name '{s}'")),
            None => Ok(()),
        };
    // Both kinds of entry derive from exactly one source input.
    let one_source = |what: &str, kind: &str, sources: &[String]| match sources.len() {
        1 => Ok(()),
        n => Err(format!(
            "{what} kind '{kind}' expects 1 source input, got {n}"
        )),
    };
    for b in &cfg.batch_input {
        let Ok(kind) = batch_input::Kind::try_from(b.kind) else {
            return Err(format!("unknown batch input kind '{}'", b.kind));
        };
        one_source("batch input", kind.as_str_name(), &b.source_input)?;
        if b.data_type != PbDataType::TypeInt32 as i32 && b.data_type != PbDataType::TypeFp32 as i32
        {
            return Err("batch input data type must be TYPE_INT32 or TYPE_FP32".into());
        }
        known_source(&b.source_input)?;
        if b.target_name.is_empty() {
            return Err(format!(
                "batch input kind '{}' must name a 'target_name'",
                kind.as_str_name()
            ));
        }
        if let Some(t) = b.target_name.iter().find(|t| inputs.contains(t.as_str())) {
            return Err(format!(
                "batch input target '{t}' is also a model input: the server produces it"
            ));
        }
    }
    for b in &cfg.batch_output {
        let Ok(kind) = batch_output::Kind::try_from(b.kind) else {
            return Err(format!("unknown batch output kind '{}'", b.kind));
        };
        one_source("batch output", kind.as_str_name(), &b.source_input)?;
        known_source(&b.source_input)?;
        let mut targets = HashSet::new();
        for t in &b.target_name {
            if !outputs.contains(t.as_str()) {
                return Err(format!("unknown target output name '{t}'"));
            }
            if !targets.insert(t.as_str()) {
                return Err(format!(
                    "target output name '{t}' can only be specified once"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::inference::{BatchInput, BatchOutput, ModelInput, ModelOutput};

    fn config() -> ModelConfig {
        ModelConfig {
            input: vec![ModelInput {
                name: "INPUT".into(),
                allow_ragged_batch: true,
                ..Default::default()
            }],
            output: vec![ModelOutput {
                name: "OUT".into(),
                ..Default::default()
            }],
            batch_input: vec![BatchInput {
                kind: batch_input::Kind::BatchAccumulatedElementCount as i32,
                target_name: vec!["INDEX".into()],
                data_type: PbDataType::TypeFp32 as i32,
                source_input: vec!["INPUT".into()],
            }],
            batch_output: vec![BatchOutput {
                target_name: vec!["OUT".into()],
                kind: batch_output::Kind::BatchScatterWithInputShape as i32,
                source_input: vec!["INPUT".into()],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_well_formed_ragged_config() {
        assert_eq!(check(&config()), Ok(()));
    }

    #[test]
    fn refuses_what_triton_refuses_with_its_messages() {
        let mut c = config();
        c.batch_input[0].source_input.push("INPUT".into());
        assert_eq!(
            check(&c),
            Err(
                "batch input kind 'BATCH_ACCUMULATED_ELEMENT_COUNT' expects 1 source input, got 2"
                    .into()
            )
        );
        let mut c = config();
        c.batch_input[0].data_type = PbDataType::TypeInt64 as i32;
        assert_eq!(
            check(&c),
            Err("batch input data type must be TYPE_INT32 or TYPE_FP32".into())
        );
        let mut c = config();
        c.batch_input[0].source_input = vec!["NOPE".into()];
        assert_eq!(check(&c), Err("unknown source input name 'NOPE'".into()));
        let mut c = config();
        c.batch_output[0].target_name = vec!["NOPE".into()];
        assert_eq!(check(&c), Err("unknown target output name 'NOPE'".into()));
        let mut c = config();
        c.batch_output[0].target_name.push("OUT".into());
        assert_eq!(
            check(&c),
            Err("target output name 'OUT' can only be specified once".into())
        );
        let mut c = config();
        c.batch_input[0].target_name = vec!["INPUT".into()];
        assert!(check(&c).unwrap_err().contains("also a model input"));
    }
}
