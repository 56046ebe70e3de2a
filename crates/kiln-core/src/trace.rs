//! Triton's request tracing (`--trace-config`, the `trace` protocol extension): settings
//! held globally and per model, sampling of every `trace_rate`-th request while
//! `trace_count` lasts, and a JSON trace file in Triton's format — for each trace one
//! object naming the model and one per timestamp (`HTTP_RECV_START`, `REQUEST_START`,
//! `QUEUE_START`, `COMPUTE_START`, ...). Traces are written to `trace_file` at shutdown
//! (`log_frequency` 0), or to `trace_file.<n>` every `log_frequency` traces. A trace is
//! complete when the last holder of it (the front end and the request) lets it go.
//! At the `TENSORS` level a trace also holds the request's inputs as queued
//! (`TENSOR_QUEUE_INPUT`) and the backend's outputs (`TENSOR_BACKEND_OUTPUT`).
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::error::{CoreError, CoreResult};

/// The levels Triton knows.
const LEVELS: [&str; 3] = ["OFF", "TIMESTAMPS", "TENSORS"];

/// One scope's settings (the server's, or a model's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSettings {
    /// `trace_level`: OFF, or TIMESTAMPS and/or TENSORS.
    pub level: Vec<String>,
    /// `trace_rate`: one trace per this many requests.
    pub rate: u64,
    /// `trace_count`: traces left to take (-1: no limit).
    pub count: i64,
    /// `log_frequency`: write every this many traces (0: at shutdown).
    pub log_frequency: u64,
    /// `trace_file`.
    pub file: String,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings {
            level: vec!["OFF".into()],
            rate: 1000,
            count: -1,
            log_frequency: 0,
            file: String::new(),
        }
    }
}

impl TraceSettings {
    /// Triton's JSON form (every value a string; the level a list).
    pub fn json(&self) -> Value {
        json!({
            "trace_level": self.level,
            "trace_rate": self.rate.to_string(),
            "trace_count": self.count.to_string(),
            "log_frequency": self.log_frequency.to_string(),
            "trace_file": self.file,
            "trace_mode": "triton",
        })
    }

    fn on(&self) -> bool {
        self.level.iter().any(|l| l != "OFF")
    }

    /// Applies one setting from the protocol (`value` a string, or a list for the level).
    fn set(&mut self, key: &str, value: &Value) -> CoreResult<()> {
        let text = |v: &Value| -> CoreResult<String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Array(a) if a.len() == 1 => match &a[0] {
                    Value::String(s) => Ok(s.clone()),
                    other => Ok(other.to_string()),
                },
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(CoreError::invalid(format!(
                    "trace setting '{key}' must be a string, got {v}"
                ))),
            }
        };
        let number = |v: &Value| -> CoreResult<i64> {
            let t = text(v)?;
            t.trim().parse::<i64>().map_err(|_| {
                CoreError::invalid(format!(
                    "unable to parse '{key}', got: '{t}', expecting an integer"
                ))
            })
        };
        let at_least = |v: &Value, min: i64| -> CoreResult<i64> {
            let n = number(v)?;
            if n < min {
                return Err(CoreError::invalid(format!(
                    "'{key}' must be {min} or more, got {n}"
                )));
            }
            Ok(n)
        };
        match key {
            "trace_level" => {
                let levels: Vec<String> = match value {
                    Value::Array(a) => a.iter().map(text).collect::<CoreResult<_>>()?,
                    v => vec![text(v)?],
                };
                for l in &levels {
                    if !LEVELS.contains(&l.as_str()) {
                        return Err(CoreError::invalid(format!(
                            "unsupported trace level '{l}' (expected one of OFF, TIMESTAMPS, TENSORS)"
                        )));
                    }
                }
                self.level = if levels.is_empty() {
                    vec!["OFF".into()]
                } else {
                    levels
                };
            }
            "trace_rate" => self.rate = at_least(value, 1)? as u64,
            "trace_count" => self.count = at_least(value, -1)?,
            "log_frequency" => self.log_frequency = at_least(value, 0)? as u64,
            "trace_file" => self.file = text(value)?,
            "trace_mode" => {
                let mode = text(value)?;
                if mode != "triton" {
                    return Err(CoreError::invalid(format!(
                        "trace mode '{mode}' is not supported (supported: triton)"
                    )));
                }
            }
            _ => return Err(CoreError::invalid(format!("unknown trace setting '{key}'"))),
        }
        Ok(())
    }
}

