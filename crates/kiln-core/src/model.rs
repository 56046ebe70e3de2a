//! A loaded model version: its tensor specs, request validation, instance threads and
//! response assembly.
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_abi::{self as abi, KilnInstanceInfo, KilnModelInfo, KilnRequestView, KilnStr};
use kiln_proto::inference::{
    model_config::SchedulingChoice, model_instance_group::Kind, model_queue_policy, ModelConfig,
    ModelQueuePolicy, ModelTensorReshape,
};
use kiln_sdk::{bytes_elements, DataType};

use crate::classification::classify;
use crate::config;
use crate::error::{CoreError, CoreResult};
use crate::host;
use crate::loader::BackendLibrary;
use crate::rate_limit::{RateLimiter, Seat};
use crate::request::{InferRequest, OutputTensor, ResponseSink};
use crate::scheduler::{
    BatchPolicy, Pending, QueuePolicy, Scheduler, SchedulerPolicy, TimeoutAction,
};
use crate::stats::{ComputeTimes, FailReason, ModelStats};

/// An input or output as declared in the config.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Name.
    pub name: String,
    /// Type.
    pub dtype: DataType,
    /// Dims without the batch dimension (-1 = any).
    pub dims: Vec<i64>,
    /// Inputs only: may be omitted.
    pub optional: bool,
    /// The shape the model uses instead of `dims` (Triton's `reshape`), if any.
    pub reshape: Option<Vec<i64>>,
    /// Inputs only: `allow_ragged_batch`, so requests of any shape batch together.
    pub ragged: bool,
}

/// What every part of a loaded model version shares.
#[derive(Debug)]
pub struct ModelShared {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: i64,
    /// Normalized config.
    pub config: ModelConfig,
    /// `config` in Triton's JSON form.
    pub config_json: serde_json::Value,
    /// `max_batch_size` (0 = no batching).
    pub max_batch_size: u64,
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
    /// Output names in config order.
    pub output_names: Vec<String>,
    /// Classification labels per output (from `label_filename`).
    pub labels: HashMap<String, Vec<String>>,
    /// Statistics.
    pub stats: Arc<ModelStats>,
    /// The sequences and control tensors of a `sequence_batching` model.
    pub sequences: Option<crate::sequence::Sequences>,
    /// The server's response cache, when this model uses it.
    pub cache: Option<Arc<crate::cache::ResponseCache>>,
}

type SpecFields<'a> = (
    &'a str,
    i32,
    &'a [i64],
    bool,
    Option<&'a ModelTensorReshape>,
    bool,
);

fn spec_list<'a>(it: impl Iterator<Item = SpecFields<'a>>) -> Vec<TensorSpec> {
    it.filter_map(|(n, t, d, o, r, ragged)| {
        Some(TensorSpec {
            name: n.to_string(),
            dtype: config::data_type(t)?,
            dims: d.to_vec(),
            optional: o,
            reshape: r.map(|r| r.shape.clone()),
            ragged,
        })
    })
    .collect()
}

