//! The stable C ABI between the Kiln core and backend libraries.
//!
//! This crate holds only `#[repr(C)]` types and constants; `include/kiln_backend.h` is
//! the same contract for C and C++ backends. Every struct size and field offset is
//! asserted here and, with `_Static_assert`, in the header, so the two cannot drift.
//!
//! A backend library exports one symbol, [`ENTRY_SYMBOL`] (`kiln_backend_entry`), returning
//! a `&'static` [`KilnBackendApi`]. The loader reads its [`KilnApiHeader`] first and refuses
//! a wrong magic, another major version, or a newer minor version than the host's.
//! Functions are only ever appended to the tables, as nullable pointers found through
//! the peer's `struct_size`.
#![no_std]
#![allow(non_camel_case_types)]

use core::ffi::c_void;
use core::mem::{offset_of, size_of};

/// `"KILNABI\0"` as a little-endian u64: identifies a Kiln function table.
pub const KILN_ABI_MAGIC: u64 = u64::from_le_bytes(*b"KILNABI\0");
/// Incompatible changes bump the major version.
pub const KILN_ABI_MAJOR: u32 = 1;
/// Appended functions bump the minor version.
pub const KILN_ABI_MINOR: u32 = 5;
/// The one symbol a backend library exports.
pub const ENTRY_SYMBOL: &[u8] = b"kiln_backend_entry\0";

/// Data types, numbered as `TRITONSERVER_DataType` and the config's `TYPE_*`.
pub type KilnDataType = u32;
pub const KILN_TYPE_INVALID: KilnDataType = 0;
pub const KILN_TYPE_BOOL: KilnDataType = 1;
pub const KILN_TYPE_UINT8: KilnDataType = 2;
pub const KILN_TYPE_UINT16: KilnDataType = 3;
pub const KILN_TYPE_UINT32: KilnDataType = 4;
pub const KILN_TYPE_UINT64: KilnDataType = 5;
pub const KILN_TYPE_INT8: KilnDataType = 6;
pub const KILN_TYPE_INT16: KilnDataType = 7;
pub const KILN_TYPE_INT32: KilnDataType = 8;
pub const KILN_TYPE_INT64: KilnDataType = 9;
pub const KILN_TYPE_FP16: KilnDataType = 10;
pub const KILN_TYPE_FP32: KilnDataType = 11;
pub const KILN_TYPE_FP64: KilnDataType = 12;
/// BYTES elements are a 4-byte little-endian length followed by the bytes.
pub const KILN_TYPE_BYTES: KilnDataType = 13;
pub const KILN_TYPE_BF16: KilnDataType = 14;

/// Where a buffer lives.
pub type KilnMemoryKind = u32;
pub const KILN_MEMORY_CPU: KilnMemoryKind = 0;
pub const KILN_MEMORY_CPU_PINNED: KilnMemoryKind = 1;
pub const KILN_MEMORY_GPU: KilnMemoryKind = 2;

/// Error codes, numbered as `TRITONSERVER_Error_Code`.
pub type KilnErrorCode = u32;
pub const KILN_ERROR_UNKNOWN: KilnErrorCode = 0;
pub const KILN_ERROR_INTERNAL: KilnErrorCode = 1;
pub const KILN_ERROR_NOT_FOUND: KilnErrorCode = 2;
pub const KILN_ERROR_INVALID_ARG: KilnErrorCode = 3;
pub const KILN_ERROR_UNAVAILABLE: KilnErrorCode = 4;
pub const KILN_ERROR_UNSUPPORTED: KilnErrorCode = 5;
pub const KILN_ERROR_ALREADY_EXISTS: KilnErrorCode = 6;
pub const KILN_ERROR_CANCELLED: KilnErrorCode = 7;

/// Log levels for [`KilnHostApi::log`].
pub type KilnLogLevel = u32;
pub const KILN_LOG_ERROR: KilnLogLevel = 0;
pub const KILN_LOG_WARN: KilnLogLevel = 1;
pub const KILN_LOG_INFO: KilnLogLevel = 2;
pub const KILN_LOG_VERBOSE: KilnLogLevel = 3;