/// A scope's settings and how many requests it has seen (for `trace_rate`).
#[derive(Debug, Default)]
struct Scope {
    settings: TraceSettings,
    seen: u64,
}

/// Traces waiting to be written to one file.
#[derive(Debug, Default)]
struct FileState {
    pending: Vec<Value>,
    /// Next `.<n>` suffix (with a `log_frequency`).
    index: u64,
}

/// Completed traces, by file.
#[derive(Debug, Default)]
struct Files {
    files: Mutex<HashMap<(String, u64), FileState>>,
}

impl Files {
    /// Queues one trace's objects, writing the file's batch when `log_frequency` is reached.
    fn add(&self, file: &str, log_frequency: u64, objects: Vec<Value>) {
        let mut files = self.lock();
        let state = files.entry((file.to_string(), log_frequency)).or_default();
        state.pending.push(Value::Array(objects));
        if log_frequency > 0 && state.pending.len() as u64 >= log_frequency {
            write_batch(file, log_frequency, state);
        }
    }

    /// Writes whatever is pending (at shutdown).
    fn flush(&self) {
        for ((file, freq), state) in self.lock().iter_mut() {
            if !state.pending.is_empty() {
                write_batch(file, *freq, state);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, u64), FileState>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes `state`'s pending traces as one JSON array to `file` (or `file.<n>`).
fn write_batch(file: &str, log_frequency: u64, state: &mut FileState) {
    let path = if log_frequency > 0 {
        let p = format!("{file}.{}", state.index);
        state.index += 1;
        p
    } else {
        file.to_string()
    };
    let objects: Vec<Value> = state
        .pending
        .drain(..)
        .flat_map(|t| match t {
            Value::Array(a) => a,
            other => vec![other],
        })
        .collect();
    let text = Value::Array(objects).to_string();
    if let Err(e) = std::fs::write(&path, text) {
        tracing::error!("cannot write trace file '{path}': {e}");
    }
}

/// The server's tracer.
#[derive(Debug, Default)]
pub struct Tracer {
    global: Mutex<Scope>,
    models: Mutex<HashMap<String, Scope>>,
    /// Some scope traces: without it, sampling returns at once, taking no lock.
    active: AtomicBool,
    next_id: AtomicU64,
    files: Arc<Files>,
}

/// One traced request: its timestamps, recorded by the front end and the core.
#[derive(Debug)]
pub struct Trace {
    id: u64,
    model: String,
    version: AtomicI64,
    request_id: Mutex<String>,
    stamps: Mutex<Vec<(&'static str, u64)>>,
    /// `TIMESTAMPS` / `TENSORS` are among the levels.
    timestamps: bool,
    tensors: bool,
    tensor_objects: Mutex<Vec<Value>>,
    file: String,
    log_frequency: u64,
    files: Arc<Files>,
}

impl Trace {
    /// Records a tensor (`TENSORS` level): `activity` is `TENSOR_QUEUE_INPUT` or
    /// `TENSOR_BACKEND_OUTPUT`; the data is written as comma-separated elements.
    pub fn tensor(
        &self,
        activity: &'static str,
        name: &str,
        dtype: kiln_sdk::DataType,
        shape: &[i64],
        data: &[u8],
    ) {
        if !self.tensors {
            return;
        }
        let text = match crate::classification::numbers(dtype, data) {
            Some(v) => v
                .iter()
                .map(|&x| crate::classification::format_value(dtype, x))
                .collect::<Vec<_>>()
                .join(","),
            None => kiln_sdk::bytes_elements(data)
                .map(|e| e.map(|b| String::from_utf8_lossy(b).into_owned()))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(","))
                .unwrap_or_default(),
        };
        let shape: Vec<String> = shape.iter().map(i64::to_string).collect();
        let object = json!({
            "id": self.id,
            "activity": activity,
            "tensor": {
                "name": name,
                "data": text,
                "shape": shape.join(","),
                "dtype": dtype.protocol_name(),
            }
        });
        self.tensor_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(object);
    }

    /// Records `name` at `at`.
    pub fn stamp_at(&self, name: &'static str, at: Instant) {
        if !self.timestamps {
            return;
        }
        let ns = crate::host::clock_ns_of(at);
        self.stamps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, ns));
    }

    /// Records `name` now.
    pub fn stamp(&self, name: &'static str) {
        self.stamp_at(name, Instant::now());
    }

    /// The model version and request id the request was given.
    pub fn identify(&self, version: i64, request_id: &str) {
        self.version.store(version, Ordering::Relaxed);
        *self.request_id.lock().unwrap_or_else(|p| p.into_inner()) = request_id.to_string();
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if self.file.is_empty() {
            return;
        }
        let mut head = json!({
            "id": self.id,
            "model_name": self.model,
            "model_version": self.version.load(Ordering::Relaxed),
        });
        let rid = self.request_id.get_mut().unwrap_or_else(|p| p.into_inner());
        if !rid.is_empty() {
            head["request_id"] = Value::from(rid.clone());
        }
        let mut objects = vec![head];
        let stamps = self.stamps.get_mut().unwrap_or_else(|p| p.into_inner());
        objects.extend(
            stamps
                .iter()
                .map(|(name, ns)| json!({"id": self.id, "timestamps": [{"name": name, "ns": ns}]})),
        );
        objects.append(
            self.tensor_objects
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.files.add(&self.file, self.log_frequency, objects);
    }
}

impl Tracer {
    /// A tracer starting from tritonserver's `--trace-config` settings (`level=`, `rate=`,
    /// `count=`, `mode=`, `triton,file=`, `triton,log-frequency=`).
    pub fn from_settings(settings: &[String]) -> Result<Tracer, String> {
        let mut s = TraceSettings::default();
        let mut levels: Vec<String> = Vec::new();
        for item in settings {
            let item = item.strip_prefix("triton,").unwrap_or(item);
            let (k, v) = item.split_once('=').ok_or_else(|| {
                format!("--trace-config expects [<mode>,]<setting>=<value>, got '{item}'")
            })?;
            let key = match k {
                "level" => {
                    levels.push(v.to_string());
                    continue;
                }
                "rate" => "trace_rate",
                "count" => "trace_count",
                "mode" => "trace_mode",
                "file" => "trace_file",
                "log-frequency" => "log_frequency",
                _ => return Err(format!("unknown --trace-config setting '{k}'")),
            };
            s.set(key, &Value::from(v)).map_err(|e| e.message)?;
        }
        if !levels.is_empty() {
            s.set("trace_level", &Value::from(levels))
                .map_err(|e| e.message)?;
        }
        Ok(Tracer {
            active: AtomicBool::new(s.on()),
            global: Mutex::new(Scope {
                settings: s,
                seen: 0,
            }),
            ..Default::default()
        })
    }

    /// A trace for the next request to `model`, when its settings sample it.
    pub fn sample(&self, model: &str) -> Option<Arc<Trace>> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        // Lock order everywhere: the server's scope, then the models'.
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let scope = match models.get_mut(model) {
            Some(s) => s,
            None => &mut *global,
        };
        let s = &mut scope.settings;
        if !s.on() || s.count == 0 {
            return None;
        }
        scope.seen += 1;
        if scope.seen % s.rate != 0 {
            return None;
        }
        if s.count > 0 {
            s.count -= 1;
        }
        Some(Arc::new(Trace {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            model: model.to_string(),
            version: AtomicI64::new(-1),
            request_id: Mutex::new(String::new()),
            stamps: Mutex::new(Vec::new()),
            timestamps: s.level.iter().any(|l| l == "TIMESTAMPS"),
            tensors: s.level.iter().any(|l| l == "TENSORS"),
            tensor_objects: Mutex::new(Vec::new()),
            file: s.file.clone(),
            log_frequency: s.log_frequency,
            files: self.files.clone(),
        }))
    }

    /// The settings that apply to `model` (the server's when `None` or not set for it).
    pub fn settings(&self, model: Option<&str>) -> Value {
        let global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        model
            .and_then(|m| models.get(m))
            .map_or(&global.settings, |s| &s.settings)
            .json()
    }

    /// Applies the protocol's changes: for the server, each given setting (null restores
    /// the default); for a model, the same on a copy of the server's settings made the
    /// first time, where null restores the server's value and no settings at all drop
    /// the model's own. Returns the settings that now apply.
    pub fn update(&self, model: Option<&str>, changes: &Map<String, Value>) -> CoreResult<Value> {
        let mut global = self.global.lock().unwrap_or_else(|p| p.into_inner());
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let now = match model {
            None => {
                let mut next = global.settings.clone();
                apply(&mut next, changes, &TraceSettings::default())?;
                global.settings = next;
                global.settings.json()
            }
            Some(model) if changes.is_empty() => {
                models.remove(model);
                global.settings.json()
            }
            Some(model) => {
                let mut next = models
                    .get(model)
                    .map_or_else(|| global.settings.clone(), |s| s.settings.clone());
                apply(&mut next, changes, &global.settings)?;
                let scope = models.entry(model.to_string()).or_default();
                scope.settings = next;
                scope.settings.json()
            }
        };
        let on = global.settings.on() || models.values().any(|s| s.settings.on());
        self.active.store(on, Ordering::Relaxed);
        Ok(now)
    }

    /// Writes the traces not yet written (at shutdown).
    pub fn flush(&self) {
        self.files.flush();
    }
}

/// Applies `changes` to `s`; a null takes the value from `fallback`.
fn apply(
    s: &mut TraceSettings,
    changes: &Map<String, Value>,
    fallback: &TraceSettings,
) -> CoreResult<()> {
    for (k, v) in changes {
        if v.is_null() {
            let from = fallback.json();
            let restored = from
                .get(k.as_str())
                .cloned()
                .ok_or_else(|| CoreError::invalid(format!("unknown trace setting '{k}'")))?;
            s.set(k, &restored)?;
        } else {
            s.set(k, v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("an object")
    }

    #[test]
    fn model_settings_start_from_the_servers_and_fall_back_to_them() {
        let t = Tracer::default();
        t.update(None, &changes(json!({"trace_rate": "7"})))
            .expect("valid");
        let m = t
            .update(Some("m"), &changes(json!({"trace_level": ["TIMESTAMPS"]})))
            .expect("valid");
        assert_eq!(m["trace_rate"], "7");
        assert_eq!(m["trace_level"], json!(["TIMESTAMPS"]));
        assert_eq!(t.settings(Some("other"))["trace_level"], json!(["OFF"]));
        t.update(None, &changes(json!({"trace_rate": "9"})))
            .expect("valid");
        let m = t
            .update(Some("m"), &changes(json!({"trace_rate": null})))
            .expect("valid");
        assert_eq!(m["trace_rate"], "9", "null takes the server's value");
        t.update(Some("m"), &Map::new()).expect("clears");
        assert_eq!(t.settings(Some("m"))["trace_level"], json!(["OFF"]));
        let e = t
            .update(None, &changes(json!({"trace_level": ["LOUD"]})))
            .unwrap_err();
        assert!(
            e.message.contains("unsupported trace level"),
            "{}",
            e.message
        );
        assert!(t
            .update(None, &changes(json!({"trace_rate": "0"})))
            .is_err());
        assert!(t.update(None, &changes(json!({"colour": "red"}))).is_err());
        assert_eq!(
            t.settings(None)["trace_rate"],
            "9",
            "a failed update changes nothing"
        );
    }

    #[test]
    fn every_rate_th_request_is_sampled_while_the_count_lasts() {
        let t =
            Tracer::from_settings(&["level=TIMESTAMPS".into(), "rate=2".into(), "count=2".into()])
                .expect("valid");
        let sampled: Vec<bool> = (0..8).map(|_| t.sample("m").is_some()).collect();
        assert_eq!(
            sampled,
            [false, true, false, true, false, false, false, false]
        );
        assert_eq!(t.settings(None)["trace_count"], "0");
        assert!(Tracer::from_settings(&["colour=red".into()]).is_err());
    }

    #[test]
    fn traces_are_written_in_tritons_format_every_log_frequency() {
        let dir = std::env::temp_dir().join(format!("kiln-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("trace.json").display().to_string();
        let t = Tracer::from_settings(&[
            "level=TIMESTAMPS".into(),
            "rate=1".into(),
            format!("triton,file={file}"),
            "triton,log-frequency=2".into(),
        ])
        .expect("valid");
        for _ in 0..3 {
            let tr = t.sample("m").expect("sampled");
            tr.identify(3, "req");
            tr.stamp("REQUEST_START");
            tr.stamp("REQUEST_END");
        }
        let first: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{file}.0")).expect("written"))
                .expect("JSON");
        let objects = first.as_array().expect("an array");
        assert_eq!(objects.len(), 6, "two traces of a head and two stamps");
        assert_eq!(objects[0]["model_name"], "m");
        assert_eq!(objects[0]["model_version"], 3);
        assert_eq!(objects[0]["request_id"], "req");
        assert_eq!(objects[1]["timestamps"][0]["name"], "REQUEST_START");
        assert!(!std::path::Path::new(&format!("{file}.1")).exists());
        t.flush();
        assert!(std::path::Path::new(&format!("{file}.1")).exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
