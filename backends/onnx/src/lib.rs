//! The `onnx` backend: ONNX models (`platform: "onnxruntime_onnx"`, `backend: "onnxruntime"`
//! or `backend: "onnx"`) read with candle-onnx and run by Kiln's own executor on candle —
//! planned once per instance (see [`plan`]), CPU or CUDA.
pub mod allocator;
pub mod append;
pub mod attention;
pub mod attrs;
pub mod batched;
pub mod contrib;
pub mod control;
pub mod conv_transpose;
pub mod convert;
pub mod cpu_conv;
pub mod cpu_kernels;
pub mod deform;
pub mod einsum;
pub mod external;
mod fallback;
pub mod fuse;
pub mod in_place;
pub mod lowbit;
pub mod ml;
pub mod ml_features;
pub mod ml_tree;
pub mod ops;
pub mod ops_fast;
pub mod ops_index;
pub mod ops_more;
pub mod ops_nn;
pub mod ops_spatial;
pub mod plan;
pub mod pool;
pub mod resize;
pub mod rnn;
pub mod seq;
pub mod sgemm;
pub mod size_guard;
pub mod spectral;
pub mod spin;
pub mod strings;
pub mod text;
pub mod winograd;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_onnx::onnx::ModelProto;
use kiln_sdk::{
    export_backend, Backend, BatchIo, DataType, Error, ErrorCode, Instance, InstanceInfo,
    InstanceKind, Model, ModelInfo, Request, Response, Result,
};
use serde_json::Value;

use plan::Plan;

/// The backend: its settings from the server's `--backend-config`.
pub struct OnnxBackend {
    /// `default-max-batch-size`: the `max_batch_size` auto-complete gives a graph that can
    /// batch (Triton's default, 4).
    default_max_batch_size: AtomicI64,
}

/// A loaded model file, shared by the instances.
pub struct OnnxModel {
    proto: Arc<ModelProto>,
    path: PathBuf,
    batching: bool,
    /// Config dims of each output (a scalar the graph produces is reported with them).
    output_dims: Arc<HashMap<String, Vec<i64>>>,
    /// Ragged inputs, batch inputs and batch outputs of the config.
    batch_io: Arc<BatchIo>,
    threads: usize,
}

/// One instance: the planned graph on its device and the threads its CPU kernels use.
pub struct OnnxInstance {
    plan: Plan,
    batching: bool,
    output_dims: Arc<HashMap<String, Vec<i64>>>,
    batch_io: Arc<BatchIo>,
    pool: rayon::ThreadPool,
    /// Duration of the last run in µs (chooses this thread or the pool for the next).
    last_us: AtomicU64,
}

/// One run's outputs, with the strings their STRING tensors index.
struct Outputs {
    tensors: HashMap<String, Tensor>,
    strings: strings::StringTable,
}

/// Threads per instance for the CPU kernels: the model parameter `intra_op_thread_count`
/// (the name Triton's onnxruntime backend reads); absent or 0 means one per CPU core.
fn thread_count(config: &Value) -> Result<usize> {
    let Some(v) = config["parameters"]["intra_op_thread_count"]["string_value"].as_str() else {
        return Ok(0);
    };
    v.trim().parse::<usize>().map_err(|_| {
        Error::invalid_arg(format!(
            "parameter intra_op_thread_count must be a whole number of threads (0 = one per core), got '{v}'"
        ))
    })
}