/// Instance kinds, numbered as `TRITONSERVER_InstanceGroupKind`.
pub type KilnInstanceKind = u32;
pub const KILN_INSTANCE_AUTO: KilnInstanceKind = 0;
pub const KILN_INSTANCE_CPU: KilnInstanceKind = 1;
pub const KILN_INSTANCE_GPU: KilnInstanceKind = 2;
pub const KILN_INSTANCE_MODEL: KilnInstanceKind = 3;

/// Request flags (sequence batching).
pub const KILN_REQUEST_FLAG_SEQUENCE_START: u32 = 1;
pub const KILN_REQUEST_FLAG_SEQUENCE_END: u32 = 2;
/// Response flag: this is the last response for the request.
pub const KILN_RESPONSE_FLAG_FINAL: u32 = 1;
/// Release flag: the backend is done with the request.
pub const KILN_REQUEST_RELEASE_ALL: u32 = 1;

/// Kinds of a response parameter's value ([`KilnHostApi::response_set_parameter`]), as
/// `TRITONSERVER_ParameterType` has them: `value` points to a `bool`, an `i64`, an `f64` or
/// a [`KilnStr`].
pub const KILN_PARAMETER_BOOL: u32 = 0;
pub const KILN_PARAMETER_INT: u32 = 1;
pub const KILN_PARAMETER_DOUBLE: u32 = 2;
pub const KILN_PARAMETER_STRING: u32 = 3;

/// Operations of [`KilnHostApi::model_control`].
pub const KILN_MODEL_LOAD: u32 = 0;
pub const KILN_MODEL_UNLOAD: u32 = 1;
pub const KILN_MODEL_READY: u32 = 2;
/// Unload, and the models it runs that no other loaded model runs (Triton's
/// `unload_dependents`).
pub const KILN_MODEL_UNLOAD_DEPENDENTS: u32 = 3;

/// Opaque host-owned error. Null means success.
#[repr(C)]
pub struct KilnError {
    _private: [u8; 0],
}
/// Opaque host-owned request handle.
#[repr(C)]
pub struct KilnRequest {
    _private: [u8; 0],
}
/// Opaque host-owned response handle.
#[repr(C)]
pub struct KilnResponse {
    _private: [u8; 0],
}
/// Opaque host-owned instance handle (for statistics reporting).
#[repr(C)]
pub struct KilnInstance {
    _private: [u8; 0],
}

/// A borrowed UTF-8 (or raw) byte string; valid for the duration stated by its owner.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl KilnStr {
    /// An empty string.
    pub const EMPTY: KilnStr = KilnStr {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// Borrows a Rust byte slice.
    pub const fn from_bytes(b: &[u8]) -> KilnStr {
        KilnStr {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    /// Borrows a Rust string.
    pub const fn from_str(s: &str) -> KilnStr {
        Self::from_bytes(s.as_bytes())
    }

    /// Views the bytes.
    ///
    /// # Safety
    /// `ptr` must be valid for `len` bytes (or `len` must be 0) for the chosen lifetime.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// The frozen first member of both function tables.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnApiHeader {
    /// Must equal [`KILN_ABI_MAGIC`].
    pub magic: u64,
    /// `sizeof` the whole table, so a peer knows which appended fields exist.
    pub struct_size: u64,
    pub abi_major: u32,
    pub abi_minor: u32,
}

impl KilnApiHeader {
    /// The header for a table of type `T` built against this crate.
    pub const fn for_table<T>() -> KilnApiHeader {
        KilnApiHeader {
            magic: KILN_ABI_MAGIC,
            struct_size: size_of::<T>() as u64,
            abi_major: KILN_ABI_MAJOR,
            abi_minor: KILN_ABI_MINOR,
        }
    }
}

/// One input tensor: a view into host memory, never a copy.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnTensorView {
    pub name: KilnStr,
    pub dtype: KilnDataType,
    pub memory_kind: KilnMemoryKind,
    pub device_id: i64,
    pub shape: *const i64,
    pub ndim: usize,
    pub data: *const u8,
    pub byte_len: usize,
}

/// The slice an ABI pointer and count describe; empty for a null pointer or a zero count.
///
/// # Safety
/// A non-null `ptr` must point to `n` valid elements for the lifetime chosen.
pub unsafe fn raw_slice<'a, T>(ptr: *const T, n: usize) -> &'a [T] {
    if ptr.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { core::slice::from_raw_parts(ptr, n) }
    }
}

