//! Requests, input tensors and responses as safe views over the ABI.
use std::cell::Cell;
use std::ffi::c_void;

use kiln_abi::{self as abi, KilnRequestView, KilnStr, KilnTensorView};

use crate::dtype::{bytes_elements, DataType};
use crate::error::{Error, Result};
use crate::host;

/// A read-only view of one input tensor in host memory.
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DataType,
    /// Full shape (including the batch dimension for batching models).
    pub shape: &'a [i64],
    /// Raw row-major bytes (BYTES: length-prefixed elements).
    pub data: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// Number of elements implied by the shape.
    pub fn element_count(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product()
    }

    /// The elements as `T`, copied (works for any alignment).
    pub fn to_vec<T: bytemuck::Pod>(&self) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        if self.dtype.element_size() != Some(size) || !self.data.len().is_multiple_of(size) {
            return Err(Error::invalid_arg(format!(
                "input '{}' of type {} cannot be read as {}-byte elements",
                self.name, self.dtype, size
            )));
        }
        Ok(self
            .data
            .chunks_exact(size)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    /// The elements of a BYTES tensor.
    pub fn bytes_elements(&self) -> Result<Vec<&'a [u8]>> {
        if self.dtype != DataType::Bytes {
            return Err(Error::invalid_arg(format!(
                "input '{}' is not BYTES",
                self.name
            )));
        }
        bytes_elements(self.data)
            .map(|e| {
                e.ok_or_else(|| {
                    Error::invalid_arg(format!("input '{}': malformed BYTES data", self.name))
                })
            })
            .collect()
    }
}

/// One inference request, borrowed for the duration of `execute` (see [`Request::keep`]
/// to answer it later).
pub struct Request<'a> {
    view: &'a KilnRequestView,
    /// Whether a final response was sent through this SDK.
    pub(crate) finished: Cell<bool>,
    /// Whether [`Request::keep`] took it over (the SDK then leaves it alone after
    /// `execute`).
    pub(crate) kept: Cell<bool>,
}

/// A request kept past `execute` ([`Request::keep`]): a decoupled model answers it from
/// its own thread while the instance runs other batches (Triton's response factory).
/// Dropping it releases the request; one released without a final response gets an error
/// response.
pub struct OwnedRequest {
    /// Borrows `view`, which lives until this value is dropped.
    request: Request<'static>,
    /// A copy of the host's view (`Box::into_raw`), freed in Drop.
    view: std::ptr::NonNull<KilnRequestView>,
}

// SAFETY: the view's pointers are to host memory that stays valid and unchanged until the
// request is released (by this value's Drop, once), and the host functions the request
// calls may be called from any thread.
unsafe impl Send for OwnedRequest {}

impl OwnedRequest {
    /// The request, to read inputs and send responses.
    pub fn request(&self) -> &Request<'_> {
        &self.request
    }
}

impl Drop for OwnedRequest {
    fn drop(&mut self) {
        if let Ok(h) = host::get() {
            // SAFETY: the request is released exactly once, here.
            let _ = unsafe {
                (h.request_release)(self.request.handle(), abi::KILN_REQUEST_RELEASE_ALL)
            };
        }
        // SAFETY: made by Box::into_raw in `keep` and freed only here; `request` is not
        // used after this.
        drop(unsafe { Box::from_raw(self.view.as_ptr()) });
    }
}

// SAFETY helper: borrow a KilnStr that the host keeps alive while the request is held.
fn s<'a>(k: &KilnStr) -> &'a str {
    // SAFETY: host strings in request views are UTF-8 and live until release.
    std::str::from_utf8(unsafe { k.as_bytes() }).unwrap_or("")
}

impl<'a> Request<'a> {
    pub(crate) fn new(view: &'a KilnRequestView) -> Self {
        Request {
            view,
            finished: Cell::new(false),
            kept: Cell::new(false),
        }
    }

    /// Takes the request over past `execute`: the SDK neither answers nor releases it when
    /// `execute` returns, and the returned value (which may move to another thread) keeps
    /// it until dropped. Fails if it was already kept.
    pub fn keep(&self) -> Result<OwnedRequest> {
        if self.kept.replace(true) {
            return Err(Error::internal("the request was already kept"));
        }
        let view = std::ptr::NonNull::from(Box::leak(Box::new(*self.view)));
        // SAFETY: the copy lives until the returned value's Drop frees it, and nothing else
        // refers to it.
        let request = Request::new(unsafe { view.as_ref() });
        request.finished.set(self.finished.get());
        Ok(OwnedRequest { request, view })
    }