/// The model file named by `default_model_filename` (default `model.onnx`); when that
/// names a folder, its `model.onnx` (as Triton's onnxruntime backend reads it).
fn model_path(info: &ModelInfo, config: &Value) -> PathBuf {
    let file = config["default_model_filename"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("model.onnx");
    let path = info.version_path().join(file);
    if path.is_dir() {
        path.join("model.onnx")
    } else {
        path
    }
}

/// `[a,b,c]`, as Triton writes shapes in its messages.
fn shape_text(dims: &[i64]) -> String {
    let d: Vec<String> = dims.iter().map(i64::to_string).collect();
    format!("[{}]", d.join(","))
}

/// Checks the config's inputs and outputs against the graph's as Triton's onnxruntime
/// backend does (with its messages): as many inputs as the graph has, each named tensor in
/// the graph with the same type, and dims (or `reshape`, when given) that fit the graph's
/// shape after a first dimension of -1 when batching.
fn check_io(config: &Value, plan: &Plan) -> Result<()> {
    let model = config["name"].as_str().unwrap_or("");
    let batching = config["max_batch_size"].as_i64().unwrap_or(0) > 0;
    let count = |v: &Value| v.as_array().map_or(0, Vec::len);
    let optional = config["input"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["optional"].as_bool() == Some(true))
        .count();
    let expected = count(&config["input"]) - optional
        + count(&config["batch_input"])
        + count(&config["sequence_batching"]["control_input"])
        + count(&config["sequence_batching"]["state"]);
    if expected != plan.inputs.len() {
        return Err(Error::invalid_arg(format!(
            "unable to load model '{model}', configuration expects {expected} inputs, model provides {}",
            plan.inputs.len()
        )));
    }
    let batch_io = BatchIo::from_config(config)?;
    batched::check_graph(model, &batch_io, plan)?;
    for (kind, graph) in [("input", &plan.inputs), ("output", &plan.outputs)] {
        for t in config[kind].as_array().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or("");
            // Ragged inputs and batch outputs are flat in the graph (checked above).
            let flat = batch_io.is_ragged(name) || batched::is_batch_output(&batch_io, name);
            let g = graph.iter().find(|g| g.name == name).ok_or_else(|| {
                let known: Vec<&str> = graph.iter().map(|g| g.name.as_str()).collect();
                Error::invalid_arg(format!(
                    "unable to load model '{model}': {kind} '{name}' of the configuration is not a model {kind} (the model has {known:?})"
                ))
            })?;
            let cfg_type = t["data_type"].as_str().unwrap_or("");
            if let Some(dt) = g.dtype {
                if cfg_type.trim_start_matches("TYPE_")
                    != dt.config_name().trim_start_matches("TYPE_")
                {
                    return Err(Error::invalid_arg(format!(
                        "unable to load model '{model}', configuration expects datatype {cfg_type} for {kind} '{name}', model provides {}",
                        dt.config_name()
                    )));
                }
            }
            // (No graph dims: a shape the graph does not declare, checked when it runs.)
            if g.dims.is_empty() || flat {
                continue;
            }
            if batching && g.dims[0] != -1 {
                return Err(Error::invalid_arg(format!(
                    "model '{model}', tensor '{name}': for the model to support batching the shape should have at least 1 dimension and the first dimension must be -1; but shape expected by the model is {}",
                    shape_text(&g.dims)
                )));
            }
            let shape = if t["reshape"].is_null() {
                &t["dims"]
            } else {
                &t["reshape"]["shape"]
            };
            let full = kiln_sdk::full_dims(shape, batching);
            let fits = full.len() == g.dims.len()
                && full
                    .iter()
                    .zip(&g.dims)
                    .all(|(&c, &m)| c == -1 || m == -1 || c == m);
            if !fits {
                let what = if batching {
                    format!("an initial batch dimension because max_batch_size > 0 followed by the explicit tensor shape, making complete shape {}", shape_text(&full))
                } else {
                    format!("shape {}", shape_text(&full))
                };
                return Err(Error::invalid_arg(format!(
                    "model '{model}', tensor '{name}': the model expects {} dimensions (shape {}) but the model configuration specifies {} dimensions ({what})",
                    g.dims.len(),
                    shape_text(&g.dims),
                    full.len()
                )));
            }
        }
    }
    Ok(())
}