fn shape_str(s: &[i64]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

impl ModelShared {
    /// Builds the shared part from a normalized config.
    pub fn new(config: ModelConfig, version: i64, model_dir: &Path) -> CoreResult<Self> {
        let inputs = spec_list(config.input.iter().map(|i| {
            let r = i.reshape.as_ref();
            (
                i.name.as_str(),
                i.data_type,
                i.dims.as_slice(),
                i.optional,
                r,
                i.allow_ragged_batch,
            )
        }));
        let outputs = spec_list(config.output.iter().map(|o| {
            let r = o.reshape.as_ref();
            (
                o.name.as_str(),
                o.data_type,
                o.dims.as_slice(),
                false,
                r,
                false,
            )
        }));
        let mut labels = HashMap::new();
        for o in &config.output {
            if !o.label_filename.is_empty() {
                let path = model_dir.join(&o.label_filename);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    CoreError::invalid(format!(
                        "cannot read label file '{}' of output '{}': {e}",
                        path.display(),
                        o.name
                    ))
                })?;
                labels.insert(o.name.clone(), text.lines().map(str::to_string).collect());
            }
        }
        let sequences = crate::sequence::Sequences::from_config(&config, model_dir)?;
        Ok(ModelShared {
            sequences,
            cache: None,
            name: config.name.clone(),
            version,
            config_json: config::to_json(&config),
            max_batch_size: config.max_batch_size.max(0) as u64,
            output_names: outputs.iter().map(|o| o.name.clone()).collect(),
            inputs,
            outputs,
            labels,
            stats: Arc::new(ModelStats::default()),
            config,
        })
    }

    /// Uses the server's response cache when the config enables it (`response_cache {
    /// enable: true }`) and the model can be cached: not an ensemble, a sequence model or
    /// a decoupled one (as in Triton).
    pub fn with_cache(mut self, cache: Option<&Arc<crate::cache::ResponseCache>>) -> Self {
        let enabled = self
            .config
            .response_cache
            .as_ref()
            .is_some_and(|c| c.enable);
        if enabled
            && self.sequences.is_none()
            && !self.is_decoupled()
            && !crate::ensemble::is_ensemble(&self.config)
        {
            self.cache = cache.cloned();
        }
        self
    }

    /// Whether the model may send any number of responses per request.
    pub fn is_decoupled(&self) -> bool {
        self.config
            .model_transaction_policy
            .as_ref()
            .is_some_and(|p| p.decoupled)
    }

    /// Checks a request against the config. Returns its batch size and the non-batch
    /// shapes of its inputs (the dynamic batcher merges only equal ones; a ragged input's
    /// is left empty).
    pub fn validate(&self, req: &InferRequest) -> CoreResult<(u64, Vec<Vec<i64>>)> {
        let model = &self.name;
        let mbs = self.max_batch_size;
        let mut batch: Option<u64> = None;
        let mut seen = HashSet::new();
        let mut key = Vec::with_capacity(req.inputs.len());
        for t in &req.inputs {
            let Some(spec) = self.inputs.iter().find(|s| s.name == t.name) else {
                return Err(CoreError::invalid(format!(
                    "unexpected inference input '{}' for model '{model}'",
                    t.name
                )));
            };
            if !seen.insert(t.name.as_str()) {
                return Err(CoreError::invalid(format!(
                    "input '{}' already exists in request",
                    t.name
                )));
            }
            if t.dtype != spec.dtype {
                return Err(CoreError::invalid(format!(
                    "inference input '{}' data-type is '{}', but model '{model}' expects '{}'",
                    t.name, t.dtype, spec.dtype
                )));
            }
            if t.shape.iter().any(|&d| d < 0) {
                return Err(CoreError::invalid(format!(
                    "input '{}' has a negative dimension in shape {}",
                    t.name,
                    shape_str(&t.shape)
                )));
            }
            let item_shape: &[i64] = if mbs > 0 {
                let Some((&b, rest)) = t.shape.split_first() else {
                    return Err(self.shape_error(t, spec));
                };
                if b < 1 || b as u64 > mbs {
                    return Err(CoreError::invalid(format!(
                        "inference request batch-size must be <= {mbs} for '{model}'"
                    )));
                }
                match batch {
                    None => batch = Some(b as u64),
                    Some(prev) if prev != b as u64 => {
                        return Err(CoreError::invalid(format!(
                            "input '{}' batch size {b} does not match other inputs' batch size {prev} for model '{model}'",
                            t.name
                        )))
                    }
                    _ => {}
                }
                rest
            } else {
                &t.shape
            };
            if item_shape.len() != spec.dims.len()
                || item_shape
                    .iter()
                    .zip(&spec.dims)
                    .any(|(&g, &e)| e != -1 && g != e)
            {
                return Err(self.shape_error(t, spec));
            }
            let count = crate::request::element_count(&t.shape)
                .ok_or_else(|| crate::request::shape_too_large(&t.name, &t.shape))?;
            match t.dtype.element_size() {
                Some(es) => {
                    let expect = count
                        .checked_mul(es)
                        .ok_or_else(|| crate::request::shape_too_large(&t.name, &t.shape))?;
                    if t.data.len() != expect {
                        return Err(CoreError::invalid(format!(
                            "unexpected total byte size {} for input '{}', expecting {expect}",
                            t.data.len(),
                            t.name
                        )));
                    }
                }
                None => {
                    let mut n = 0usize;
                    for e in bytes_elements(&t.data) {
                        if e.is_none() {
                            return Err(CoreError::invalid(format!(
                                "input '{}': BYTES element length exceeds the remaining tensor data",
                                t.name
                            )));
                        }
                        n += 1;
                    }
                    if n != count {
                        return Err(CoreError::invalid(format!(
                            "unexpected number of string elements {n} for input '{}', expecting {count} for shape {}",
                            t.name,
                            shape_str(&t.shape)
                        )));
                    }
                }
            }
            // A ragged input joins a batch whatever its shape (Triton's allow_ragged_batch).
            key.push(if spec.ragged {
                Vec::new()
            } else {
                item_shape.to_vec()
            });
        }
        let missing: Vec<&str> = self
            .inputs
            .iter()
            .filter(|s| !s.optional && !seen.contains(s.name.as_str()))
            .map(|s| s.name.as_str())
            .collect();
        if !missing.is_empty() {
            let required = self.inputs.iter().filter(|s| !s.optional).count();
            let got: Vec<String> = req.inputs.iter().map(|t| format!("'{}'", t.name)).collect();
            let miss: Vec<String> = missing.iter().map(|m| format!("'{m}'")).collect();
            return Err(CoreError::invalid(format!(
                "expected {required} inputs but got {} inputs for model '{model}'. Got input(s) [{}], but missing required input(s) [{}]. Please provide all required input(s).",
                req.inputs.len(),
                got.join(","),
                miss.join(",")
            )));
        }
        for o in &req.outputs {
            let Some(spec) = self.outputs.iter().find(|s| s.name == o.name) else {
                return Err(CoreError::invalid(format!(
                    "unexpected inference output '{}' for model '{model}'",
                    o.name
                )));
            };
            if o.class_count > 0 && spec.dtype == DataType::Bytes {
                return Err(CoreError::invalid(format!(
                    "class result not available for output '{}' due to unsupported type 'BYTES'",
                    o.name
                )));
            }
        }
        Ok((batch.unwrap_or(1), key))
    }

    /// Gives each input with a `reshape` the shape the model takes (after validation,
    /// which checks the client's shape against `dims`).
    fn reshape_inputs(&self, req: &mut InferRequest) {
        let batched = self.max_batch_size > 0;
        for t in &mut req.inputs {
            let spec = self.inputs.iter().find(|s| s.name == t.name);
            if let Some((spec, reshape)) = spec.and_then(|s| Some((s, s.reshape.as_ref()?))) {
                t.shape = crate::reshape::map_full_shape(&t.shape, batched, &spec.dims, reshape);
            }
        }
    }

    /// An output's shape as clients see it: the model's shape mapped back from the
    /// output's `reshape` to its `dims`.
    fn output_shape(&self, name: &str, shape: Vec<i64>) -> Vec<i64> {
        let spec = self.outputs.iter().find(|s| s.name == name);
        let Some((spec, reshape)) = spec.and_then(|s| Some((s, s.reshape.as_ref()?))) else {
            return shape;
        };
        let batched = self.max_batch_size > 0;
        if shape.len() != reshape.len() + usize::from(batched) {
            return shape;
        }
        crate::reshape::map_full_shape(&shape, batched, reshape, &spec.dims)
    }

    fn shape_error(&self, t: &crate::request::InputTensor, spec: &TensorSpec) -> CoreError {
        let mut expected = spec.dims.clone();
        if self.max_batch_size > 0 {
            expected.insert(0, -1);
        }
        let note = if self.max_batch_size > 0 {
            " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be prepended to each input shape."
        } else {
            ""
        };
        CoreError::invalid(format!(
            "unexpected shape for input '{}' for model '{}'. Expected {}, got {}.{note}",
            t.name,
            self.name,
            shape_str(&expected),
            shape_str(&t.shape)
        ))
    }
}