    pub(crate) fn handle(&self) -> *mut abi::KilnRequest {
        self.view.handle
    }

    /// The client's request id (may be empty).
    pub fn id(&self) -> &'a str {
        s(&self.view.id)
    }

    /// Correlation id (sequence models).
    pub fn correlation_id(&self) -> u64 {
        self.view.correlation_id
    }

    /// The correlation id as the client gave it, when it was a string (Triton's string
    /// sequence ids; [`Request::correlation_id`] then holds a number standing for it).
    pub fn correlation_id_text(&self) -> Option<&'a str> {
        let h = host::get().ok()?;
        if (h.header.struct_size as usize)
            <= std::mem::offset_of!(abi::KilnHostApi, request_correlation_id_text)
        {
            return None;
        }
        let mut text = KilnStr::from_str("");
        // SAFETY: valid handle while the request is held; the host writes a string that
        // lives until the request is released.
        host::check(unsafe { (h.request_correlation_id_text)(self.view.handle, &mut text) })
            .ok()?;
        Some(s(&text)).filter(|t| !t.is_empty())
    }

    /// Sequence flags: 1 = START, 2 = END (sequence models).
    pub fn flags(&self) -> u32 {
        self.view.flags
    }

    /// The timeout the client gave the request, in microseconds (0: none).
    pub fn timeout_us(&self) -> u64 {
        self.view.timeout_us
    }

    /// Batch size of this request (1 for models without batching).
    pub fn batch_size(&self) -> u64 {
        self.view.batch_size
    }

    /// Request parameters as a JSON object.
    pub fn parameters_json(&self) -> &'a str {
        s(&self.view.parameters_json)
    }

    fn input_views(&self) -> &'a [KilnTensorView] {
        if self.view.input_count == 0 {
            return &[];
        }
        // SAFETY: the host guarantees `inputs` points to `input_count` views.
        unsafe { std::slice::from_raw_parts(self.view.inputs, self.view.input_count) }
    }

    /// All inputs present in the request.
    pub fn inputs(&self) -> impl Iterator<Item = Tensor<'a>> + '_ {
        self.input_views().iter().filter_map(tensor_from_view)
    }

    /// The input named `name`, if present.
    pub fn input(&self, name: &str) -> Option<Tensor<'a>> {
        self.inputs().find(|t| t.name == name)
    }

    /// The input named `name`, or an INVALID_ARG error naming it.
    pub fn require_input(&self, name: &str) -> Result<Tensor<'a>> {
        self.input(name)
            .ok_or_else(|| Error::invalid_arg(format!("missing required input '{name}'")))
    }

    /// Names of the outputs the client asked for.
    pub fn requested_outputs(&self) -> Vec<&'a str> {
        if self.view.requested_output_count == 0 {
            return Vec::new();
        }
        // SAFETY: host guarantees the array.
        let names = unsafe {
            std::slice::from_raw_parts(
                self.view.requested_outputs,
                self.view.requested_output_count,
            )
        };
        names.iter().map(s).collect()
    }

    /// Whether the client asked for output `name`.
    pub fn wants(&self, name: &str) -> bool {
        self.requested_outputs().contains(&name)
    }

    /// Whether the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        let Ok(h) = host::get() else { return false };
        let mut c = false;
        // SAFETY: valid handle while the request is held.
        let r = host::check(unsafe { (h.request_is_cancelled)(self.view.handle, &mut c) });
        r.is_ok() && c
    }

    /// Ends a decoupled request without another response: the client receives only the
    /// final flag (gRPC streams send an empty response when the client asked for one).
    pub fn complete(&self) -> Result<()> {
        let h = host::get()?;
        self.finished.set(true);
        // SAFETY: valid handle while the request is held.
        host::check(unsafe {
            (h.request_send_flags)(self.view.handle, abi::KILN_RESPONSE_FLAG_FINAL)
        })
    }

    /// Starts a response for this request.
    pub fn response(&self) -> Result<Response<'_>> {
        let h = host::get()?;
        let mut resp = std::ptr::null_mut();
        // SAFETY: valid handle; the host writes the new response handle.
        host::check(unsafe { (h.response_new)(self.view.handle, &mut resp) })?;
        Ok(Response {
            handle: resp,
            request: Some(self),
        })
    }

    /// Concatenates input `name` of several requests along the batch dimension.
    /// Returns the joined bytes and the joined shape. Fails if the non-batch dimensions
    /// or types differ.
    pub fn gather(requests: &[Request<'_>], name: &str) -> Result<(DataType, Vec<i64>, Vec<u8>)> {
        let tensors = requests
            .iter()
            .map(|r| r.require_input(name))
            .collect::<Result<Vec<_>>>()?;
        concat_batch(name, &tensors)
    }
}

