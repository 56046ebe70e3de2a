//! Requests a backend makes to other models of the server (Triton's BLS, "business logic
//! scripting"): the host's `infer` (ABI 1.3). The request goes through the target model's
//! normal path (validation, scheduler, statistics); the calling instance's thread blocks
//! until the last response.
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock, Weak};

use bytes::Bytes;
use kiln_abi::{self as abi, KilnError, KilnInferCallback, KilnInferRequest};
use kiln_sdk::DataType;

use crate::error::CoreError;
use crate::request::{InferRequest, InputTensor, RequestedOutput, ResponseEvent, ResponseSink};

/// The model table of the server in this process (the latest started).
static MODELS: OnceLock<Mutex<Weak<crate::repository::ModelTable>>> = OnceLock::new();

/// Makes `models` the table BLS requests are served from.
pub(crate) fn serve_from(models: &crate::repository::Models) {
    let slot = MODELS.get_or_init(|| Mutex::new(Weak::new()));
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::downgrade(models);
}

use crate::host::owned_str as text;
use abi::raw_slice as slice;

/// Builds the core request from the backend's description (inputs are copied: the
/// request may outlive nothing of the caller's, but the scheduler needs owned bytes).
///
/// # Safety
/// Every pointer in `r` must be valid for the call, as the ABI requires.
unsafe fn to_request(r: &KilnInferRequest) -> Result<InferRequest, CoreError> {
    let mut req = InferRequest::new(text(&r.model));
    req.model_version = (r.version >= 0).then_some(r.version);
    req.id = text(&r.id);
    req.correlation_id = r.correlation_id;
    req.flags = r.flags;
    req.timeout_us = r.timeout_us;
    let params = text(&r.parameters_json);
    if !params.trim().is_empty() {
        match serde_json::from_str(&params) {
            Ok(serde_json::Value::Object(m)) => req.set_parameters(m)?,
            _ => {
                return Err(CoreError::invalid(
                    "BLS request parameters must be a JSON object",
                ))
            }
        }
    }
    // SAFETY: the ABI guarantees the arrays for the call.
    for t in unsafe { slice(r.inputs, r.input_count) } {
        let name = text(&t.name);
        let dtype = DataType::from_abi(t.dtype).ok_or_else(|| {
            CoreError::invalid(format!("BLS input '{name}' has an unknown data type"))
        })?;
        // SAFETY: as above.
        let shape = unsafe { slice(t.shape, t.ndim) }.to_vec();
        // SAFETY: as above.
        let data = Bytes::copy_from_slice(unsafe { slice(t.data, t.byte_len) });
        req.inputs.push(InputTensor {
            name,
            dtype,
            shape,
            data,
        });
    }
    // SAFETY: as above.
    for o in unsafe { slice(r.requested_outputs, r.requested_output_count) } {
        req.outputs.push(RequestedOutput {
            name: text(o),
            class_count: 0,
            shm: None,
        });
    }
    Ok(req)
}

/// Hands one event to the backend's callback; returns whether it was the last.
///
/// # Safety
/// `on_response` and `user` are the backend's, valid for the whole `infer` call.
unsafe fn deliver(ev: ResponseEvent, on_response: KilnInferCallback, user: *mut c_void) -> bool {
    let last = ev.is_final();
    match ev {
        ResponseEvent::Response { response, .. } => {
            let views: Vec<abi::KilnTensorView> = response
                .outputs
                .iter()
                .map(|t| abi::KilnTensorView::cpu(&t.name, t.dtype as u32, &t.shape, &t.data))
                .collect();
            let params = serde_json::Value::Object(response.parameters.clone()).to_string();
            RESPONSE_PARAMETERS.with(|p| *p.borrow_mut() = params);
            // SAFETY: the views point into `response`, alive for the call.
            in_callback(|| unsafe {
                on_response(user, views.as_ptr(), views.len(), std::ptr::null(), last)
            });
            RESPONSE_PARAMETERS.with(|p| p.borrow_mut().clear());
        }
        ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => {
            let err = crate::host::new_error(&e);
            // SAFETY: the error lives for the call; the host frees it after.
            in_callback(|| unsafe { on_response(user, std::ptr::null(), 0, err, last) });
            drop(crate::host::take_error(err));
        }
        ResponseEvent::Final => {
            // SAFETY: a call with no payload.
            in_callback(|| unsafe {
                on_response(user, std::ptr::null(), 0, std::ptr::null(), true)
            });
        }
    }
    last
}