/// Orders, filters and classifies what the backend produced into the response outputs.
pub(crate) fn build_response(
    model: &ModelShared,
    req: &InferRequest,
    produced: crate::request::Produced,
) -> CoreResult<Vec<OutputTensor>> {
    if let Some(seq) = &model.sequences {
        seq.keep_state(req, &produced)?;
    }
    let mut produced: Vec<Option<OutputTensor>> = produced
        .into_iter()
        .map(|(n, d, s, b)| {
            let s = model.output_shape(&n, s);
            Some(host::output_tensor(n, d, s, b))
        })
        .collect();
    let mut take = |name: &str| -> Option<OutputTensor> {
        produced
            .iter_mut()
            .find(|o| o.as_ref().is_some_and(|o| o.name == name))
            .and_then(Option::take)
    };
    let mut out = Vec::new();
    if req.outputs.is_empty() {
        for name in &model.output_names {
            if let Some(t) = take(name) {
                out.push(t);
            }
        }
    } else {
        for r in &req.outputs {
            let t = take(&r.name).ok_or_else(|| {
                CoreError::internal(format!(
                    "backend did not produce requested output '{}'",
                    r.name
                ))
            })?;
            if let Some(slot) = &r.shm {
                slot.write(&r.name, &t.data)?;
                out.push(OutputTensor {
                    data: Bytes::new(),
                    in_shared_memory: true,
                    ..t
                });
            } else if r.class_count > 0 {
                let labels = model.labels.get(&r.name).map(Vec::as_slice);
                out.push(classify(
                    &t,
                    r.class_count,
                    model.max_batch_size > 0,
                    labels,
                )?);
            } else {
                out.push(t);
            }
        }
    }
    Ok(out)
}

