//! Rules a normalized config must keep, checked as Triton's `ValidateModelConfig` and
//! `ValidateModelInput` check them, with Triton's messages: dynamic batching's preferred
//! sizes, priority levels and ordering, the sequence batcher's strategy, instance groups'
//! GPUs, and input formats and shape tensors.
use kiln_proto::inference::{
    model_config::SchedulingChoice, model_input::Format, model_instance_group::Kind,
    model_queue_policy::TimeoutAction, model_sequence_batching::StrategyChoice, ModelConfig,
    ModelQueuePolicy,
};

/// Checks `cfg` (after normalization); the error is Triton's message.
pub fn check(cfg: &ModelConfig) -> Result<(), String> {
    let name = &cfg.name;
    match &cfg.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(db)) => {
            preferred(
                cfg,
                "dynamic batching preferred size",
                &db.preferred_batch_size,
            )?;
            let levels = db.priority_levels;
            if levels != 0 {
                if db.default_priority_level == 0 || db.default_priority_level > levels {
                    return Err(format!(
                        "default priority level must be in range [1, {levels}] for {name}"
                    ));
                }
                if db
                    .priority_queue_policy
                    .keys()
                    .any(|&l| l == 0 || l > levels)
                {
                    return Err(format!(
                        "priority queue policy must have priority level in range [1, {levels}] for {name}"
                    ));
                }
            }
            if db.preserve_ordering {
                if levels > 1 {
                    return Err(format!(
                        "Only one priority level is allowed when 'preserve_ordering' is true for {name}"
                    ));
                }
                let delays = |p: &ModelQueuePolicy| {
                    p.default_timeout_microseconds != 0
                        && p.timeout_action == TimeoutAction::Delay as i32
                };
                if db.default_queue_policy.as_ref().is_some_and(delays)
                    || db.priority_queue_policy.values().any(delays)
                {
                    return Err(format!(
                        "Queue policy can not have DELAY as timeout action when 'preserve_ordering' is true for {name}"
                    ));
                }
            }
        }
        Some(SchedulingChoice::SequenceBatching(sb)) => match &sb.strategy_choice {
            Some(StrategyChoice::Oldest(o)) => preferred(
                cfg,
                "sequence batching preferred batch size",
                &o.preferred_batch_size,
            )?,
            Some(StrategyChoice::Direct(d))
                if !(0.0..=1.0).contains(&d.minimum_slot_utilization) =>
            {
                return Err(format!(
                    "sequence batching minimum slot utilization must be in range (0.0, 1.0] for {name}"
                ));
            }
            _ => {}
        },
        _ => {}
    }
    for g in &cfg.instance_group {
        let kind = match Kind::try_from(g.kind) {
            Ok(Kind::Model) => "KIND_MODEL",
            Ok(Kind::Cpu) => "KIND_CPU",
            _ => continue,
        };
        if !g.gpus.is_empty() {
            return Err(format!(
                "instance group {} of model {name} has kind {kind} but specifies one or more GPUs",
                g.name
            ));
        }
    }
    for input in &cfg.input {
        let image = input.format == Format::Nhwc as i32 || input.format == Format::Nchw as i32;
        if image && input.dims.len() != 3 {
            return Err("model input NHWC/NCHW require 3 dims".into());
        }
        if input.is_shape_tensor {
            return Err("shape tensors are only supported for TensorRT platform".into());
        }
    }
    Ok(())
}

/// Preferred batch sizes (`what` names them in the message) are positive and at most
/// `max_batch_size`.
fn preferred(cfg: &ModelConfig, what: &str, sizes: &[i32]) -> Result<(), String> {
    let name = &cfg.name;
    match sizes.iter().find(|&&s| s <= 0 || s > cfg.max_batch_size) {
        Some(&s) if s <= 0 => Err(format!("{what} must be positive for {name}")),
        Some(_) => Err(format!("{what} must be <= max batch size for {name}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::inference::{
        model_sequence_batching::{StrategyDirect, StrategyOldest},
        ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelSequenceBatching,
    };

    fn with(scheduling: SchedulingChoice) -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            max_batch_size: 8,
            scheduling_choice: Some(scheduling),
            ..Default::default()
        }
    }

    fn dynamic(db: ModelDynamicBatching) -> Result<(), String> {
        check(&with(SchedulingChoice::DynamicBatching(db)))
    }

    #[test]
    fn dynamic_batching_rules_use_tritons_messages() {
        assert_eq!(dynamic(ModelDynamicBatching::default()), Ok(()));
        let sizes = |v: Vec<i32>| ModelDynamicBatching {
            preferred_batch_size: v,
            ..Default::default()
        };
        assert_eq!(
            dynamic(sizes(vec![4, 9])),
            Err("dynamic batching preferred size must be <= max batch size for m".into())
        );
        assert!(dynamic(sizes(vec![0]))
            .unwrap_err()
            .contains("must be positive"));
        let levels = ModelDynamicBatching {
            priority_levels: 2,
            default_priority_level: 3,
            ..Default::default()
        };
        assert_eq!(
            dynamic(levels.clone()),
            Err("default priority level must be in range [1, 2] for m".into())
        );
        let ordered = ModelDynamicBatching {
            default_priority_level: 1,
            preserve_ordering: true,
            ..levels
        };
        assert!(dynamic(ordered)
            .unwrap_err()
            .starts_with("Only one priority level"));
        let delaying = ModelDynamicBatching {
            preserve_ordering: true,
            default_queue_policy: Some(ModelQueuePolicy {
                timeout_action: TimeoutAction::Delay as i32,
                default_timeout_microseconds: 100,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(dynamic(delaying).unwrap_err().contains("DELAY"));
    }

    #[test]
    fn sequence_groups_and_inputs_follow_triton() {
        let oldest = StrategyChoice::Oldest(StrategyOldest {
            preferred_batch_size: vec![16],
            ..Default::default()
        });
        let seq = |s| {
            SchedulingChoice::SequenceBatching(ModelSequenceBatching {
                strategy_choice: Some(s),
                ..Default::default()
            })
        };
        assert!(check(&with(seq(oldest)))
            .unwrap_err()
            .contains("<= max batch size"));
        let direct = StrategyChoice::Direct(StrategyDirect {
            minimum_slot_utilization: 1.5,
            ..Default::default()
        });
        assert!(check(&with(seq(direct)))
            .unwrap_err()
            .contains("(0.0, 1.0]"));
        let mut cfg = ModelConfig {
            name: "m".into(),
            instance_group: vec![ModelInstanceGroup {
                name: "g".into(),
                kind: Kind::Cpu as i32,
                gpus: vec![0],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check(&cfg),
            Err(
                "instance group g of model m has kind KIND_CPU but specifies one or more GPUs"
                    .into()
            )
        );
        cfg.instance_group.clear();
        cfg.input = vec![ModelInput {
            name: "x".into(),
            format: Format::Nchw as i32,
            dims: vec![3, 224],
            ..Default::default()
        }];
        assert_eq!(
            check(&cfg),
            Err("model input NHWC/NCHW require 3 dims".into())
        );
        cfg.input[0].dims.push(224);
        assert_eq!(check(&cfg), Ok(()));
        cfg.input[0].is_shape_tensor = true;
        assert!(check(&cfg).unwrap_err().contains("TensorRT"));
    }
}