impl KilnTensorView {
    /// A view of a tensor in CPU memory; it borrows `name`, `shape` and `data`, which must
    /// outlive every use of the view.
    pub fn cpu(name: &str, dtype: KilnDataType, shape: &[i64], data: &[u8]) -> KilnTensorView {
        KilnTensorView {
            name: KilnStr::from_str(name),
            dtype,
            memory_kind: KILN_MEMORY_CPU,
            device_id: 0,
            shape: shape.as_ptr(),
            ndim: shape.len(),
            data: data.as_ptr(),
            byte_len: data.len(),
        }
    }
}

/// One request handed to `instance_execute`.
///
/// Everything it points to stays valid until the backend releases the request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnRequestView {
    pub handle: *mut KilnRequest,
    pub id: KilnStr,
    pub correlation_id: u64,
    pub flags: u32,
    pub reserved: u32,
    pub timeout_us: u64,
    /// Request parameters as a JSON object (`{}` when none).
    pub parameters_json: KilnStr,
    pub inputs: *const KilnTensorView,
    pub input_count: usize,
    /// Names of the outputs the client asked for (all outputs when the client named none).
    pub requested_outputs: *const KilnStr,
    pub requested_output_count: usize,
    /// Batch size of this request (first dimension; 1 for models without batching).
    pub batch_size: u64,
}

/// What `model_init` learns about the model.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnModelInfo {
    pub name: KilnStr,
    pub version: i64,
    /// The model's directory in the repository (`<repo>/<model>`).
    pub repository_path: KilnStr,
    /// The complete model configuration in Triton's JSON form.
    pub config_json: KilnStr,
}

/// What `instance_init` learns about the instance.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnInstanceInfo {
    pub name: KilnStr,
    pub kind: KilnInstanceKind,
    pub device_id: i32,
    pub index: u32,
    pub reserved: u32,
    /// Token to pass to [`KilnHostApi::report_compute`].
    pub host_instance: *mut KilnInstance,
}