/// Default `max_batch_size` auto-complete gives a model whose every input and output has
/// a dynamic first dimension (Triton's `--backend-config=default-max-batch-size`).
pub const DEFAULT_MAX_BATCH_SIZE: i64 = 4;

/// Completes `config` from the graph as Triton's onnxruntime backend does. A config that
/// declares both inputs and outputs is left as it is. Otherwise: when every graph input
/// and output has a dynamic first dimension, a `max_batch_size` of 0 becomes the default
/// and one above 1 gets dynamic batching (unless a batcher is configured); a graph that
/// cannot batch under a non-zero `max_batch_size` is an error. The missing side (inputs,
/// outputs, or both) is filled in from the graph: name, type and dims, where a tensor left
/// with no dims gets `dims: [1]` (and, batching, `reshape: { shape: [] }`).
pub fn complete_config(
    mut config: Value,
    model: &ModelProto,
    default_max_batch_size: i64,
) -> Result<Value> {
    let (inputs, outputs) = plan::graph_io(model);
    let count = |k: &str| config[k].as_array().map_or(0, Vec::len);
    let (n_in, n_out) = (count("input") + count("batch_input"), count("output"));
    if n_in > 0 && n_out > 0 {
        return Ok(config);
    }
    let can_batch = inputs
        .iter()
        .chain(&outputs)
        .all(|t| t.dims.first() == Some(&-1));
    let mut mbs = config["max_batch_size"].as_i64().unwrap_or(0);
    if can_batch {
        if mbs == 0 {
            mbs = default_max_batch_size;
            config["max_batch_size"] = Value::from(mbs);
        }
        if mbs > 1
            && config.get("dynamic_batching").is_none()
            && config.get("sequence_batching").is_none()
        {
            config["dynamic_batching"] = serde_json::json!({});
        }
    } else if mbs != 0 {
        return Err(Error::invalid_arg(format!(
            "autofill failed for model '{}': model does not support batching while non-zero max_batch_size is specified",
            config["name"].as_str().unwrap_or("")
        )));
    }
    let entry = |t: &plan::ValueInfo| -> Result<Value> {
        let dt = t.dtype.ok_or_else(|| {
            Error::unsupported(format!("tensor '{}' has a type Kiln cannot serve", t.name))
        })?;
        let dims = if mbs > 0 {
            t.dims.get(1..).unwrap_or(&[])
        } else {
            &t.dims[..]
        };
        let mut e =
            serde_json::json!({"name": t.name, "data_type": dt.config_name(), "dims": dims});
        if dims.is_empty() {
            e["dims"] = serde_json::json!([1]);
            if mbs > 0 {
                e["reshape"] = serde_json::json!({"shape": []});
            }
        }
        Ok(e)
    };
    if n_in == 0 {
        config["input"] = Value::Array(inputs.iter().map(entry).collect::<Result<_>>()?);
    }
    if n_out == 0 {
        config["output"] = Value::Array(outputs.iter().map(entry).collect::<Result<_>>()?);
    }
    Ok(config)
}

impl Backend for OnnxBackend {
    type Model = OnnxModel;

    fn initialize() -> Result<Self> {
        allocator::tune();
        Ok(OnnxBackend {
            default_max_batch_size: AtomicI64::new(DEFAULT_MAX_BATCH_SIZE),
        })
    }

