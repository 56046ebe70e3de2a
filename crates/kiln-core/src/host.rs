//! The host side of the ABI: the callback table given to backends, and the registry of
//! requests and responses they hold. Handles are registry ids, so misuse (double release,
//! send after release, unknown handle) returns an error instead of touching freed memory.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_abi::{
    self as abi, KilnError, KilnHostApi, KilnRequest, KilnResponse, KilnStr, KilnTensorView,
};
use kiln_sdk::DataType;

use crate::error::{CoreError, ErrorKind};
use crate::model::ModelShared;
use crate::request::{InferRequest, OutputTensor, ResponseEvent, ResponseSink};
use crate::stats::{ComputeTimes, FailReason};

/// Host error object behind `*mut KilnError`.
struct HostError {
    code: u32,
    message: String,
}

/// Allocates an ABI error from a core error.
pub(crate) fn new_error(e: &CoreError) -> *mut KilnError {
    let code = match e.kind {
        ErrorKind::InvalidArg => abi::KILN_ERROR_INVALID_ARG,
        ErrorKind::NotFound => abi::KILN_ERROR_NOT_FOUND,
        ErrorKind::Unavailable => abi::KILN_ERROR_UNAVAILABLE,
        ErrorKind::Unsupported => abi::KILN_ERROR_UNSUPPORTED,
        ErrorKind::Internal => abi::KILN_ERROR_INTERNAL,
        ErrorKind::AlreadyExists => abi::KILN_ERROR_ALREADY_EXISTS,
        ErrorKind::Cancelled => abi::KILN_ERROR_CANCELLED,
        ErrorKind::Unknown => abi::KILN_ERROR_UNKNOWN,
    };
    Box::into_raw(Box::new(HostError {
        code,
        message: e.message.clone(),
    })) as *mut KilnError
}

/// Takes ownership of an ABI error returned by a backend (null = success).
pub(crate) fn take_error(e: *mut KilnError) -> Option<CoreError> {
    if e.is_null() {
        return None;
    }
    // SAFETY: every non-null error a backend returns was made by `error_new` (a Box).
    let he = unsafe { Box::from_raw(e as *mut HostError) };
    Some(CoreError::new(ErrorKind::from_abi(he.code), he.message))
}

static CLOCK_BASE: OnceLock<Instant> = OnceLock::new();

fn clock_base() -> Instant {
    *CLOCK_BASE.get_or_init(Instant::now)
}

/// Host clock in ns since the process's clock base.
pub(crate) fn clock_ns_of(t: Instant) -> u64 {
    t.saturating_duration_since(clock_base()).as_nanos() as u64
}

/// Progress of a request held by a backend.
#[derive(Default)]
struct InflightState {
    released: bool,
    /// `Some(ok)` once the final response (or error) was delivered.
    finished: Option<bool>,
    /// Queue and compute times, once the execution that ran it has returned.
    exec: Option<(Duration, ComputeTimes)>,
    stats_recorded: bool,
    /// Whether a successful response was already delivered (first-response latency).
    responded: bool,
    /// The final event, held until the execution's times are known and the request is
    /// counted (so statistics read right after the response include it).
    held_final: Option<ResponseEvent>,
}

/// A request handed to a backend, kept alive (with its views) until released.
pub(crate) struct Inflight {
    pub request: Arc<InferRequest>,
    pub model: Arc<ModelShared>,
    sink: ResponseSink,
    state: Mutex<InflightState>,
    pub views: Vec<KilnTensorView>,
    pub requested: Vec<KilnStr>,
    pub params_json: String,
}

