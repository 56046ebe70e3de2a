//! Requests to other models of the same server from inside `execute` (Triton's BLS,
//! "business logic scripting"), through the host's `infer` (ABI 1.3).
use std::ffi::c_void;

use kiln_abi::{self as abi, KilnInferRequest, KilnStr, KilnTensorView};

use crate::dtype::DataType;
use crate::error::{Error, ErrorCode, Result};
use crate::host;
use crate::request::Tensor;

/// A request to another model.
#[derive(Debug, Clone, Copy)]
pub struct InferCall<'a> {
    /// Target model.
    pub model: &'a str,
    /// Version; `None` for the one its version policy picks.
    pub version: Option<i64>,
    /// Request id (may be empty).
    pub id: &'a str,
    /// Request parameters as a JSON object (empty for none).
    pub parameters_json: &'a str,
    /// Inputs (full shapes, batch dimension included for batching models).
    pub inputs: &'a [Tensor<'a>],
    /// Outputs wanted; empty for every output.
    pub requested_outputs: &'a [&'a str],
    /// Sequence id (sequence models).
    pub correlation_id: u64,
    /// Sequence flags: 1 = START, 2 = END.
    pub flags: u32,
    /// Queue timeout in microseconds (0 = none).
    pub timeout_us: u64,
}

impl<'a> InferCall<'a> {
    /// A request to `model` with `inputs`, asking for every output.
    pub fn new(model: &'a str, inputs: &'a [Tensor<'a>]) -> Self {
        InferCall {
            model,
            version: None,
            id: "",
            parameters_json: "",
            inputs,
            requested_outputs: &[],
            correlation_id: 0,
            flags: 0,
            timeout_us: 0,
        }
    }
}

/// An output tensor of another model's response, copied out of the host's buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Shape.
    pub shape: Vec<i64>,
    /// Row-major bytes (BYTES: length-prefixed elements).
    pub data: Vec<u8>,
}

/// What a BLS request receives: a response's outputs, an error, or (for a decoupled
/// model) the final flag alone.
#[derive(Debug)]
pub enum BlsEvent {
    /// One response: its outputs, and its parameters as a JSON object (`{}` for none,
    /// also from a server older than ABI 1.4).
    Response {
        outputs: Vec<OwnedTensor>,
        parameters_json: String,
    },
    /// The request failed (always the last event).
    Error(Error),
    /// No more responses, without one.
    Final,
}

type Handler<'f> = &'f mut dyn FnMut(BlsEvent, bool);

/// The parameters of the response being delivered (inside the host's callback).
fn response_parameters() -> String {
    let Ok(h) = host::get() else {
        return "{}".into();
    };
    if (h.header.struct_size as usize)
        <= std::mem::offset_of!(abi::KilnHostApi, infer_response_parameters)
    {
        return "{}".into();
    }
    let mut json = KilnStr::from_str("");
    // SAFETY: called inside the callback; the host's string lives until it returns.
    match host::check(unsafe { (h.infer_response_parameters)(&mut json) }) {
        // SAFETY: the host wrote a string valid until the callback returns.
        Ok(()) => String::from_utf8_lossy(unsafe { json.as_bytes() }).into_owned(),
        Err(_) => "{}".into(),
    }
}

unsafe extern "C" fn on_response(
    user: *mut c_void,
    outputs: *const KilnTensorView,
    count: usize,
    error: *const abi::KilnError,
    last: bool,
) {
    let event = if !error.is_null() {
        match host::get() {
            // SAFETY: the host's error is valid for the call; it is read, not freed.
            Ok(h) => unsafe {
                BlsEvent::Error(Error::new(
                    ErrorCode::from_abi((h.error_code)(error)),
                    String::from_utf8_lossy((h.error_message)(error).as_bytes()).into_owned(),
                ))
            },
            Err(e) => BlsEvent::Error(e),
        }
    } else if outputs.is_null() {
        BlsEvent::Final
    } else {
        // SAFETY: the host passes `count` views valid for the call.
        let views = unsafe { abi::raw_slice(outputs, count) };
        BlsEvent::Response {
            parameters_json: response_parameters(),
            outputs: views
                .iter()
                .map(|v| {
                    // SAFETY: each view's pointers are valid for the call.
                    unsafe {
                        OwnedTensor {
                            name: String::from_utf8_lossy(v.name.as_bytes()).into_owned(),
                            dtype: DataType::from_abi(v.dtype).unwrap_or(DataType::Bytes),
                            shape: abi::raw_slice(v.shape, v.ndim).to_vec(),
                            data: abi::raw_slice(v.data, v.byte_len).to_vec(),
                        }
                    }
                })
                .collect(),
        }
    };
    // SAFETY: `user` is the `Handler` that `infer` passed, alive for the whole call.
    let handler = unsafe { &mut *(user as *mut Handler<'_>) };
    // A panic must not unwind into the host: it is caught and dropped here, and the
    // handler sees no more events of this response.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(event, last)));
}

/// From inside an [`infer`] handler: cancels the request it handles (Triton's
/// `ResponseIterator.cancel()`). The called model sees the request cancelled, the handler
/// gets no further events, and `infer` returns once the handler does. Needs a server with
/// ABI 1.5.
pub fn cancel_infer() -> Result<()> {
    let h = host::get()?;
    if (h.header.struct_size as usize) <= std::mem::offset_of!(abi::KilnHostApi, infer_cancel) {
        return Err(Error::unsupported(
            "this server's host API predates cancelling BLS requests (ABI 1.5)",
        ));
    }
    // SAFETY: a host function without arguments; it checks where it is called from.
    host::check(unsafe { (h.infer_cancel)() })
}

/// Runs `call` on its model and blocks until it is done, handing `handler` each event and
/// whether it is the last. Call it from `execute` (an instance's thread). Fails without
/// calling `handler` when the request could not start (unknown model, bad input, ...).
pub fn infer(call: &InferCall<'_>, mut handler: impl FnMut(BlsEvent, bool)) -> Result<()> {
    let h = host::get()?;
    if (h.header.struct_size as usize) <= abi::KILN_HOST_API_SIZE_1_2 {
        return Err(Error::unsupported(
            "this server's host API predates BLS (ABI 1.3)",
        ));
    }
    let views: Vec<KilnTensorView> = call
        .inputs
        .iter()
        .map(|t| KilnTensorView::cpu(t.name, t.dtype as u32, t.shape, t.data))
        .collect();
    let outputs: Vec<KilnStr> = call
        .requested_outputs
        .iter()
        .map(|n| KilnStr::from_str(n))
        .collect();
    let request = KilnInferRequest {
        model: KilnStr::from_str(call.model),
        version: call.version.unwrap_or(-1),
        id: KilnStr::from_str(call.id),
        parameters_json: KilnStr::from_str(call.parameters_json),
        inputs: views.as_ptr(),
        input_count: views.len(),
        requested_outputs: outputs.as_ptr(),
        requested_output_count: outputs.len(),
        correlation_id: call.correlation_id,
        flags: call.flags,
        reserved: 0,
        timeout_us: call.timeout_us,
    };
    let mut dyn_handler: Handler<'_> = &mut handler;
    // SAFETY: the request and everything it points to, and the handler, outlive the call.
    host::check(unsafe {
        (h.infer)(
            &request,
            on_response,
            &mut dyn_handler as *mut Handler<'_> as *mut c_void,
        )
    })
}

/// [`infer`], collecting every event.
pub fn infer_all(call: &InferCall<'_>) -> Result<Vec<BlsEvent>> {
    let mut events = Vec::new();
    infer(call, |e, _| events.push(e))?;
    Ok(events)
}