    /// Reads `default-max-batch-size` (Triton's onnxruntime backend setting).
    fn configure(&self, config_json: &str) -> Result<()> {
        let config: Value = serde_json::from_str(config_json)
            .map_err(|e| Error::invalid_arg(format!("backend config is not JSON: {e}")))?;
        if let Some(v) = config["cmdline"]["default-max-batch-size"].as_str() {
            let n = v
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    Error::invalid_arg(format!(
                        "default-max-batch-size must be a non-negative integer, got '{v}'"
                    ))
                })?;
            self.default_max_batch_size.store(n, Ordering::Relaxed);
        }
        Ok(())
    }

    fn autocomplete(&self, info: &ModelInfo) -> Result<Option<String>> {
        let config: Value = serde_json::from_str(&info.config_json)
            .map_err(|e| Error::internal(format!("bad config JSON: {e}")))?;
        let path = model_path(info, &config);
        if !path.is_file() {
            return Ok(None); // load_model reports the missing file
        }
        let proto = candle_onnx::read_file(&path).map_err(|e| {
            Error::invalid_arg(format!(
                "{}: not a valid ONNX model: {}",
                path.display(),
                plain(&e)
            ))
        })?;
        let default_mbs = self.default_max_batch_size.load(Ordering::Relaxed);
        Ok(Some(
            complete_config(config, &proto, default_mbs)?.to_string(),
        ))
    }

    fn load_model(&self, info: &ModelInfo) -> Result<OnnxModel> {
        let config: Value = serde_json::from_str(&info.config_json)
            .map_err(|e| Error::internal(format!("bad config JSON: {e}")))?;
        let path = model_path(info, &config);
        if !path.is_file() {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("model file {} not found", path.display()),
            ));
        }
        let mut proto = candle_onnx::read_file(&path).map_err(|e| {
            Error::invalid_arg(format!(
                "{}: not a valid ONNX model: {}",
                path.display(),
                plain(&e)
            ))
        })?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        external::inline(&mut proto, dir)
            .map_err(|e| Error::invalid_arg(format!("{}: {}", path.display(), plain(&e))))?;
        if let Some(g) = proto.graph.as_ref() {
            let missing = plan::unsupported_ops(g);
            if !missing.is_empty() {
                return Err(Error::unsupported(format!(
                    "{}: unsupported ONNX operators: {}",
                    path.display(),
                    missing.join(", ")
                )));
            }
        }
        // Plan once on the CPU to validate the graph and the config's tensors at load.
        let plan = Plan::new(&proto, &Device::Cpu)
            .map_err(|e| Error::invalid_arg(format!("{}: {}", path.display(), plain(&e))))?;
        check_io(&config, &plan)?;
        Ok(OnnxModel {
            proto: Arc::new(proto),
            path,
            batching: config["max_batch_size"].as_i64().unwrap_or(0) > 0,
            output_dims: Arc::new(
                config["output"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| {
                        let name = o["name"].as_str().unwrap_or("").to_string();
                        (name, kiln_sdk::full_dims(&o["dims"], false))
                    })
                    .collect(),
            ),
            batch_io: Arc::new(BatchIo::from_config(&config)?),
            threads: thread_count(&config)?,
        })
    }
}

/// An error's message without the backtrace candle appends to its errors when
/// `RUST_BACKTRACE` is set: load and request errors are read by people (a model's state,
/// a response), one line of cause each.
fn plain(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    match s.find("\n   0: ") {
        Some(i) => s[..i].trim_end().to_string(),
        None => s,
    }
}

/// The device an instance asks for (CUDA only in the `cuda` build).
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
        InstanceKind::Gpu(_) => Err(Error::unsupported(
            "KIND_GPU instance: this onnx backend was built without CUDA; build the CUDA variant with `cargo xtask build-cuda` (or use KIND_CPU)",
        )),
    }
}

impl Model for OnnxModel {
    type Instance = OnnxInstance;

    fn new_instance(&self, info: &InstanceInfo) -> Result<OnnxInstance> {
        let dev = device(info.kind)?;
        let plan = Plan::new(&self.proto, &dev)
            .map_err(|e| Error::invalid_arg(format!("{}: {}", self.path.display(), plain(&e))))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("kiln-onnx-{i}"))
            .build()
            .map_err(|e| Error::internal(format!("cannot start the instance's threads: {e}")))?;
        Ok(OnnxInstance {
            plan,
            batching: self.batching,
            output_dims: self.output_dims.clone(),
            batch_io: self.batch_io.clone(),
            pool,
            // The first run goes to the pool (as a large model's should).
            last_us: AtomicU64::new(u64::MAX),
        })
    }
}