// SAFETY: the raw pointers in `views`/`requested` point into `request` (an Arc kept here)
// or `model`'s config, both immutable and shared.
unsafe impl Send for Inflight {}
unsafe impl Sync for Inflight {}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, InflightState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records statistics once both the outcome and the execution times are known.
    fn maybe_record(&self, st: &mut InflightState) {
        if st.stats_recorded {
            return;
        }
        let (Some(ok), Some((queue, compute))) = (st.finished, st.exec) else {
            return;
        };
        st.stats_recorded = true;
        // Both the outcome and the execution are over (as Triton's request release).
        if let Some(t) = &self.request.trace {
            t.stamp("REQUEST_END");
        }
        let total = self.request.arrival.elapsed();
        if ok {
            self.model.stats.record_success(total, queue, compute);
        } else {
            self.model.stats.record_failure(total, FailReason::Backend);
        }
    }

    /// Records the first-response latency on the request's first successful response.
    fn note_response(&self, st: &mut InflightState, event: &ResponseEvent) {
        if !st.responded && matches!(event, ResponseEvent::Response { .. }) {
            st.responded = true;
            self.model
                .stats
                .record_first_response(self.request.arrival.elapsed());
        }
    }

    /// Delivers a response that is not the last one.
    pub(crate) fn send(&self, event: ResponseEvent) {
        let mut st = self.lock();
        self.note_response(&mut st, &event);
        drop(st);
        self.sink.send(event);
    }

    /// Delivers the final outcome if none was delivered yet.
    pub(crate) fn finish(&self, event: ResponseEvent) -> bool {
        let mut st = self.lock();
        if st.finished.is_some() {
            return false;
        }
        self.note_response(&mut st, &event);
        let ok = !matches!(event, ResponseEvent::Error(_));
        st.finished = Some(ok);
        if st.exec.is_some() {
            self.maybe_record(&mut st);
            self.sink.send(event);
        } else {
            // Sent by `set_exec_times`, once the execution has returned.
            st.held_final = Some(event);
        }
        true
    }

    /// Called by the instance thread after `execute` returned: counts the request if it
    /// is finished, then delivers its final event.
    pub(crate) fn set_exec_times(&self, queue: Duration, compute: ComputeTimes) {
        let mut st = self.lock();
        st.exec = Some((queue, compute));
        self.maybe_record(&mut st);
        if let Some(event) = st.held_final.take() {
            self.sink.send(event);
        }
    }

    pub(crate) fn is_released(&self) -> bool {
        self.lock().released
    }
}

/// Compute window `(start_ns, end_ns)` an instance reported for the batch it runs.
pub(crate) type ComputeSlot = Arc<Mutex<Option<(u64, u64)>>>;

struct PendingResponse {
    inflight: Arc<Inflight>,
    outputs: crate::request::Produced,
    parameters: serde_json::Map<String, serde_json::Value>,
}

#[derive(Default)]
struct Registry {
    requests: HashMap<u64, Arc<Inflight>>,
    responses: HashMap<u64, PendingResponse>,
    instances: HashMap<u64, ComputeSlot>,
}

static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn next_handle() -> u64 {
    NEXT_HANDLE.fetch_add(1, Ordering::Relaxed)
}