struct SendPtr(*mut c_void);
// SAFETY: backend states are handed back only to the backend that created them; the ABI
// requires them to be usable from the host's threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// A model version that is loaded and serving.
pub struct ModelVersion {
    /// Shared state (config, specs, stats).
    pub shared: Arc<ModelShared>,
    scheduler: Arc<Scheduler>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The backend running it (none for an ensemble).
    backend: Option<Arc<BackendLibrary>>,
    model_state: SendPtr,
    /// The steps, for an ensemble (`ensemble.rs`), whose requests bypass the scheduler.
    ensemble: Option<Arc<crate::ensemble::Ensemble>>,
    /// How long loading it took (Triton's `nv_model_load_duration_secs`).
    load_duration: std::sync::OnceLock<Duration>,
}

fn detect_gpus() -> u32 {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.count() as u32)
        .unwrap_or(0)
}

/// Number of GPUs visible on this machine (NVIDIA driver's /proc entries).
pub fn gpu_count() -> u32 {
    static N: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *N.get_or_init(detect_gpus)
}

impl ModelVersion {
    /// Initializes the model in its backend and starts its instances.
    /// With `limiter` (`--rate-limit=execution_count`), each instance runs a batch only when
    /// its group's `rate_limiter` resources are free.
    pub fn load(
        shared: ModelShared,
        model_dir: &Path,
        backend: Arc<BackendLibrary>,
        limiter: Option<&Arc<RateLimiter>>,
    ) -> CoreResult<Arc<ModelVersion>> {
        let shared = Arc::new(shared);
        let cfg_json = shared.config_json.to_string();
        let dir = model_dir.display().to_string();
        let info = KilnModelInfo {
            name: KilnStr::from_str(&shared.name),
            version: shared.version,
            repository_path: KilnStr::from_str(&dir),
            config_json: KilnStr::from_str(&cfg_json),
        };
        let mut state = std::ptr::null_mut();
        // SAFETY: ABI call; `info` and its strings live for the call.
        let e = unsafe { (backend.api.model_init)(backend.state, &info, &mut state) };
        if let Some(e) = host::take_error(e) {
            return Err(CoreError::new(
                e.kind,
                format!(
                    "model '{}' failed to initialize: {}",
                    shared.name, e.message
                ),
            ));
        }
        let policy = scheduler_policy(&shared.config);
        let mv = ModelVersion {
            shared: shared.clone(),
            scheduler: Arc::new(Scheduler::new(policy, shared.stats.clone())),
            threads: Mutex::new(Vec::new()),
            backend: Some(backend),
            model_state: SendPtr(state),
            ensemble: None,
            load_duration: Default::default(),
        };
        let mut index = 0u32;
        for g in &shared.config.instance_group {
            let devices: Vec<(u32, i32)> = if g.kind == Kind::Gpu as i32 {
                g.gpus
                    .iter()
                    .map(|&d| (abi::KILN_INSTANCE_GPU, d))
                    .collect()
            } else if g.kind == Kind::Model as i32 {
                vec![(abi::KILN_INSTANCE_MODEL, 0)]
            } else {
                vec![(abi::KILN_INSTANCE_CPU, 0)]
            };
            for (kind, device) in devices {
                for c in 0..g.count {
                    let name = if kind == abi::KILN_INSTANCE_GPU {
                        format!("{}_{}_gpu{}", g.name, c, device)
                    } else {
                        format!("{}_{}", g.name, c)
                    };
                    let seat = match limiter.map(|l| l.register(g.rate_limiter.as_ref(), device)) {
                        Some(Err(e)) => {
                            mv.shutdown();
                            return Err(e);
                        }
                        Some(Ok(seat)) => Some(seat),
                        None => None,
                    };
                    match mv.spawn_instance(name, kind, device, index, seat) {
                        Ok(h) => mv.threads.lock().unwrap_or_else(|p| p.into_inner()).push(h),
                        Err(e) => {
                            mv.shutdown();
                            return Err(e);
                        }
                    }
                    index += 1;
                }
            }
        }
        if let Err(e) = crate::warmup::run(&mv, model_dir, index as usize) {
            mv.shutdown();
            return Err(e);
        }
        Ok(Arc::new(mv))
    }

