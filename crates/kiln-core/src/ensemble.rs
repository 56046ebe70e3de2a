//! Triton's ensemble models (`platform: "ensemble"`): a pipeline of other models, as
//! `ensemble_scheduling` describes it. Each step maps ensemble tensors to a composing
//! model's inputs (`input_map { key: <model input> value: <ensemble tensor> }`) and its
//! outputs back to ensemble tensors (`output_map`). A request runs every step as soon as
//! the tensors it reads exist (independent steps at the same time), each as an ordinary
//! request to the composing model's ready version, looked up per request; the ensemble's
//! outputs are then answered as any model's are. After a decoupled composing model, the
//! later steps run once per response it sends, and each run answers the client (a stream
//! of responses, then the final flag). `max_inflight_requests` bounds the requests in
//! flight at each step across all ensemble requests. Checked at load: the steps form a graph
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

/// The ensemble tensors one line of a request's dataflow knows, and what it has done.
#[derive(Clone)]
struct Flow {
    values: HashMap<String, InputTensor>,
    /// The steps submitted in this flow.
    ran: Vec<bool>,
    /// An ensemble output was written in this flow (not only inherited).
    fresh: bool,
    /// This flow has answered the client.
    answered: bool,
}

/// An event of one step request, tagged with the flow it runs in.
struct StepEvent {
    flow: usize,
    step: usize,
    decoupled: bool,
    event: ResponseEvent,
}

/// A loaded ensemble's steps.
pub struct Ensemble {
    steps: Vec<Step>,
    models: Models,
    /// `max_inflight_requests` (`max_inflight_responses` in older configs): how many
    /// requests of all ensemble requests together may be in flight at each step.
    gates: Vec<Option<Arc<tokio::sync::Semaphore>>>,
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
        let limit = match &cfg.scheduling_choice {
            Some(SchedulingChoice::EnsembleScheduling(e)) => e.max_inflight_responses as usize,
            _ => 0,
        };
        let gates = steps
            .iter()
            .map(|_| (limit > 0).then(|| Arc::new(tokio::sync::Semaphore::new(limit))))
            .collect();
        Ok(Ensemble {
            steps,
            models,
            gates,
        })
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
            match me.run(&shared, &request, &sink).await {
                Ok(last) => {
                    // Counted before the client hears the end, so statistics read right
                    // after a response include it.
                    let total = request.arrival.elapsed();
                    let compute = ComputeTimes {
                        infer: started.elapsed(),
                        ..Default::default()
                    };
                    shared.stats.record_execution(batch_size, compute);
                    shared.stats.record_success(total, Duration::ZERO, compute);
                    sink.send(last);
                }
                Err(e) => {
                    let reason = crate::stats::FailReason::Backend;
                    shared
                        .stats
                        .record_failure(request.arrival.elapsed(), reason);
                    sink.send(ResponseEvent::Error(e));
                }
            }
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

    /// Whether a request now may get several responses: some composing model is decoupled.
    fn streams(&self) -> bool {
        self.steps.iter().any(|s| {
            repository::find(&self.models, &s.model, s.version)
                .is_ok_and(|mv| mv.shared.is_decoupled())
        })
    }