/// Builds and registers an inflight request; returns its handle.
pub(crate) fn register_request(
    request: Arc<InferRequest>,
    model: Arc<ModelShared>,
    sink: ResponseSink,
) -> (u64, Arc<Inflight>) {
    let views = request
        .inputs
        .iter()
        .map(|t| KilnTensorView::cpu(&t.name, t.dtype as u32, &t.shape, &t.data))
        .collect();
    let mut names: Vec<&str> = if request.outputs.is_empty() {
        model.output_names.iter().map(String::as_str).collect()
    } else {
        request.outputs.iter().map(|o| o.name.as_str()).collect()
    };
    // A sequence model's state outputs are always produced: the next request reads them.
    if let Some(seq) = &model.sequences {
        for name in seq.state_outputs() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let requested = names.into_iter().map(KilnStr::from_str).collect();
    let params_json = serde_json::Value::Object(request.parameters.clone()).to_string();
    let inflight = Arc::new(Inflight {
        request,
        model,
        sink,
        state: Mutex::new(InflightState::default()),
        views,
        requested,
        params_json,
    });
    let h = next_handle();
    registry().requests.insert(h, inflight.clone());
    (h, inflight)
}

/// Removes a request the host fails itself (after an execute error).
pub(crate) fn fail_unreleased(handle: u64, err: &CoreError) {
    let inflight = {
        let mut reg = registry();
        reg.requests.remove(&handle)
    };
    if let Some(inf) = inflight {
        inf.lock().released = true;
        inf.finish(ResponseEvent::Error(err.clone()));
    }
}

/// Registers an instance for compute reporting; returns its token.
pub(crate) fn register_instance() -> (u64, ComputeSlot) {
    let h = next_handle();
    let slot = Arc::new(Mutex::new(None));
    registry().instances.insert(h, slot.clone());
    (h, slot)
}

/// Forgets an instance token.
pub(crate) fn unregister_instance(h: u64) {
    registry().instances.remove(&h);
}

/// A string a backend passed, copied (invalid UTF-8 replaced).
pub(crate) fn owned_str(s: &KilnStr) -> String {
    // SAFETY: the ABI requires strings valid for the call that passes them.
    String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> *mut KilnError {
    new_error(&CoreError::new(kind, msg))
}

/// The request a backend still holds, or the error for `op` on an unknown or released one.
fn held(request: *mut KilnRequest, op: &str) -> Result<Arc<Inflight>, *mut KilnError> {
    registry()
        .requests
        .get(&(request as u64))
        .cloned()
        .ok_or_else(|| {
            err(
                ErrorKind::InvalidArg,
                format!("{op}: unknown or released request"),
            )
        })
}

unsafe extern "C" fn h_error_new(code: u32, message: KilnStr) -> *mut KilnError {
    let message = owned_str(&message);
    Box::into_raw(Box::new(HostError { code, message })) as *mut KilnError
}

unsafe extern "C" fn h_error_delete(e: *mut KilnError) {
    if !e.is_null() {
        // SAFETY: made by h_error_new / new_error.
        drop(unsafe { Box::from_raw(e as *mut HostError) });
    }
}

unsafe extern "C" fn h_error_code(e: *const KilnError) -> u32 {
    // SAFETY: a live host error.
    unsafe { (e as *const HostError).as_ref() }
        .map(|e| e.code)
        .unwrap_or(abi::KILN_ERROR_UNKNOWN)
}

unsafe extern "C" fn h_error_message(e: *const KilnError) -> KilnStr {
    // SAFETY: a live host error; the string lives until it is deleted.
    unsafe { (e as *const HostError).as_ref() }
        .map(|e| KilnStr::from_str(&e.message))
        .unwrap_or(KilnStr::EMPTY)
}

unsafe extern "C" fn h_log(level: u32, message: KilnStr) {
    // SAFETY: valid for the call.
    let m = String::from_utf8_lossy(unsafe { message.as_bytes() });
    match level {
        abi::KILN_LOG_ERROR => tracing::error!(target: "kiln::backend", "{m}"),
        abi::KILN_LOG_WARN => tracing::warn!(target: "kiln::backend", "{m}"),
        abi::KILN_LOG_INFO => tracing::info!(target: "kiln::backend", "{m}"),
        _ => tracing::debug!(target: "kiln::backend", "{m}"),
    }
}

unsafe extern "C" fn h_clock_ns() -> u64 {
    clock_ns_of(Instant::now())
}

unsafe extern "C" fn h_response_new(
    request: *mut KilnRequest,
    out: *mut *mut KilnResponse,
) -> *mut KilnError {
    if out.is_null() {
        return err(ErrorKind::InvalidArg, "response_new: null out pointer");
    }
    let mut reg = registry();
    let Some(inf) = reg.requests.get(&(request as u64)).cloned() else {
        return err(
            ErrorKind::InvalidArg,
            "response_new: unknown or released request",
        );
    };
    if inf.lock().finished.is_some() {
        return err(
            ErrorKind::InvalidArg,
            "response_new: the request already has its final response",
        );
    }
    let h = next_handle();
    reg.responses.insert(
        h,
        PendingResponse {
            inflight: inf,
            outputs: Vec::new(),
            parameters: serde_json::Map::new(),
        },
    );
    // SAFETY: checked non-null above.
    unsafe { *out = h as *mut KilnResponse };
    std::ptr::null_mut()
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn h_output_alloc(
    response: *mut KilnResponse,
    name: KilnStr,
    dtype: u32,
    shape: *const i64,
    ndim: usize,
    byte_len: usize,
    _preferred: u32,
    buffer: *mut *mut u8,
    memory_kind: *mut u32,
) -> *mut KilnError {
    if buffer.is_null() {
        return err(ErrorKind::InvalidArg, "output_alloc: null buffer pointer");
    }
    let name = owned_str(&name);
    let Some(dt) = DataType::from_abi(dtype) else {
        return err(
            ErrorKind::InvalidArg,
            format!("output '{name}': invalid data type {dtype}"),
        );
    };
    // SAFETY: the backend passes `ndim` dimensions.
    let shape: Vec<i64> = unsafe { abi::raw_slice(shape, ndim) }.to_vec();
    if shape.iter().any(|&d| d < 0) {
        return err(
            ErrorKind::InvalidArg,
            format!("output '{name}': negative dimension in shape {shape:?}"),
        );
    }
    if let Some(es) = dt.element_size() {
        let expect = crate::request::element_count(&shape).and_then(|n| n.checked_mul(es));
        if expect != Some(byte_len) {
            let expect = expect.map_or("more than can be addressed".into(), |e| e.to_string());
            return err(ErrorKind::InvalidArg, format!(
                "output '{name}': byte size {byte_len} does not match shape {shape:?} of {dt} ({expect} bytes)"
            ));
        }
    }
    let mut reg = registry();
    let Some(resp) = reg.responses.get_mut(&(response as u64)) else {
        return err(
            ErrorKind::InvalidArg,
            "output_alloc: unknown or already sent response",
        );
    };
    if resp.outputs.iter().any(|o| o.0 == name) {
        return err(
            ErrorKind::AlreadyExists,
            format!("output '{name}' was already allocated"),
        );
    }
    let mut data = vec![0u8; byte_len];
    let ptr = data.as_mut_ptr();
    resp.outputs.push((name, dt, shape, data));
    // SAFETY: out pointers checked / provided by the caller. The Vec's heap buffer does not
    // move when the outer Vec grows.
    unsafe {
        *buffer = ptr;
        if !memory_kind.is_null() {
            *memory_kind = abi::KILN_MEMORY_CPU;
        }
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn h_response_send(
    response: *mut KilnResponse,
    flags: u32,
    error: *mut KilnError,
) -> *mut KilnError {
    let backend_err = take_error(error);
    let Some(pending) = registry().responses.remove(&(response as u64)) else {
        return err(
            ErrorKind::InvalidArg,
            "response_send: unknown or already sent response",
        );
    };
    let inf = pending.inflight;
    let last = flags & abi::KILN_RESPONSE_FLAG_FINAL != 0;
    if inf.lock().finished.is_some() {
        return err(
            ErrorKind::InvalidArg,
            "response_send: the request already has its final response",
        );
    }
    if let (Some(ck), Some(cache), true, true) = (
        inf.request.cache_key,
        &inf.model.cache,
        backend_err.is_none(),
        last,
    ) {
        let insert_start = std::time::Instant::now();
        cache.insert(ck.key, pending.outputs.clone());
        inf.model
            .stats
            .record_cache_miss(ck.lookup + insert_start.elapsed());
    }
    if let Some(t) = &inf.request.trace {
        for (name, dtype, shape, data) in &pending.outputs {
            t.tensor("TENSOR_BACKEND_OUTPUT", name, *dtype, shape, data);
        }
    }
    let event = match backend_err {
        // A decoupled model may send an error and go on responding, as in Triton.
        Some(e) if !last && inf.model.is_decoupled() => ResponseEvent::StreamError(e),
        Some(e) => ResponseEvent::Error(e),
        None => match crate::model::build_response(&inf.model, &inf.request, pending.outputs) {
            Ok(outputs) => ResponseEvent::Response {
                response: crate::request::InferResponse {
                    model_name: inf.model.name.clone(),
                    model_version: inf.model.version,
                    id: inf.request.id.clone(),
                    outputs,
                    parameters: pending.parameters,
                },
                last,
            },
            Err(e) => ResponseEvent::Error(e),
        },
    };
    if let (Some(t), true) = (&inf.request.trace, last) {
        t.stamp("INFER_RESPONSE_COMPLETE");
    }
    if event.is_final() {
        inf.finish(event);
    } else {
        inf.send(event);
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn h_response_set_parameter(
    response: *mut KilnResponse,
    name: KilnStr,
    kind: u32,
    value: *const std::ffi::c_void,
) -> *mut KilnError {
    let name = owned_str(&name);
    if value.is_null() {
        return err(
            ErrorKind::InvalidArg,
            format!("response parameter '{name}': null value"),
        );
    }
    // SAFETY: `value` points to the type `kind` names, as the ABI requires.
    let v = unsafe {
        match kind {
            abi::KILN_PARAMETER_BOOL => serde_json::Value::Bool(*(value as *const bool)),
            abi::KILN_PARAMETER_INT => serde_json::Value::from(*(value as *const i64)),
            abi::KILN_PARAMETER_DOUBLE => {
                match serde_json::Number::from_f64(*(value as *const f64)) {
                    Some(n) => serde_json::Value::Number(n),
                    None => {
                        return err(
                            ErrorKind::InvalidArg,
                            format!("response parameter '{name}': a double must be finite"),
                        )
                    }
                }
            }
            abi::KILN_PARAMETER_STRING => {
                serde_json::Value::String(owned_str(&*(value as *const KilnStr)))
            }
            _ => {
                return err(
                    ErrorKind::InvalidArg,
                    format!("response parameter '{name}': unknown kind {kind}"),
                )
            }
        }
    };
    let mut reg = registry();
    let Some(resp) = reg.responses.get_mut(&(response as u64)) else {
        return err(
            ErrorKind::InvalidArg,
            "response_set_parameter: unknown or already sent response",
        );
    };
    resp.parameters.insert(name, v);
    std::ptr::null_mut()
}

unsafe extern "C" fn h_request_send_flags(request: *mut KilnRequest, flags: u32) -> *mut KilnError {
    let inf = match held(request, "send_flags") {
        Ok(inf) => inf,
        Err(e) => return e,
    };
    if flags & abi::KILN_RESPONSE_FLAG_FINAL != 0 && !inf.finish(ResponseEvent::Final) {
        return err(
            ErrorKind::InvalidArg,
            "send_flags: the request already has its final response",
        );
    }
    std::ptr::null_mut()
}

/// Answers a question about a request the backend holds: writes `value(request)` to `out`
/// (when not null).
///
/// # Safety
/// `out` is null or valid for a write, as the ABI requires.
unsafe fn answer<T>(
    request: *mut KilnRequest,
    op: &str,
    out: *mut T,
    value: impl FnOnce(&Inflight) -> T,
) -> *mut KilnError {
    let inf = match held(request, op) {
        Ok(inf) => inf,
        Err(e) => return e,
    };
    if !out.is_null() {
        // SAFETY: non-null out pointer from the caller.
        unsafe { *out = value(&inf) };
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn h_request_is_cancelled(
    request: *mut KilnRequest,
    out: *mut bool,
) -> *mut KilnError {
    // SAFETY: the ABI's out pointer.
    unsafe { answer(request, "is_cancelled", out, |inf| inf.sink.is_closed()) }
}

unsafe extern "C" fn h_request_correlation_id_text(
    request: *mut KilnRequest,
    out: *mut KilnStr,
) -> *mut KilnError {
    // SAFETY: the ABI's out pointer. The text lives in the request, which the registry
    // keeps until the backend releases it.
    unsafe {
        answer(request, "correlation_id_text", out, |inf| {
            KilnStr::from_str(inf.request.correlation_text.as_deref().unwrap_or(""))
        })
    }
}

unsafe extern "C" fn h_request_release(request: *mut KilnRequest, _flags: u32) -> *mut KilnError {
    let Some(inf) = registry().requests.remove(&(request as u64)) else {
        return err(
            ErrorKind::InvalidArg,
            "request_release: unknown or already released request",
        );
    };
    inf.lock().released = true;
    inf.finish(ResponseEvent::Error(CoreError::internal(
        "the backend released the request without sending a final response",
    )));
    std::ptr::null_mut()
}

unsafe extern "C" fn h_report_compute(
    instance: *mut abi::KilnInstance,
    start: u64,
    end: u64,
) -> *mut KilnError {
    let Some(slot) = registry().instances.get(&(instance as u64)).cloned() else {
        return err(ErrorKind::InvalidArg, "report_compute: unknown instance");
    };
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, end));
    std::ptr::null_mut()
}

/// The host table handed to every backend.
pub(crate) static HOST_API: KilnHostApi = KilnHostApi {
    header: abi::KilnApiHeader::for_table::<KilnHostApi>(),
    error_new: h_error_new,
    error_delete: h_error_delete,
    error_code: h_error_code,
    error_message: h_error_message,
    log: h_log,
    clock_ns: h_clock_ns,
    response_new: h_response_new,
    output_alloc: h_output_alloc,
    response_send: h_response_send,
    request_send_flags: h_request_send_flags,
    request_is_cancelled: h_request_is_cancelled,
    request_release: h_request_release,
    report_compute: h_report_compute,
    infer: crate::bls::h_infer,
    metric: crate::custom_metrics::h_metric,
    response_set_parameter: h_response_set_parameter,
    model_control: crate::model_control::h_model_control,
    request_correlation_id_text: h_request_correlation_id_text,
    infer_response_parameters: crate::bls::h_infer_response_parameters,
    infer_cancel: crate::bls::h_infer_cancel,
};

/// Converts a backend output buffer into a response tensor without copying.
pub(crate) fn output_tensor(
    name: String,
    dtype: DataType,
    shape: Vec<i64>,
    data: Vec<u8>,
) -> OutputTensor {
    OutputTensor {
        name,
        dtype,
        shape,
        data: Bytes::from(data),
        in_shared_memory: false,
    }
}