    /// An ensemble version: no backend or instances; its requests run its steps.
    pub(crate) fn ensemble(
        shared: ModelShared,
        ensemble: crate::ensemble::Ensemble,
    ) -> Arc<ModelVersion> {
        let shared = Arc::new(shared);
        Arc::new(ModelVersion {
            scheduler: Arc::new(Scheduler::new(
                SchedulerPolicy::default(),
                shared.stats.clone(),
            )),
            shared,
            threads: Mutex::new(Vec::new()),
            backend: None,
            model_state: SendPtr(std::ptr::null_mut()),
            ensemble: Some(Arc::new(ensemble)),
            load_duration: Default::default(),
        })
    }

    fn spawn_instance(
        &self,
        name: String,
        kind: u32,
        device: i32,
        index: u32,
        seat: Option<Seat>,
    ) -> CoreResult<JoinHandle<()>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let scheduler = self.scheduler.clone();
        let Some(api) = self.backend.as_ref().map(|b| b.api) else {
            return Err(CoreError::internal("an ensemble has no instances"));
        };
        let model_state = SendPtr(self.model_state.0);
        let thread_name = format!("kiln-{name}");
        let handle = std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                let model_state = model_state;
                let (token, slot) = host::register_instance();
                let info = KilnInstanceInfo {
                    name: KilnStr::from_str(&name),
                    kind,
                    device_id: device,
                    index,
                    reserved: 0,
                    host_instance: token as *mut abi::KilnInstance,
                };
                let mut state = std::ptr::null_mut();
                // SAFETY: ABI call on this instance's own thread.
                let e = unsafe { (api.instance_init)(model_state.0, &info, &mut state) };
                if let Some(e) = host::take_error(e) {
                    host::unregister_instance(token);
                    let _ = tx.send(Err(CoreError::new(
                        e.kind,
                        format!("instance '{name}' of model '{}' failed to initialize: {}", shared.name, e.message),
                    )));
                    return;
                }
                let _ = tx.send(Ok(()));
                let instance = Instance {
                    index: index as usize,
                    api,
                    state,
                    slot: &slot,
                    seat: seat.as_ref(),
                };
                run_instance(&shared, &scheduler, instance);
                // SAFETY: the instance is finished with; called once.
                if let Some(e) = host::take_error(unsafe { (api.instance_fini)(state) }) {
                    tracing::warn!(model = %shared.name, instance = %name, "instance_fini failed: {}", e.message);
                }
                host::unregister_instance(token);
            })
            .map_err(|e| CoreError::internal(format!("cannot start instance thread: {e}")))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(CoreError::internal(format!(
                    "instance thread of model '{}' exited during initialization",
                    self.shared.name
                )))
            }
        }
    }

    /// Validates and queues a request; responses arrive on `sink`.
    pub fn submit(&self, mut request: InferRequest, sink: ResponseSink) -> CoreResult<()> {
        if let Some(t) = &request.trace {
            t.identify(self.shared.version, &request.id);
            t.stamp("REQUEST_START");
        }
        let (batch_size, shape_key) = match self.shared.validate(&request) {
            Ok(v) => v,
            Err(e) => {
                self.shared
                    .stats
                    .record_failure(request.arrival.elapsed(), FailReason::Other);
                return Err(e);
            }
        };
        if let Some(seq) = &self.shared.sequences {
            if let Err(e) = seq.admit(&mut request, batch_size) {
                self.shared
                    .stats
                    .record_failure(request.arrival.elapsed(), FailReason::Other);
                return Err(e);
            }
        }
        if let Some(cache) = &self.shared.cache {
            let lookup_start = Instant::now();
            let key =
                crate::cache::ResponseCache::key(&self.shared.name, self.shared.version, &request);
            if let Some(produced) = cache.lookup(key) {
                return self.answer_from_cache(request, &produced, lookup_start, sink);
            }
            request.cache_key = Some(crate::cache::CacheKey {
                key,
                lookup: lookup_start.elapsed(),
            });
        }
        if let Some(ensemble) = &self.ensemble {
            ensemble.start(self.shared.clone(), request, batch_size, sink);
            return Ok(());
        }
        self.shared.reshape_inputs(&mut request);
        if let Some(t) = &request.trace {
            t.stamp("QUEUE_START");
            for i in &request.inputs {
                t.tensor("TENSOR_QUEUE_INPUT", &i.name, i.dtype, &i.shape, &i.data);
            }
        }
        let arrival = request.arrival;
        let r = self.scheduler.enqueue(Pending {
            request: Arc::new(request),
            sink,
            batch_size,
            shape_key,
            enqueued: Instant::now(),
            deadline: None,
        });
        if r.is_err() {
            self.shared
                .stats
                .record_failure(arrival.elapsed(), FailReason::Rejected);
        }
        r
    }

    /// Answers `request` with the outputs the response cache held for it (a cache hit
    /// counts as a success, not as an inference or an execution, as in Triton).
    fn answer_from_cache(
        &self,
        request: InferRequest,
        produced: &crate::request::Produced,
        lookup_start: Instant,
        sink: ResponseSink,
    ) -> CoreResult<()> {
        let stats = &self.shared.stats;
        let lookup = lookup_start.elapsed();
        match build_response(&self.shared, &request, produced.clone()) {
            Ok(outputs) => {
                let response = crate::request::InferResponse {
                    model_name: self.shared.name.clone(),
                    model_version: self.shared.version,
                    id: request.id.clone(),
                    outputs,
                    parameters: Default::default(),
                };
                let total = request.arrival.elapsed();
                stats.record_cache_hit(
                    total,
                    lookup_start.saturating_duration_since(request.arrival),
                    lookup,
                );
                stats.record_first_response(total);
                if let Some(t) = &request.trace {
                    t.stamp("REQUEST_END");
                }
                sink.send(crate::request::ResponseEvent::Response {
                    response,
                    last: true,
                });
                Ok(())
            }
            Err(e) => {
                stats.record_failure(request.arrival.elapsed(), FailReason::Other);
                Err(e)
            }
        }
    }

    /// How long loading this version took (backend, instances and warm-up).
    pub fn load_duration(&self) -> Option<Duration> {
        self.load_duration.get().copied()
    }

    pub(crate) fn set_load_duration(&self, d: Duration) {
        let _ = self.load_duration.set(d);
    }

    /// Requests waiting in the queue.
    pub fn pending(&self) -> usize {
        self.scheduler.pending()
    }

    /// Stops accepting work, finishes queued requests, finalizes instances and the model.
    pub fn shutdown(&self) {
        self.scheduler.close();
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        if let (false, Some(backend)) = (self.model_state.0.is_null(), &self.backend) {
            // SAFETY: all instances are finalized; model state is finalized once (shutdown
            // is only called once per version by the repository).
            if let Some(e) =
                host::take_error(unsafe { (backend.api.model_fini)(self.model_state.0) })
            {
                tracing::warn!(model = %self.shared.name, "model_fini failed: {}", e.message);
            }
        }
    }
}