/// Functions the host gives the backend at `backend_init`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnHostApi {
    pub header: KilnApiHeader,
    pub error_new: unsafe extern "C" fn(code: KilnErrorCode, message: KilnStr) -> *mut KilnError,
    pub error_delete: unsafe extern "C" fn(error: *mut KilnError),
    pub error_code: unsafe extern "C" fn(error: *const KilnError) -> KilnErrorCode,
    /// The message, valid until the error is deleted.
    pub error_message: unsafe extern "C" fn(error: *const KilnError) -> KilnStr,
    pub log: unsafe extern "C" fn(level: KilnLogLevel, message: KilnStr),
    /// Monotonic nanoseconds, on the same clock the host uses for statistics.
    pub clock_ns: unsafe extern "C" fn() -> u64,
    pub response_new: unsafe extern "C" fn(
        request: *mut KilnRequest,
        response: *mut *mut KilnResponse,
    ) -> *mut KilnError,
    /// Allocates an output in the buffer the front end will send; writes its address.
    pub output_alloc: unsafe extern "C" fn(
        response: *mut KilnResponse,
        name: KilnStr,
        dtype: KilnDataType,
        shape: *const i64,
        ndim: usize,
        byte_len: usize,
        preferred_memory: KilnMemoryKind,
        buffer: *mut *mut u8,
        memory_kind: *mut KilnMemoryKind,
    ) -> *mut KilnError,
    /// Sends the response (ownership passes to the host, also on error). `error`, when not
    /// null, is also taken by the host and fails the response.
    pub response_send: unsafe extern "C" fn(
        response: *mut KilnResponse,
        flags: u32,
        error: *mut KilnError,
    ) -> *mut KilnError,
    /// Sends only flags (e.g. FINAL without payload, for decoupled models).
    pub request_send_flags:
        unsafe extern "C" fn(request: *mut KilnRequest, flags: u32) -> *mut KilnError,
    pub request_is_cancelled:
        unsafe extern "C" fn(request: *mut KilnRequest, cancelled: *mut bool) -> *mut KilnError,
    pub request_release:
        unsafe extern "C" fn(request: *mut KilnRequest, flags: u32) -> *mut KilnError,
    /// Reports when the compute of the batch under execution started and ended.
    pub report_compute: unsafe extern "C" fn(
        instance: *mut KilnInstance,
        compute_start_ns: u64,
        compute_end_ns: u64,
    ) -> *mut KilnError,
    /// ABI 1.3: runs a request on a model of this server (Triton's BLS) and blocks until it
    /// is done, calling `on_response` for each response (several for a decoupled model)
    /// with its outputs or an error, and `last` set on the final call (which may carry
    /// neither). The views given to `on_response` live for that call only. Call it from an
    /// instance's own thread (`instance_execute`), never from the host's async threads.
    pub infer: unsafe extern "C" fn(
        request: *const KilnInferRequest,
        on_response: KilnInferCallback,
        user: *mut c_void,
    ) -> *mut KilnError,
    /// ABI 1.3: updates or reads a custom metric, served on the metrics port beside Triton's
    /// own (Triton's custom metrics API). The family is created on first use; `value`
    /// receives the series' value after the operation (a histogram's sum).
    pub metric: unsafe extern "C" fn(op: *const KilnMetricOp, value: *mut f64) -> *mut KilnError,
    /// ABI 1.4: attaches a parameter to a response before it is sent (Triton's response
    /// parameters, returned to the client beside the outputs). `kind` is one of the
    /// `KILN_PARAMETER_*` constants; setting a name again replaces its value.
    pub response_set_parameter: unsafe extern "C" fn(
        response: *mut KilnResponse,
        name: KilnStr,
        kind: u32,
        value: *const c_void,
    ) -> *mut KilnError,
    /// ABI 1.4: Triton's model management for backends (the python backend's
    /// `pb_utils.load_model`, `unload_model`, `is_model_ready`). `KILN_MODEL_LOAD` loads or
    /// reloads `name` (with `config_json`, when not empty, replacing its configuration);
    /// `KILN_MODEL_UNLOAD` unloads it (`KILN_MODEL_UNLOAD_DEPENDENTS`: with the models it
    /// runs); both need explicit model control and block until done. `KILN_MODEL_READY` writes to `ready` whether `version` (-1: any) is ready.
    /// Call it from an instance's thread, never from the host's async threads.
    pub model_control: unsafe extern "C" fn(
        op: u32,
        name: KilnStr,
        version: i64,
        config_json: KilnStr,
        ready: *mut bool,
    ) -> *mut KilnError,
    /// ABI 1.4: the correlation id the client gave as a string (Triton's string sequence
    /// ids; `KilnRequestView::correlation_id` then holds a number standing for it), or an
    /// empty string for a numeric one. Valid until the request is released.
    pub request_correlation_id_text:
        unsafe extern "C" fn(request: *mut KilnRequest, text: *mut KilnStr) -> *mut KilnError,
    /// ABI 1.4: called from inside a [`KilnInferCallback`], the parameters of the response
    /// that call delivers, as a JSON object (`{}` for none; valid for the callback).
    pub infer_response_parameters: unsafe extern "C" fn(json: *mut KilnStr) -> *mut KilnError,
    /// ABI 1.5: called from inside a [`KilnInferCallback`], cancels the request that call
    /// delivers for (Triton's `ResponseIterator.cancel()`): the called model sees it
    /// cancelled, no further callbacks come, and `infer` returns once the callback does.
    pub infer_cancel: unsafe extern "C" fn() -> *mut KilnError,
}

/// Metric kinds of [`KilnMetricOp::kind`].
pub const KILN_METRIC_COUNTER: u32 = 0;
pub const KILN_METRIC_GAUGE: u32 = 1;
pub const KILN_METRIC_HISTOGRAM: u32 = 2;
/// Operations of [`KilnMetricOp::op`]: set (gauge), add (counter, gauge), observe
/// (histogram), read (any).
pub const KILN_METRIC_SET: u32 = 0;
pub const KILN_METRIC_ADD: u32 = 1;
pub const KILN_METRIC_OBSERVE: u32 = 2;
pub const KILN_METRIC_READ: u32 = 3;