/// Concatenates tensors along the batch (first) dimension: the joined type, shape and
/// bytes. Fails if the types or the non-batch dimensions differ.
pub fn concat_batch(name: &str, tensors: &[Tensor<'_>]) -> Result<(DataType, Vec<i64>, Vec<u8>)> {
    let first = tensors
        .first()
        .ok_or_else(|| Error::invalid_arg("empty batch"))?;
    let mut shape = first.shape.to_vec();
    if shape.is_empty() {
        return Err(Error::invalid_arg(format!(
            "input '{name}' has no batch dimension"
        )));
    }
    let mut out = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum());
    out.extend_from_slice(first.data);
    for t in &tensors[1..] {
        if t.dtype != first.dtype || t.shape.len() != shape.len() || t.shape[1..] != shape[1..] {
            return Err(Error::invalid_arg(format!(
                "input '{name}' has different shapes or types across the batch"
            )));
        }
        shape[0] += t.shape[0];
        out.extend_from_slice(t.data);
    }
    Ok((first.dtype, shape, out))
}

/// Rows `first_row..first_row + rows` of a batched buffer with `row_bytes` per row.
pub fn batch_rows(
    batched: &[u8],
    first_row: usize,
    rows: usize,
    row_bytes: usize,
) -> Option<&[u8]> {
    batched.get(
        first_row.checked_mul(row_bytes)?..(first_row.checked_add(rows)?).checked_mul(row_bytes)?,
    )
}

fn tensor_from_view<'a>(v: &'a KilnTensorView) -> Option<Tensor<'a>> {
    let dtype = DataType::from_abi(v.dtype)?;
    // SAFETY: the host guarantees shape/data point to ndim / byte_len valid items.
    let shape = if v.ndim == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(v.shape, v.ndim) }
    };
    let data = if v.byte_len == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(v.data, v.byte_len) }
    };
    Some(Tensor {
        name: s(&v.name),
        dtype,
        shape,
        data,
    })
}

/// The value of a response parameter ([`Response::set_parameter`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Parameter<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
}

/// A response being built; outputs are written straight into the host's send buffers.
pub struct Response<'r> {
    handle: *mut abi::KilnResponse,
    request: Option<&'r Request<'r>>,
}