    /// The dataflow of one request. A step runs in a flow (the ensemble tensors known to
    /// one line of work) once the tensors it reads exist there. A step with one response
    /// adds its outputs to its flow; each response of a decoupled step starts a new flow
    /// from a copy of its own, so the steps after it run once per response. A flow whose
    /// tensors come to include every ensemble output answers the client: once, as the
    /// final response, when no composing model is decoupled; otherwise once per flow,
    /// followed by the final flag when every step request has finished. Returns the last event
    /// (the final response or flag), for the caller to send once it has counted the request.
    async fn run(
        &self,
        shared: &ModelShared,
        request: &InferRequest,
        sink: &ResponseSink,
    ) -> CoreResult<ResponseEvent> {
        let streaming = self.streams();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StepEvent>();
        let mut flows = vec![Flow {
            values: request
                .inputs
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            ran: vec![false; self.steps.len()],
            fresh: false,
            answered: false,
        }];
        let mut live = self.launch(&mut flows[0], 0, request, &tx);
        let mut answer = None;
        while live > 0 {
            let Some(StepEvent {
                flow,
                step,
                decoupled,
                event,
            }) = rx.recv().await
            else {
                break;
            };
            let (response, last) = match event {
                // An error response fails the ensemble's request, even mid-stream.
                ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => return Err(e),
                ResponseEvent::Final => {
                    live -= 1;
                    continue;
                }
                ResponseEvent::Response { response, last } => (response, last),
            };
            if last {
                live -= 1;
            }
            let target = if decoupled {
                let mut child = flows[flow].clone();
                (child.fresh, child.answered) = (false, false);
                flows.push(child);
                flows.len() - 1
            } else {
                flow
            };
            let s = &self.steps[step];
            let f = &mut flows[target];
            for out in response.outputs {
                if let Some((_, t)) = s.outputs.iter().find(|(o, _)| *o == out.name) {
                    f.fresh |= shared.output_names.contains(t);
                    let v = InputTensor {
                        name: t.clone(),
                        dtype: out.dtype,
                        shape: out.shape,
                        data: out.data,
                    };
                    f.values.insert(t.clone(), v);
                }
            }
            live += self.launch(f, target, request, &tx);
            let complete = shared.output_names.iter().all(|n| f.values.contains_key(n));
            if complete && f.fresh && !f.answered {
                f.answered = true;
                let produced = shared
                    .output_names
                    .iter()
                    .filter_map(|n| {
                        f.values.get(n).map(|v| {
                            (
                                n.clone(),
                                v.dtype,
                                v.shape.clone(),
                                Vec::from(v.data.as_ref()),
                            )
                        })
                    })
                    .collect();
                let response = InferResponse {
                    model_name: shared.name.clone(),
                    model_version: shared.version,
                    id: request.id.clone(),
                    outputs: crate::model::build_response(shared, request, produced)?,
                    parameters: Default::default(),
                };
                if streaming {
                    sink.send(ResponseEvent::Response {
                        response,
                        last: false,
                    });
                } else {
                    answer = Some(response);
                }
            }
        }
        if streaming {
            return Ok(ResponseEvent::Final);
        }
        let response = answer.ok_or_else(|| {
            CoreError::internal(format!(
                "ensemble '{}' finished without producing its outputs",
                shared.name
            ))
        })?;
        Ok(ResponseEvent::Response {
            response,
            last: true,
        })
    }

    /// Submits every step of `flow` (number `index`) whose tensors exist and that has not
    /// run there; their events (or the error of a submission) come back on `tx`. Returns
    /// how many were started.
    fn launch(
        &self,
        flow: &mut Flow,
        index: usize,
        request: &InferRequest,
        tx: &tokio::sync::mpsc::UnboundedSender<StepEvent>,
    ) -> usize {
        let mut submitted = 0;
        for (i, step) in self.steps.iter().enumerate() {
            if flow.ran[i] || !step.inputs.iter().all(|(_, t)| flow.values.contains_key(t)) {
                continue;
            }
            flow.ran[i] = true;
            let gate = self.gates[i].clone();
            let tx = tx.clone();
            let model = step.model.clone();
            let submit = self.prepare_step(step, request, &flow.values);
            tokio::spawn(async move {
                // Under `max_inflight_requests`, wait for room at this step.
                let _permit = match gate {
                    Some(g) => g.acquire_owned().await.ok(),
                    None => None,
                };
                let (mut rx, decoupled) = match submit.and_then(|(mv, inner)| {
                    let decoupled = mv.shared.is_decoupled();
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    mv.submit(inner, ResponseSink::new(tx))?;
                    Ok((rx, decoupled))
                }) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(StepEvent {
                            flow: index,
                            step: i,
                            decoupled: false,
                            event: ResponseEvent::Error(e),
                        });
                        return;
                    }
                };
                let forward = |event| StepEvent {
                    flow: index,
                    step: i,
                    decoupled,
                    event,
                };
                let mut answered = false;
                while let Some(event) = rx.recv().await {
                    let last = event.is_final();
                    answered |= matches!(event, ResponseEvent::Response { .. });
                    if tx.send(forward(event)).is_err() || last {
                        return;
                    }
                }
                // The model let the request go without a final event.
                let event = if answered || decoupled {
                    ResponseEvent::Final
                } else {
                    ResponseEvent::Error(CoreError::internal(format!(
                        "composing model '{model}' finished without a response"
                    )))
                };
                let _ = tx.send(forward(event));
            });
            submitted += 1;
        }
        submitted
    }

    /// One step's request to its composing model's ready version.
    fn prepare_step(
        &self,
        step: &Step,
        request: &InferRequest,
        values: &HashMap<String, InputTensor>,
    ) -> CoreResult<(Arc<crate::model::ModelVersion>, InferRequest)> {
        let mv = repository::find(&self.models, &step.model, step.version)?;
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
        Ok((mv, inner))
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