/// One operation on a custom metric series ([`KilnHostApi::metric`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnMetricOp {
    /// Family name, as served (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    pub family: KilnStr,
    pub description: KilnStr,
    pub kind: u32,
    pub op: u32,
    /// The series' labels as a JSON object of strings (empty for none).
    pub labels_json: KilnStr,
    /// A histogram's bucket upper bounds, ascending (its first use fixes them).
    pub buckets: *const f64,
    pub bucket_count: usize,
    pub value: f64,
}

/// A request a backend makes to another model ([`KilnHostApi::infer`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnInferRequest {
    pub model: KilnStr,
    /// Version; -1 for the one the version policy picks.
    pub version: i64,
    pub id: KilnStr,
    /// Request parameters as a JSON object (empty for none).
    pub parameters_json: KilnStr,
    pub inputs: *const KilnTensorView,
    pub input_count: usize,
    /// Outputs wanted (none: every output).
    pub requested_outputs: *const KilnStr,
    pub requested_output_count: usize,
    pub correlation_id: u64,
    /// Sequence flags (START = 1, END = 2).
    pub flags: u32,
    pub reserved: u32,
    /// Queue timeout in microseconds (0 = none).
    pub timeout_us: u64,
}

/// Receives one response of [`KilnHostApi::infer`]: its outputs, or `error` (not null;
/// owned by the host), and whether it is the last call.
pub type KilnInferCallback = unsafe extern "C" fn(
    user: *mut c_void,
    outputs: *const KilnTensorView,
    output_count: usize,
    error: *const KilnError,
    last: bool,
);

/// Size of ABI 1.2's `KilnHostApi` (before `infer`): a backend reads `infer` only from a
/// host table at least one pointer larger.
pub const KILN_HOST_API_SIZE_1_2: usize = offset_of!(KilnHostApi, infer);

/// Functions a backend library exports through `kiln_backend_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnBackendApi {
    pub header: KilnApiHeader,
    /// The backend's own name (informative).
    pub name: KilnStr,
    pub backend_init:
        unsafe extern "C" fn(host: *const KilnHostApi, state: *mut *mut c_void) -> *mut KilnError,
    pub backend_fini: unsafe extern "C" fn(state: *mut c_void) -> *mut KilnError,
    pub model_init: unsafe extern "C" fn(
        backend: *mut c_void,
        info: *const KilnModelInfo,
        state: *mut *mut c_void,
    ) -> *mut KilnError,
    pub model_fini: unsafe extern "C" fn(model: *mut c_void) -> *mut KilnError,
    pub instance_init: unsafe extern "C" fn(
        model: *mut c_void,
        info: *const KilnInstanceInfo,
        state: *mut *mut c_void,
    ) -> *mut KilnError,
    pub instance_fini: unsafe extern "C" fn(instance: *mut c_void) -> *mut KilnError,
    /// Runs a batch. Never called concurrently on one instance. On success the backend
    /// owns every request until it releases it; on error the host fails the rest.
    pub instance_execute: unsafe extern "C" fn(
        instance: *mut c_void,
        requests: *const KilnRequestView,
        count: usize,
    ) -> *mut KilnError,
    /// ABI 1.1 (nullable; absent when `struct_size` is ABI 1.0's): completes a model
    /// configuration, as Triton's auto-complete does. `info.config_json` holds the config
    /// so far (possibly only name and backend); the backend calls `set_config(ctx, json)`
    /// at most once with the completed config in Triton's JSON form, or not at all to
    /// keep it. `info.version` is the version whose files to read.
    pub model_autocomplete: Option<
        unsafe extern "C" fn(
            backend: *mut c_void,
            info: *const KilnModelInfo,
            ctx: *mut c_void,
            set_config: unsafe extern "C" fn(ctx: *mut c_void, config_json: KilnStr),
        ) -> *mut KilnError,
    >,
    /// ABI 1.2 (nullable; absent when `struct_size` is shorter): the backend's settings
    /// from the server's command line (tritonserver's `--backend-config`), as Triton's
    /// backend config JSON, `{"cmdline": {"<setting>": "<value>", ...}}`. Called at most
    /// once, after `backend_init` and before any model is loaded.
    pub backend_configure:
        Option<unsafe extern "C" fn(backend: *mut c_void, config_json: KilnStr) -> *mut KilnError>,
}

