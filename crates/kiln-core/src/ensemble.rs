//! Triton's ensemble models (`platform: "ensemble"`): a pipeline of other models, as
//! `ensemble_scheduling` describes it. Each step maps ensemble tensors to a composing
//! model's inputs (`input_map { key: <model input> value: <ensemble tensor> }`) and its
//! outputs back to ensemble tensors (`output_map`). A request runs every step as soon as
//! the tensors it reads exist (independent steps at the same time), each as an ordinary
//! request to the composing model's ready version, looked up per request; the ensemble's
//! outputs are then answered as any model's are. Checked at load: the steps form a graph
//! from the ensemble's inputs to all of its outputs, and the composing models are ready
//! and have the tensors the maps name.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::inference::{model_config::SchedulingChoice, ModelConfig};

use crate::error::{CoreError, CoreResult};
use crate::model::ModelShared;
use crate::repository::{self, Models};
use crate::request::{InferRequest, InferResponse, InputTensor, RequestedOutput, ResponseEvent};
use crate::sink::ResponseSink;
use crate::stats::ComputeTimes;

/// The platform name that makes a config an ensemble.
pub const PLATFORM: &str = "ensemble";

/// Whether `cfg` describes an ensemble.
pub fn is_ensemble(cfg: &ModelConfig) -> bool {
    cfg.platform == PLATFORM
}

/// The composing models `cfg`'s steps name (none when it is no ensemble).
pub fn composing_models(cfg: &ModelConfig) -> Vec<String> {
    let mut names: Vec<String> = steps_of(cfg).iter().map(|s| s.model_name.clone()).collect();
    names.sort();
    names.dedup();
    names
}

fn steps_of(cfg: &ModelConfig) -> &[kiln_proto::inference::model_ensembling::Step] {
    match &cfg.scheduling_choice {
        Some(SchedulingChoice::EnsembleScheduling(e)) => &e.step,
        _ => &[],
    }
}

/// One step: a composing model and how its tensors map to the ensemble's.
#[derive(Debug)]
struct Step {
    model: String,
    /// `None`: the latest ready version (`model_version: -1`).
    version: Option<i64>,
    /// (model input, ensemble tensor).
    inputs: Vec<(String, String)>,
    /// (model output, ensemble tensor).
    outputs: Vec<(String, String)>,
}

/// A loaded ensemble's steps.
pub struct Ensemble {
    steps: Vec<Step>,
    models: Models,
}