fn queue_policy(q: Option<&ModelQueuePolicy>) -> QueuePolicy {
    let Some(q) = q else {
        return QueuePolicy::default();
    };
    QueuePolicy {
        max_queue_size: q.max_queue_size as usize,
        default_timeout: Duration::from_micros(q.default_timeout_microseconds),
        allow_timeout_override: q.allow_timeout_override,
        timeout_action: if q.timeout_action == model_queue_policy::TimeoutAction::Delay as i32 {
            TimeoutAction::Delay
        } else {
            TimeoutAction::Reject
        },
    }
}

/// The scheduler settings of `dynamic_batching`, or those of a `sequence_batching` model
/// (one request at a time, each sequence on one instance); neither: the default scheduler.
fn scheduler_policy(cfg: &ModelConfig) -> SchedulerPolicy {
    let db = match &cfg.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(db)) => db,
        Some(SchedulingChoice::SequenceBatching(sb)) => {
            use kiln_proto::inference::model_sequence_batching::StrategyChoice;
            // Requests of different sequences run together, up to max_batch_size, with
            // what is queued when an instance is free. The Direct strategy gives each
            // instance one slot per batch row; Oldest, `max_candidate_sequences` if set.
            let slots = match &sb.strategy_choice {
                Some(StrategyChoice::Oldest(o)) => o.max_candidate_sequences as usize,
                _ => cfg.max_batch_size.max(1) as usize,
            };
            return SchedulerPolicy {
                sequences: true,
                sequence_slots: slots,
                sequence_idle: Duration::from_micros(sb.max_sequence_idle_microseconds),
                batching: (cfg.max_batch_size > 1).then(|| BatchPolicy {
                    max_batch_size: cfg.max_batch_size as u64,
                    preferred: Vec::new(),
                    max_delay: Duration::ZERO,
                }),
                ..Default::default()
            };
        }
        _ => return SchedulerPolicy::default(),
    };
    let mut preferred: Vec<u64> = db
        .preferred_batch_size
        .iter()
        .map(|&p| p.max(1) as u64)
        .collect();
    preferred.sort_unstable();
    let default = queue_policy(db.default_queue_policy.as_ref());
    let levels = db.priority_levels.max(1);
    SchedulerPolicy {
        // A model without batching still uses the dynamic batcher's queues (priorities,
        // timeouts) but executes one request at a time.
        batching: (cfg.max_batch_size > 0).then(|| BatchPolicy {
            max_batch_size: cfg.max_batch_size as u64,
            preferred,
            max_delay: Duration::from_micros(db.max_queue_delay_microseconds),
        }),
        levels: (1..=levels)
            .map(|l| match db.priority_queue_policy.get(&l) {
                Some(q) => queue_policy(Some(q)),
                None => default.clone(),
            })
            .collect(),
        default_level: db.default_priority_level.clamp(1, levels) as usize,
        preserve_ordering: db.preserve_ordering,
        ..Default::default()
    }
}