impl Response<'_> {
    /// Allocates output `name` of `byte_len` bytes and returns the buffer to fill.
    pub fn output(
        &mut self,
        name: &str,
        dtype: DataType,
        shape: &[i64],
        byte_len: usize,
    ) -> Result<&mut [u8]> {
        let h = host::get()?;
        let mut buf = std::ptr::null_mut();
        let mut kind = abi::KILN_MEMORY_CPU;
        // SAFETY: valid response handle; name/shape borrowed for the call.
        host::check(unsafe {
            (h.output_alloc)(
                self.handle,
                KilnStr::from_str(name),
                dtype as u32,
                shape.as_ptr(),
                shape.len(),
                byte_len,
                abi::KILN_MEMORY_CPU,
                &mut buf,
                &mut kind,
            )
        })?;
        if byte_len == 0 {
            return Ok(&mut []);
        }
        if buf.is_null() || kind != abi::KILN_MEMORY_CPU {
            return Err(Error::internal("host returned no CPU buffer for output"));
        }
        // SAFETY: the host allocated `byte_len` writable bytes that live until send.
        Ok(unsafe { std::slice::from_raw_parts_mut(buf, byte_len) })
    }

    /// Allocates and fills output `name` with a copy of `data`.
    pub fn output_from<T: bytemuck::Pod>(
        &mut self,
        name: &str,
        dtype: DataType,
        shape: &[i64],
        data: &[T],
    ) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.output(name, dtype, shape, bytes.len())?
            .copy_from_slice(bytes);
        Ok(())
    }

    /// Allocates and fills a BYTES output from its elements.
    pub fn output_bytes<E: AsRef<[u8]>>(
        &mut self,
        name: &str,
        shape: &[i64],
        elements: &[E],
    ) -> Result<()> {
        let total: usize = elements.iter().map(|e| 4 + e.as_ref().len()).sum();
        let buf = self.output(name, DataType::Bytes, shape, total)?;
        let mut at = 0;
        for e in elements {
            let e = e.as_ref();
            buf[at..at + 4].copy_from_slice(&(e.len() as u32).to_le_bytes());
            buf[at + 4..at + 4 + e.len()].copy_from_slice(e);
            at += 4 + e.len();
        }
        Ok(())
    }

    /// Copies this request's slice of a batched output (`rows` starting at `first_row`,
    /// with `row_bytes` per batch item) into output `name`.
    #[allow(clippy::too_many_arguments)]
    pub fn scatter_from(
        &mut self,
        name: &str,
        dtype: DataType,
        item_shape: &[i64],
        batched: &[u8],
        first_row: usize,
        rows: usize,
        row_bytes: usize,
    ) -> Result<()> {
        let mut shape = Vec::with_capacity(item_shape.len() + 1);
        shape.push(rows as i64);
        shape.extend_from_slice(item_shape);
        let src = batch_rows(batched, first_row, rows, row_bytes)
            .ok_or_else(|| Error::internal(format!("batched output '{name}' is too short")))?;
        self.output(name, dtype, &shape, src.len())?
            .copy_from_slice(src);
        Ok(())
    }

    /// Attaches a parameter to the response (Triton's response parameters; clients read
    /// them beside the outputs). Setting `name` again replaces its value.
    pub fn set_parameter(&mut self, name: &str, value: Parameter<'_>) -> Result<()> {
        let h = host::get()?;
        if (h.header.struct_size as usize)
            <= std::mem::offset_of!(abi::KilnHostApi, response_set_parameter)
        {
            return Err(Error::unsupported(
                "this server's host API predates response parameters (ABI 1.4)",
            ));
        }
        let text;
        let (kind, ptr): (u32, *const c_void) = match &value {
            Parameter::Bool(b) => (abi::KILN_PARAMETER_BOOL, (b as *const bool).cast()),
            Parameter::Int(i) => (abi::KILN_PARAMETER_INT, (i as *const i64).cast()),
            Parameter::Double(d) => (abi::KILN_PARAMETER_DOUBLE, (d as *const f64).cast()),
            Parameter::Str(v) => {
                text = KilnStr::from_str(v);
                (abi::KILN_PARAMETER_STRING, (&text as *const KilnStr).cast())
            }
        };
        // SAFETY: live response handle; `ptr` points to the value `kind` names, borrowed
        // for the call.
        host::check(unsafe {
            (h.response_set_parameter)(self.handle, KilnStr::from_str(name), kind, ptr)
        })
    }

    /// Sends the response as the request's final one.
    pub fn send(mut self) -> Result<()> {
        self.finish(std::ptr::null_mut())
    }

    /// Sends the response and keeps the request open for more (decoupled models,
    /// `model_transaction_policy { decoupled: true }`). End the request with
    /// [`Request::complete`] or a final [`Response::send`].
    pub fn send_partial(mut self) -> Result<()> {
        let h = host::get()?;
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        // SAFETY: the handle is live and passed to the host exactly once.
        host::check(unsafe { (h.response_send)(handle, 0, std::ptr::null_mut()) })
    }

    /// Sends an error as the request's final response.
    pub fn send_error(mut self, e: Error) -> Result<()> {
        let err = host::to_abi_error(&e);
        self.finish(err)
    }

    /// Sends an error response and keeps the request open (decoupled models only, as in
    /// Triton: the client gets the error on its stream and later responses still
    /// follow). For a model that is not decoupled the error ends the request.
    pub fn send_error_partial(mut self, e: Error) -> Result<()> {
        let h = host::get()?;
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        // SAFETY: the handle is live and passed to the host exactly once, as is the error.
        host::check(unsafe { (h.response_send)(handle, 0, host::to_abi_error(&e)) })
    }

    fn finish(&mut self, err: *mut abi::KilnError) -> Result<()> {
        let h = host::get()?;
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        if let Some(r) = self.request {
            r.finished.set(true);
        }
        // SAFETY: the handle is live and passed to the host exactly once.
        host::check(unsafe { (h.response_send)(handle, abi::KILN_RESPONSE_FLAG_FINAL, err) })
    }
}

impl Drop for Response<'_> {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            let _ = self.finish(host::to_abi_error(&Error::internal(
                "backend dropped a response without sending it",
            )));
        }
    }
}