/// Size of ABI 1.0's `KilnBackendApi` (before `model_autocomplete`); the host accepts
/// tables at least this large and reads later fields only when `struct_size` covers them.
pub const KILN_BACKEND_API_SIZE_1_0: usize = offset_of!(KilnBackendApi, model_autocomplete);

/// Size of ABI 1.1's `KilnBackendApi` (before `backend_configure`).
pub const KILN_BACKEND_API_SIZE_1_1: usize = offset_of!(KilnBackendApi, backend_configure);

/// Signature of the entry symbol.
pub type KilnBackendEntryFn = unsafe extern "C" fn() -> *const KilnBackendApi;

// SAFETY: the tables hold only function pointers and 'static data.
unsafe impl Sync for KilnBackendApi {}
unsafe impl Send for KilnBackendApi {}
unsafe impl Sync for KilnHostApi {}
unsafe impl Send for KilnHostApi {}

// ---- Layout contract (mirrored by _Static_assert in include/kiln_backend.h) ----
const P: usize = size_of::<usize>();
const _: () = assert!(P == 8, "the Kiln ABI is defined for 64-bit targets");
const _: () = assert!(size_of::<KilnStr>() == 16);
const _: () = assert!(size_of::<KilnApiHeader>() == 24);
const _: () = assert!(offset_of!(KilnApiHeader, abi_major) == 16);
const _: () = assert!(size_of::<KilnTensorView>() == 64);
const _: () = assert!(offset_of!(KilnTensorView, dtype) == 16);
const _: () = assert!(offset_of!(KilnTensorView, device_id) == 24);
const _: () = assert!(offset_of!(KilnTensorView, shape) == 32);
const _: () = assert!(offset_of!(KilnTensorView, data) == 48);
const _: () = assert!(offset_of!(KilnTensorView, byte_len) == 56);
const _: () = assert!(size_of::<KilnRequestView>() == 104);
const _: () = assert!(offset_of!(KilnRequestView, id) == 8);
const _: () = assert!(offset_of!(KilnRequestView, correlation_id) == 24);
const _: () = assert!(offset_of!(KilnRequestView, timeout_us) == 40);
const _: () = assert!(offset_of!(KilnRequestView, parameters_json) == 48);
const _: () = assert!(offset_of!(KilnRequestView, inputs) == 64);
const _: () = assert!(offset_of!(KilnRequestView, requested_outputs) == 80);
const _: () = assert!(offset_of!(KilnRequestView, batch_size) == 96);
const _: () = assert!(size_of::<KilnModelInfo>() == 56);
const _: () = assert!(offset_of!(KilnModelInfo, version) == 16);
const _: () = assert!(offset_of!(KilnModelInfo, config_json) == 40);
const _: () = assert!(size_of::<KilnInstanceInfo>() == 40);
const _: () = assert!(offset_of!(KilnInstanceInfo, kind) == 16);
const _: () = assert!(offset_of!(KilnInstanceInfo, host_instance) == 32);
const _: () = assert!(size_of::<KilnHostApi>() == 24 + 20 * P);
const _: () = assert!(offset_of!(KilnHostApi, infer_cancel) == 24 + 19 * P);
const _: () = assert!(offset_of!(KilnHostApi, infer_response_parameters) == 24 + 18 * P);
const _: () = assert!(offset_of!(KilnHostApi, request_correlation_id_text) == 24 + 17 * P);
const _: () = assert!(offset_of!(KilnHostApi, model_control) == 24 + 16 * P);
const _: () = assert!(offset_of!(KilnHostApi, response_set_parameter) == 24 + 15 * P);
const _: () = assert!(offset_of!(KilnHostApi, metric) == 24 + 14 * P);
const _: () = assert!(size_of::<KilnMetricOp>() == 80);
const _: () = assert!(offset_of!(KilnMetricOp, labels_json) == 40);
const _: () = assert!(offset_of!(KilnMetricOp, value) == 72);
const _: () = assert!(offset_of!(KilnHostApi, infer) == 24 + 13 * P);
const _: () = assert!(size_of::<KilnInferRequest>() == 112);
const _: () = assert!(offset_of!(KilnInferRequest, version) == 16);
const _: () = assert!(offset_of!(KilnInferRequest, inputs) == 56);
const _: () = assert!(offset_of!(KilnInferRequest, correlation_id) == 88);
const _: () = assert!(offset_of!(KilnInferRequest, timeout_us) == 104);
const _: () = assert!(offset_of!(KilnHostApi, output_alloc) == 24 + 7 * P);
const _: () = assert!(offset_of!(KilnHostApi, report_compute) == 24 + 12 * P);
const _: () = assert!(size_of::<KilnBackendApi>() == 40 + 9 * P);
const _: () = assert!(offset_of!(KilnBackendApi, backend_init) == 40);
const _: () = assert!(offset_of!(KilnBackendApi, instance_execute) == 40 + 6 * P);
const _: () = assert!(offset_of!(KilnBackendApi, model_autocomplete) == 40 + 7 * P);
const _: () = assert!(offset_of!(KilnBackendApi, backend_configure) == 40 + 8 * P);