impl Ensemble {
    /// The steps of `cfg`, checked: every step reads ensemble inputs or tensors earlier
    /// steps write, no tensor is written twice, every ensemble output is written, and each
    /// composing model is ready with the inputs and outputs its maps name.
    pub(crate) fn new(cfg: &ModelConfig, models: Models) -> CoreResult<Ensemble> {
        let name = &cfg.name;
        let bad = |msg: String| CoreError::invalid(format!("ensemble '{name}': {msg}"));
        let raw = steps_of(cfg);
        if raw.is_empty() {
            return Err(bad(
                "must specify one or more 'step' in 'ensemble_scheduling'".into(),
            ));
        }
        let sorted = |m: &HashMap<String, String>| {
            let mut v: Vec<(String, String)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        let steps: Vec<Step> = raw
            .iter()
            .map(|s| Step {
                model: s.model_name.clone(),
                version: (s.model_version >= 0).then_some(s.model_version),
                inputs: sorted(&s.input_map),
                outputs: sorted(&s.output_map),
            })
            .collect();
        // Tensors in the order the steps can make them.
        let mut known: HashSet<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
        let mut written: HashSet<&str> = HashSet::new();
        for s in &steps {
            for (_, t) in &s.outputs {
                if known.contains(t.as_str()) || !written.insert(t.as_str()) {
                    return Err(bad(format!(
                        "ensemble tensor '{t}' is written by more than one step (or is an ensemble input)"
                    )));
                }
            }
        }
        let mut pending: Vec<&Step> = steps.iter().collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|s| {
                let ready = s.inputs.iter().all(|(_, t)| known.contains(t.as_str()));
                if ready {
                    known.extend(s.outputs.iter().map(|(_, t)| t.as_str()));
                }
                !ready
            });
            if pending.len() == before {
                let s = pending[0];
                let missing: Vec<&str> = s
                    .inputs
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .filter(|t| !known.contains(t))
                    .collect();
                return Err(bad(format!(
                    "step '{}' reads {} that no ensemble input or earlier step provides",
                    s.model,
                    missing
                        .iter()
                        .map(|t| format!("'{t}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        for o in &cfg.output {
            if !known.contains(o.name.as_str()) {
                return Err(bad(format!(
                    "ensemble output '{}' is not written by any step",
                    o.name
                )));
            }
        }
        for s in &steps {
            let mv = repository::find(&models, &s.model, s.version).map_err(|e| {
                bad(format!(
                    "composing model '{}' is not available: {}",
                    s.model, e.message
                ))
            })?;
            let mbs = u64::try_from(cfg.max_batch_size).unwrap_or(0);
            if mbs > mv.shared.max_batch_size {
                return Err(bad(format!(
                    "allows maximum batch size {mbs}, but it contains model '{}' which only allows maximum batch size to be {}",
                    s.model, mv.shared.max_batch_size
                )));
            }
            let has =
                |specs: &[crate::model::TensorSpec], n: &str| specs.iter().any(|t| t.name == n);
            for (i, _) in &s.inputs {
                if !has(&mv.shared.inputs, i) {
                    return Err(bad(format!(
                        "step '{}' maps input '{i}', which the model does not have",
                        s.model
                    )));
                }
            }
            for (o, _) in &s.outputs {
                if !has(&mv.shared.outputs, o) {
                    return Err(bad(format!(
                        "step '{}' maps output '{o}', which the model does not have",
                        s.model
                    )));
                }
            }
        }
        Ok(Ensemble { steps, models })
    }

    /// Runs `request` (validated against the ensemble's config) through the steps and
    /// answers on `sink`, on the caller's tokio runtime or, outside one, on a thread of its
    /// own.
    pub(crate) fn start(
        self: &Arc<Self>,
        shared: Arc<ModelShared>,
        request: InferRequest,
        batch_size: u64,
        sink: ResponseSink,
    ) {
        let me = self.clone();
        let work = async move {
            let started = Instant::now();
            let event = match me.run(&shared, &request).await {
                Ok(response) => {
                    let total = request.arrival.elapsed();
                    let compute = ComputeTimes {
                        infer: started.elapsed(),
                        ..Default::default()
                    };
                    shared.stats.record_execution(batch_size, compute);
                    shared.stats.record_success(total, Duration::ZERO, compute);
                    ResponseEvent::Response {
                        response,
                        last: true,
                    }
                }
                Err(e) => {
                    let reason = crate::stats::FailReason::Backend;
                    shared
                        .stats
                        .record_failure(request.arrival.elapsed(), reason);
                    ResponseEvent::Error(e)
                }
            };
            sink.send(event);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(work);
            }
            Err(_) => {
                std::thread::spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().build() {
                        Ok(rt) => rt.block_on(work),
                        Err(e) => tracing::error!("ensemble: cannot start a runtime: {e}"),
                    }
                });
            }
        }
    }

    async fn run(&self, shared: &ModelShared, request: &InferRequest) -> CoreResult<InferResponse> {
        // Ensemble tensors by name (each held as the tensor its producer answered).
        let mut values: HashMap<String, InputTensor> = request
            .inputs
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        let mut done = vec![false; self.steps.len()];
        loop {
            let ready: Vec<usize> = (0..self.steps.len())
                .filter(|&i| !done[i])
                .filter(|&i| {
                    self.steps[i]
                        .inputs
                        .iter()
                        .all(|(_, t)| values.contains_key(t))
                })
                .collect();
            if ready.is_empty() {
                break;
            }
            // The ready steps run at the same time; their results are taken in order.
            let mut running = Vec::with_capacity(ready.len());
            for &i in &ready {
                done[i] = true;
                running.push(self.submit_step(&self.steps[i], request, &values)?);
            }
            for (&i, mut rx) in ready.iter().zip(running) {
                let step = &self.steps[i];
                let response = match rx.recv().await {
                    Some(ResponseEvent::Response { response, .. }) => response,
                    Some(ResponseEvent::Error(e)) => return Err(e),
                    Some(ResponseEvent::Final) | None => {
                        return Err(CoreError::internal(format!(
                            "composing model '{}' finished without a response",
                            step.model
                        )))
                    }
                };
                for out in response.outputs {
                    if let Some((_, t)) = step.outputs.iter().find(|(o, _)| *o == out.name) {
                        let v = InputTensor {
                            name: t.clone(),
                            dtype: out.dtype,
                            shape: out.shape,
                            data: out.data,
                        };
                        values.insert(t.clone(), v);
                    }
                }
            }
        }
        let produced = shared
            .output_names
            .iter()
            .filter_map(|n| {
                values
                    .remove(n)
                    .map(|v| (n.clone(), v.dtype, v.shape, Vec::from(v.data)))
            })
            .collect();
        let outputs = crate::model::build_response(shared, request, produced)?;
        Ok(InferResponse {
            model_name: shared.name.clone(),
            model_version: shared.version,
            id: request.id.clone(),
            outputs,
        })
    }

    /// Sends one step's request to its composing model; the response arrives on the
    /// returned stream.
    fn submit_step(
        &self,
        step: &Step,
        request: &InferRequest,
        values: &HashMap<String, InputTensor>,
    ) -> CoreResult<crate::request::ResponseStream> {
        let mv = repository::find(&self.models, &step.model, step.version)?;
        if mv.shared.is_decoupled() {
            return Err(CoreError::unsupported(format!(
                "composing model '{}' is decoupled, which Kiln's ensembles do not support",
                step.model
            )));
        }
        let mut inner = InferRequest::new(step.model.clone());
        inner.model_version = step.version;
        inner.id = request.id.clone();
        inner.correlation_id = request.correlation_id;
        inner.correlation_text = request.correlation_text.clone();
        inner.flags = request.flags;
        inner.priority = request.priority;
        inner.timeout_us = request.timeout_us;
        inner.parameters = request.parameters.clone();
        inner.inputs = step
            .inputs
            .iter()
            .filter_map(|(input, t)| {
                values.get(t).map(|v| InputTensor {
                    name: input.clone(),
                    ..v.clone()
                })
            })
            .collect();
        inner.outputs = step
            .outputs
            .iter()
            .map(|(o, _)| RequestedOutput {
                name: o.clone(),
                class_count: 0,
                shm: None,
            })
            .collect();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        mv.submit(inner, ResponseSink::new(tx))?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ensemble(steps: &str, outputs: &str) -> CoreResult<Ensemble> {
        let text = format!(
            "name: \"e\" platform: \"ensemble\" max_batch_size: 4\n\
             input [ {{ name: \"A\" data_type: TYPE_FP32 dims: [ 2 ] }} ]\n\
             output [ {outputs} ]\nensemble_scheduling {{ step [ {steps} ] }}"
        );
        let cfg = crate::config::parse_pbtxt(std::path::Path::new("e/config.pbtxt"), &text)
            .expect("config parses");
        Ensemble::new(&cfg, Models::default())
    }

    fn step(model: &str, input: (&str, &str), output: (&str, &str)) -> String {
        format!(
            "{{ model_name: \"{model}\" model_version: -1 input_map {{ key: \"{}\" value: \"{}\" }} \
             output_map {{ key: \"{}\" value: \"{}\" }} }}",
            input.0, input.1, output.0, output.1
        )
    }

    const OUT: &str = "{ name: \"OUT\" data_type: TYPE_FP32 dims: [ 2 ] }";

    fn error(r: CoreResult<Ensemble>) -> String {
        match r {
            Ok(_) => panic!("the ensemble should not load"),
            Err(e) => e.message,
        }
    }

    #[test]
    fn steps_must_form_a_graph_from_the_inputs_to_every_output() {
        // Two steps waiting on each other.
        let cycle = [
            step("m", ("x", "t2"), ("y", "t1")),
            step("m", ("x", "t1"), ("y", "OUT")),
        ];
        let e = error(ensemble(&cycle.join(","), OUT));
        assert!(e.contains("reads 't2'"), "{e}");
        // A tensor written twice.
        let twice = [
            step("m", ("x", "A"), ("y", "OUT")),
            step("m", ("x", "A"), ("y", "OUT")),
        ];
        let e = error(ensemble(&twice.join(","), OUT));
        assert!(e.contains("'OUT' is written by more than one step"), "{e}");
        // An output nobody writes.
        let e = error(ensemble(&step("m", ("x", "A"), ("y", "other")), OUT));
        assert!(e.contains("ensemble output 'OUT' is not written"), "{e}");
        // No steps at all.
        let e = error(ensemble("", OUT));
        assert!(e.contains("one or more 'step'"), "{e}");
    }

    #[test]
    fn a_sound_graph_still_needs_its_composing_models_ready() {
        let chain = [
            step("first", ("x", "A"), ("y", "mid")),
            step("second", ("x", "mid"), ("y", "OUT")),
        ];
        let e = error(ensemble(&chain.join(","), OUT));
        assert!(
            e.contains("composing model 'first' is not available"),
            "{e}"
        );
        assert!(e.contains("not found"), "{e}");
    }
}