impl OnnxInstance {
    /// Runs the graph once on `inputs` (name → tensor).
    fn run(&self, inputs: Vec<(&str, DataType, Vec<i64>, &[u8])>) -> Result<Outputs> {
        let strings = self.plan.string_table();
        let mut values = HashMap::new();
        for (name, dt, shape, data) in inputs {
            let t = if dt == DataType::Bytes {
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                strings
                    .deserialize(data, &dims, self.plan.device())
                    .map_err(|e| Error::invalid_arg(format!("input '{name}': {}", plain(&e))))?
            } else {
                convert::to_tensor(dt, &shape, data, self.plan.device())?
            };
            values.insert(name.to_string(), t);
        }
        // A run that took under a millisecond last time runs on this thread (its kernels stay
        // sequential at that size); longer ones run in the instance's pool, whose threads the
        // kernels split their work over. Handing a tiny model's request to the pool would
        // cost more CPU than the model itself.
        let started = std::time::Instant::now();
        let out = kiln_sdk::compute(|| {
            if self.last_us.load(Ordering::Relaxed) < 1000 {
                self.plan.run_with(values, &strings)
            } else {
                self.pool.install(|| self.plan.run_with(values, &strings))
            }
        });
        let us = started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.last_us.store(us, Ordering::Relaxed);
        Ok(Outputs {
            tensors: out.map_err(Error::internal)?,
            strings,
        })
    }

    fn output_type(&self, name: &str) -> Result<DataType> {
        self.plan
            .outputs
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.dtype)
            .ok_or_else(|| Error::unsupported(format!("output '{name}' has an unsupported type")))
    }

    /// Writes each requested output into `response`, cut to this request's part by `part`
    /// (see [`batched`]).
    fn fill(
        &self,
        request: &Request<'_>,
        response: &mut Response,
        outputs: &Outputs,
        part: impl Fn(&str, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<()> {
        for name in request.requested_outputs() {
            let Some(t) = outputs.tensors.get(name) else {
                continue;
            };
            let t = part(name, t)
                .map_err(|e| Error::internal(format!("output '{name}': {}", plain(&e))))?;
            let dt = self.output_type(name)?;
            let bytes = if dt == DataType::Bytes {
                outputs
                    .strings
                    .serialize(&t)
                    .map_err(|e| Error::internal(format!("output '{name}': {}", plain(&e))))?
            } else {
                convert::to_bytes(&t, dt)?
            };
            let mut shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
            // A scalar output takes the config's dims (all 1), as with Triton's onnxruntime
            // backend.
            if shape.is_empty() && !self.batching {
                if let Some(dims) = self.output_dims.get(name) {
                    shape = dims.iter().map(|&d| d.max(1)).collect();
                }
            }
            response
                .output(name, dt, &shape, bytes.len())?
                .copy_from_slice(&bytes);
        }
        Ok(())
    }
}

impl Instance for OnnxInstance {
    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()> {
        let inputs = request
            .inputs()
            .map(|t| (t.name, t.dtype, t.shape.to_vec(), t.data))
            .collect();
        let outputs = self.run(inputs)?;
        self.fill(request, response, &outputs, |_, t| Ok(t.clone()))
    }

    /// A dynamic batch runs as one graph execution (see [`batched`]).
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        // A lone request runs as it came, unless a ragged input must still be flattened.
        if !self.batching || (requests.len() < 2 && self.batch_io.is_empty()) {
            return kiln_sdk::infer_each(self, requests);
        }
        self.execute_joined(requests)
    }
}