fn run(
    r: &KilnInferRequest,
    on_response: KilnInferCallback,
    user: *mut c_void,
) -> Result<(), CoreError> {
    let models = MODELS
        .get()
        .and_then(|m| m.lock().unwrap_or_else(|p| p.into_inner()).upgrade())
        .ok_or_else(|| CoreError::unavailable("BLS: the server is not running"))?;
    // SAFETY: the backend passes a request valid for the call.
    let request = unsafe { to_request(r) }?;
    let mv = crate::repository::find(&models, &request.model_name, request.model_version)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    mv.submit(request, ResponseSink::new(tx))?;
    while let Some(ev) = rx.blocking_recv() {
        // SAFETY: the callback and its user pointer are valid for this call.
        let last = unsafe { deliver(ev, on_response, user) };
        if CALLBACK.with(|c| c.replace(Callback::Outside)) == Callback::Cancelled {
            // Closing the channel is what the called model sees as cancellation.
            drop(rx);
            return Ok(());
        }
        if last {
            return Ok(());
        }
    }
    Err(CoreError::internal(
        "BLS: the request ended without a final response",
    ))
}

/// Where this thread is with respect to an `infer` callback.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Callback {
    Outside,
    Inside,
    /// Inside, and the backend called `infer_cancel`.
    Cancelled,
}

/// Runs `f` (a call of the backend's callback) marked as inside it, keeping a cancellation
/// it asks for.
fn in_callback(f: impl FnOnce()) {
    CALLBACK.with(|c| c.set(Callback::Inside));
    f();
    CALLBACK.with(|c| {
        if c.get() == Callback::Inside {
            c.set(Callback::Outside);
        }
    });
}

/// `KilnHostApi::infer_cancel`: marks the request of the callback under way as cancelled.
pub(crate) unsafe extern "C" fn h_infer_cancel() -> *mut KilnError {
    let inside = CALLBACK.with(|c| {
        let inside = c.get() != Callback::Outside;
        if inside {
            c.set(Callback::Cancelled);
        }
        inside
    });
    if inside {
        std::ptr::null_mut()
    } else {
        crate::host::new_error(&CoreError::invalid(
            "infer_cancel: call it from inside an infer callback",
        ))
    }
}

thread_local! {
    /// Whether this thread is inside an `infer` callback, and whether it cancelled.
    static CALLBACK: std::cell::Cell<Callback> = const { std::cell::Cell::new(Callback::Outside) };
    /// The parameters of the response an `infer` callback on this thread delivers.
    static RESPONSE_PARAMETERS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `KilnHostApi::infer_response_parameters`: read from inside a callback; the string lives
/// until the callback returns.
pub(crate) unsafe extern "C" fn h_infer_response_parameters(
    json: *mut abi::KilnStr,
) -> *mut KilnError {
    if json.is_null() {
        return crate::host::new_error(&CoreError::invalid(
            "infer_response_parameters: null out pointer",
        ));
    }
    RESPONSE_PARAMETERS.with(|p| {
        let p = p.borrow();
        let text: &str = if p.is_empty() { "{}" } else { &p };
        // SAFETY: non-null out pointer; the string is only changed after the callback.
        unsafe { *json = abi::KilnStr::from_str(text) };
    });
    std::ptr::null_mut()
}

/// `KilnHostApi::infer`.
pub(crate) unsafe extern "C" fn h_infer(
    request: *const KilnInferRequest,
    on_response: KilnInferCallback,
    user: *mut c_void,
) -> *mut KilnError {
    // SAFETY: the ABI requires a valid request pointer.
    let Some(r) = (unsafe { request.as_ref() }) else {
        return crate::host::new_error(&CoreError::invalid("infer: null request"));
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        return crate::host::new_error(&CoreError::internal(
            "infer must be called from a model instance's thread",
        ));
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(r, on_response, user))) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => crate::host::new_error(&e),
        Err(_) => crate::host::new_error(&CoreError::internal("infer panicked in the host")),
    }
}