/// What an instance's thread runs batches with.
struct Instance<'a> {
    index: usize,
    api: &'static abi::KilnBackendApi,
    state: *mut c_void,
    /// Compute times the backend reported for the current execution.
    slot: &'a Mutex<Option<(u64, u64)>>,
    /// Its place in the rate limiter, when one is on.
    seat: Option<&'a Seat>,
}

fn run_instance(shared: &Arc<ModelShared>, scheduler: &Scheduler, instance: Instance<'_>) {
    let Instance {
        index,
        api,
        state,
        slot,
        seat,
    } = instance;
    while let Some(batch) = scheduler.next_batch_for(index) {
        // Held until the execution returns (rate limiter resources).
        let _grant = seat.map(Seat::acquire);
        let exec_start = Instant::now();
        let total: u64 = batch.iter().map(|p| p.batch_size).sum();
        let mut held = Vec::with_capacity(batch.len());
        let mut views = Vec::with_capacity(batch.len());
        for p in batch {
            let queue = exec_start.saturating_duration_since(p.enqueued);
            let request = match shared
                .sequences
                .as_ref()
                .and_then(|s| s.with_state(&p.request))
            {
                Some(with_state) => with_state,
                None => p.request,
            };
            let (h, inf) = host::register_request(request, shared.clone(), p.sink);
            views.push(KilnRequestView {
                handle: h as *mut abi::KilnRequest,
                id: KilnStr::from_str(&inf.request.id),
                correlation_id: inf.request.correlation_id,
                flags: inf.request.flags,
                reserved: 0,
                timeout_us: inf.request.timeout_us,
                parameters_json: KilnStr::from_str(&inf.params_json),
                inputs: inf.views.as_ptr(),
                input_count: inf.views.len(),
                requested_outputs: inf.requested.as_ptr(),
                requested_output_count: inf.requested.len(),
                batch_size: p.batch_size,
            });
            held.push((h, inf, queue));
        }
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // SAFETY: ABI call; views and everything they point to are alive (held + registry).
        let e = unsafe { (api.instance_execute)(state, views.as_ptr(), views.len()) };
        let exec_end = Instant::now();
        let err = host::take_error(e);
        let reported = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let compute = match reported {
            Some((cs, ce)) => {
                let s = host::clock_ns_of(exec_start);
                let e2 = host::clock_ns_of(exec_end);
                let cs = cs.clamp(s, e2);
                let ce = ce.clamp(cs, e2);
                ComputeTimes {
                    input: Duration::from_nanos(cs - s),
                    infer: Duration::from_nanos(ce - cs),
                    output: Duration::from_nanos(e2 - ce),
                }
            }
            None => ComputeTimes {
                infer: exec_end - exec_start,
                ..Default::default()
            },
        };
        shared.stats.record_execution(total, compute);
        if let Some(err) = &err {
            for (h, inf, _) in &held {
                if !inf.is_released() {
                    host::fail_unreleased(*h, err);
                }
            }
        }
        for (_, inf, queue) in &held {
            if let Some(t) = &inf.request.trace {
                t.stamp_at("COMPUTE_START", exec_start);
                t.stamp_at("COMPUTE_INPUT_END", exec_start + compute.input);
                t.stamp_at("COMPUTE_OUTPUT_START", exec_end - compute.output);
                t.stamp_at("COMPUTE_END", exec_end);
            }
            inf.set_exec_times(*queue, compute);
        }
    }
}