export_backend!(OnnxBackend);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `simple`: INPUT0/INPUT1 → OUTPUT0/OUTPUT1, INT32 [batch, 16].
    fn simple() -> ModelProto {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../model_repository/simple/1/model.onnx"
        );
        candle_onnx::read_file(path).expect("the committed simple model")
    }

    #[test]
    fn messages_drop_a_trailing_backtrace() {
        let traced = "not a valid ONNX model: buffer underflow\n   0: candle_core::error::Error::bt\n             at src/error.rs:1\n   1: main";
        assert_eq!(plain(&traced), "not a valid ONNX model: buffer underflow");
        assert_eq!(plain(&"two\nlines, no trace"), "two\nlines, no trace");
    }

    #[test]
    fn autocomplete_follows_triton() {
        // Only a name: batching with Triton's default size, dynamic batching, dims after
        // the batch dimension.
        let c = complete_config(json!({"name": "m"}), &simple(), DEFAULT_MAX_BATCH_SIZE).unwrap();
        assert_eq!(c["max_batch_size"], 4);
        assert_eq!(c["dynamic_batching"], json!({}));
        assert_eq!(c["input"][1]["dims"], json!([16]));
        assert_eq!(c["output"][0]["data_type"], "TYPE_INT32");
        // max_batch_size 1: no dynamic batching; a configured batcher is kept.
        let c = complete_config(
            json!({"max_batch_size": 1}),
            &simple(),
            DEFAULT_MAX_BATCH_SIZE,
        )
        .unwrap();
        assert!(c.get("dynamic_batching").is_none());
        let seq = json!({"max_batch_size": 8, "sequence_batching": {}});
        let c = complete_config(seq, &simple(), DEFAULT_MAX_BATCH_SIZE).unwrap();
        assert!(c.get("dynamic_batching").is_none());
        // Inputs and outputs both declared: nothing is added.
        let full = json!({"input": [{"name": "INPUT0"}], "output": [{"name": "OUTPUT0"}]});
        assert_eq!(
            complete_config(full.clone(), &simple(), DEFAULT_MAX_BATCH_SIZE).unwrap(),
            full
        );
        // Only inputs declared: the outputs are filled in, and batching decided.
        let c = complete_config(
            json!({"input": [{"name": "INPUT0"}]}),
            &simple(),
            DEFAULT_MAX_BATCH_SIZE,
        )
        .unwrap();
        assert_eq!(c["output"].as_array().map(Vec::len), Some(2));
        assert_eq!(c["input"].as_array().map(Vec::len), Some(1));
        assert_eq!(c["max_batch_size"], 4);
        // --backend-config=onnxruntime,default-max-batch-size=0: no batching, and the
        // batch dimension stays in the dims.
        let c = complete_config(json!({"name": "m"}), &simple(), 0).unwrap();
        assert_eq!(c["max_batch_size"].as_i64().unwrap_or(0), 0);
        assert!(c.get("dynamic_batching").is_none());
        assert_eq!(c["input"][0]["dims"], json!([-1, 16]));
    }

    #[test]
    fn autocomplete_of_a_graph_that_cannot_batch() {
        use candle_onnx::onnx::{tensor_shape_proto::dimension::Value as Dim, type_proto};
        let mut m = simple();
        let g = m.graph.as_mut().unwrap();
        for v in g.input.iter_mut().chain(g.output.iter_mut()) {
            if let Some(type_proto::Value::TensorType(t)) =
                v.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.shape.as_mut().unwrap().dim[0].value = Some(Dim::DimValue(2));
            }
        }
        let c = complete_config(json!({"name": "m"}), &m, DEFAULT_MAX_BATCH_SIZE).unwrap();
        assert_eq!(c["max_batch_size"].as_i64().unwrap_or(0), 0);
        assert_eq!(c["input"][0]["dims"], json!([2, 16]));
        let e = complete_config(
            json!({"name": "m", "max_batch_size": 8}),
            &m,
            DEFAULT_MAX_BATCH_SIZE,
        )
        .unwrap_err();
        assert!(e.message.contains("does not support batching"), "{e:?}");
    }
}