/// Every (name, size) and (name.field, offset) pair of the layout contract; the tests
/// compile the C header and compare against this table.
pub const LAYOUT: &[(&str, usize)] = &[
    ("sizeof(KilnStr)", size_of::<KilnStr>()),
    ("sizeof(KilnApiHeader)", size_of::<KilnApiHeader>()),
    ("sizeof(KilnTensorView)", size_of::<KilnTensorView>()),
    ("sizeof(KilnRequestView)", size_of::<KilnRequestView>()),
    ("sizeof(KilnModelInfo)", size_of::<KilnModelInfo>()),
    ("sizeof(KilnInstanceInfo)", size_of::<KilnInstanceInfo>()),
    ("sizeof(KilnHostApi)", size_of::<KilnHostApi>()),
    ("sizeof(KilnBackendApi)", size_of::<KilnBackendApi>()),
    (
        "offsetof(KilnTensorView,data)",
        offset_of!(KilnTensorView, data),
    ),
    (
        "offsetof(KilnRequestView,batch_size)",
        offset_of!(KilnRequestView, batch_size),
    ),
    (
        "offsetof(KilnRequestView,requested_outputs)",
        offset_of!(KilnRequestView, requested_outputs),
    ),
    (
        "offsetof(KilnInstanceInfo,host_instance)",
        offset_of!(KilnInstanceInfo, host_instance),
    ),
    (
        "offsetof(KilnHostApi,report_compute)",
        offset_of!(KilnHostApi, report_compute),
    ),
    (
        "offsetof(KilnHostApi,infer)",
        offset_of!(KilnHostApi, infer),
    ),
    (
        "offsetof(KilnHostApi,metric)",
        offset_of!(KilnHostApi, metric),
    ),
    (
        "offsetof(KilnHostApi,response_set_parameter)",
        offset_of!(KilnHostApi, response_set_parameter),
    ),
    (
        "offsetof(KilnHostApi,model_control)",
        offset_of!(KilnHostApi, model_control),
    ),
    (
        "offsetof(KilnHostApi,request_correlation_id_text)",
        offset_of!(KilnHostApi, request_correlation_id_text),
    ),
    (
        "offsetof(KilnHostApi,infer_response_parameters)",
        offset_of!(KilnHostApi, infer_response_parameters),
    ),
    (
        "offsetof(KilnHostApi,infer_cancel)",
        offset_of!(KilnHostApi, infer_cancel),
    ),
    ("sizeof(KilnMetricOp)", size_of::<KilnMetricOp>()),
    (
        "offsetof(KilnMetricOp,value)",
        offset_of!(KilnMetricOp, value),
    ),
    ("sizeof(KilnInferRequest)", size_of::<KilnInferRequest>()),
    (
        "offsetof(KilnInferRequest,timeout_us)",
        offset_of!(KilnInferRequest, timeout_us),
    ),
    (
        "offsetof(KilnBackendApi,instance_execute)",
        offset_of!(KilnBackendApi, instance_execute),
    ),
    (
        "offsetof(KilnBackendApi,model_autocomplete)",
        offset_of!(KilnBackendApi, model_autocomplete),
    ),
    (
        "offsetof(KilnBackendApi,backend_configure)",
        offset_of!(KilnBackendApi, backend_configure),
    ),
];
