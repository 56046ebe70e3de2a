/* Kiln backend ABI, version 1.0 — the C view of crates/kiln-abi/src/lib.rs.
 *
 * A backend is a shared library named libkiln_<backend>.so exporting exactly one symbol:
 *     const KilnBackendApi* kiln_backend_entry(void);
 * returning a pointer to a static table. Sizes and offsets below are asserted here and in
 * Rust; the test suite compiles this header and compares both. */
#ifndef KILN_BACKEND_H
#define KILN_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KILN_ABI_MAGIC 0x004942414E4C494BULL /* "KILNABI\0" little-endian */
#define KILN_ABI_MAJOR 1u
#define KILN_ABI_MINOR 5u

typedef uint32_t KilnDataType;
enum {
  KILN_TYPE_INVALID = 0, KILN_TYPE_BOOL = 1, KILN_TYPE_UINT8 = 2, KILN_TYPE_UINT16 = 3,
  KILN_TYPE_UINT32 = 4, KILN_TYPE_UINT64 = 5, KILN_TYPE_INT8 = 6, KILN_TYPE_INT16 = 7,
  KILN_TYPE_INT32 = 8, KILN_TYPE_INT64 = 9, KILN_TYPE_FP16 = 10, KILN_TYPE_FP32 = 11,
  KILN_TYPE_FP64 = 12, KILN_TYPE_BYTES = 13, KILN_TYPE_BF16 = 14
};

typedef uint32_t KilnMemoryKind;
enum { KILN_MEMORY_CPU = 0, KILN_MEMORY_CPU_PINNED = 1, KILN_MEMORY_GPU = 2 };

typedef uint32_t KilnErrorCode;
enum {
  KILN_ERROR_UNKNOWN = 0, KILN_ERROR_INTERNAL = 1, KILN_ERROR_NOT_FOUND = 2,
  KILN_ERROR_INVALID_ARG = 3, KILN_ERROR_UNAVAILABLE = 4, KILN_ERROR_UNSUPPORTED = 5,
  KILN_ERROR_ALREADY_EXISTS = 6, KILN_ERROR_CANCELLED = 7
};

typedef uint32_t KilnLogLevel;
enum { KILN_LOG_ERROR = 0, KILN_LOG_WARN = 1, KILN_LOG_INFO = 2, KILN_LOG_VERBOSE = 3 };

typedef uint32_t KilnInstanceKind;
enum { KILN_INSTANCE_AUTO = 0, KILN_INSTANCE_CPU = 1, KILN_INSTANCE_GPU = 2, KILN_INSTANCE_MODEL = 3 };

#define KILN_REQUEST_FLAG_SEQUENCE_START 1u
#define KILN_REQUEST_FLAG_SEQUENCE_END 2u
#define KILN_RESPONSE_FLAG_FINAL 1u
#define KILN_REQUEST_RELEASE_ALL 1u
/* ABI 1.4: kinds of a response parameter's value (KilnHostApi.response_set_parameter);
   value points to a bool, an int64_t, a double or a KilnStr. */
#define KILN_PARAMETER_BOOL 0u
#define KILN_PARAMETER_INT 1u
#define KILN_PARAMETER_DOUBLE 2u
#define KILN_PARAMETER_STRING 3u
/* ABI 1.4: operations of KilnHostApi.model_control. */
#define KILN_MODEL_LOAD 0u
#define KILN_MODEL_UNLOAD 1u
#define KILN_MODEL_READY 2u
#define KILN_MODEL_UNLOAD_DEPENDENTS 3u

typedef struct KilnError KilnError;       /* host-owned; NULL means success */
typedef struct KilnRequest KilnRequest;   /* host-owned */
typedef struct KilnResponse KilnResponse; /* host-owned */
typedef struct KilnInstance KilnInstance; /* host-owned */

typedef struct KilnStr {
  const uint8_t* ptr;
  size_t len;
} KilnStr;

typedef struct KilnApiHeader {
  uint64_t magic;
  uint64_t struct_size;
  uint32_t abi_major;
  uint32_t abi_minor;
} KilnApiHeader;

typedef struct KilnTensorView {
  KilnStr name;
  KilnDataType dtype;
  KilnMemoryKind memory_kind;
  int64_t device_id;
  const int64_t* shape;
  size_t ndim;
  const uint8_t* data;
  size_t byte_len;
} KilnTensorView;

typedef struct KilnRequestView {
  KilnRequest* handle;
  KilnStr id;
  uint64_t correlation_id;
  uint32_t flags;
  uint32_t reserved;
  uint64_t timeout_us;
  KilnStr parameters_json;
  const KilnTensorView* inputs;
  size_t input_count;
  const KilnStr* requested_outputs;
  size_t requested_output_count;
  uint64_t batch_size;
} KilnRequestView;

typedef struct KilnModelInfo {
  KilnStr name;
  int64_t version;
  KilnStr repository_path;
  KilnStr config_json;
} KilnModelInfo;

typedef struct KilnInstanceInfo {
  KilnStr name;
  KilnInstanceKind kind;
  int32_t device_id;
  uint32_t index;
  uint32_t reserved;
  KilnInstance* host_instance;
} KilnInstanceInfo;

/* ABI 1.3: a request a backend makes to another model (KilnHostApi.infer, Triton's BLS). */
typedef struct KilnInferRequest {
  KilnStr model;
  int64_t version; /* -1: the one the version policy picks */
  KilnStr id;
  KilnStr parameters_json; /* a JSON object, or empty */
  const KilnTensorView* inputs;
  size_t input_count;
  const KilnStr* requested_outputs; /* none: every output */
  size_t requested_output_count;
  uint64_t correlation_id;
  uint32_t flags; /* START = 1, END = 2 */
  uint32_t reserved;
  uint64_t timeout_us;
} KilnInferRequest;

/* One response of KilnHostApi.infer: its outputs (valid for the call only) or an error
   (owned by the host), and whether it is the last call. */
typedef void (*KilnInferCallback)(void* user, const KilnTensorView* outputs, size_t output_count,
                                  const KilnError* error, bool last);

/* ABI 1.3: one operation on a custom metric series (KilnHostApi.metric). */
#define KILN_METRIC_COUNTER 0u
#define KILN_METRIC_GAUGE 1u
#define KILN_METRIC_HISTOGRAM 2u
#define KILN_METRIC_SET 0u
#define KILN_METRIC_ADD 1u
#define KILN_METRIC_OBSERVE 2u
#define KILN_METRIC_READ 3u
typedef struct KilnMetricOp {
  KilnStr family;
  KilnStr description;
  uint32_t kind;
  uint32_t op;
  KilnStr labels_json; /* a JSON object of strings, or empty */
  const double* buckets; /* a histogram's upper bounds, ascending */
  size_t bucket_count;
  double value;
} KilnMetricOp;

typedef struct KilnHostApi {
  KilnApiHeader header;
  KilnError* (*error_new)(KilnErrorCode code, KilnStr message);
  void (*error_delete)(KilnError* error);
  KilnErrorCode (*error_code)(const KilnError* error);
  KilnStr (*error_message)(const KilnError* error);
  void (*log)(KilnLogLevel level, KilnStr message);
  uint64_t (*clock_ns)(void);
  KilnError* (*response_new)(KilnRequest* request, KilnResponse** response);
  KilnError* (*output_alloc)(KilnResponse* response, KilnStr name, KilnDataType dtype,
                             const int64_t* shape, size_t ndim, size_t byte_len,
                             KilnMemoryKind preferred_memory, uint8_t** buffer,
                             KilnMemoryKind* memory_kind);
  KilnError* (*response_send)(KilnResponse* response, uint32_t flags, KilnError* error);
  KilnError* (*request_send_flags)(KilnRequest* request, uint32_t flags);
  KilnError* (*request_is_cancelled)(KilnRequest* request, bool* cancelled);
  KilnError* (*request_release)(KilnRequest* request, uint32_t flags);
  KilnError* (*report_compute)(KilnInstance* instance, uint64_t compute_start_ns,
                               uint64_t compute_end_ns);
  /* ABI 1.3 (present when header.struct_size covers it): runs `request` on a model of this
     server and blocks until it is done, calling on_response per response. Call it from
     instance_execute's thread only. */
  KilnError* (*infer)(const KilnInferRequest* request, KilnInferCallback on_response, void* user);
  /* ABI 1.3: updates or reads a custom metric (created on first use), served on the metrics
     port; *value receives the series' value after the operation. */
  KilnError* (*metric)(const KilnMetricOp* op, double* value);
  /* ABI 1.4: attaches a parameter to a response before it is sent (Triton's response
     parameters); setting a name again replaces its value. */
  KilnError* (*response_set_parameter)(KilnResponse* response, KilnStr name, uint32_t kind,
                                       const void* value);
  /* ABI 1.4: loads (config_json, when not empty, replaces the configuration), unloads, or
     tells whether a model version (-1: any) is ready (*ready). Load and unload need explicit
     model control and block: call from an instance's thread only. */
  KilnError* (*model_control)(uint32_t op, KilnStr name, int64_t version, KilnStr config_json,
                              bool* ready);
  /* ABI 1.4: a string correlation id as the client gave it (empty for a numeric one); valid
     until the request is released. */
  KilnError* (*request_correlation_id_text)(KilnRequest* request, KilnStr* text);
  /* ABI 1.4: inside a KilnInferCallback, the parameters of the response it delivers as a
     JSON object ("{}" for none; valid for the callback). */
  KilnError* (*infer_response_parameters)(KilnStr* json);
  /* ABI 1.5: inside a KilnInferCallback, cancels the request it delivers for: the called
     model sees it cancelled, no further callbacks come, and infer returns. */
  KilnError* (*infer_cancel)(void);
} KilnHostApi;

typedef struct KilnBackendApi {
  KilnApiHeader header;
  KilnStr name;
  KilnError* (*backend_init)(const KilnHostApi* host, void** state);
  KilnError* (*backend_fini)(void* state);
  KilnError* (*model_init)(void* backend, const KilnModelInfo* info, void** state);
  KilnError* (*model_fini)(void* model);
  KilnError* (*instance_init)(void* model, const KilnInstanceInfo* info, void** state);
  KilnError* (*instance_fini)(void* instance);
  KilnError* (*instance_execute)(void* instance, const KilnRequestView* requests, size_t count);
  /* ABI 1.1, may be NULL: complete the model configuration (Triton's auto-complete). Call
     set_config(ctx, json) at most once with the completed config in Triton's JSON form. */
  KilnError* (*model_autocomplete)(void* backend, const KilnModelInfo* info, void* ctx,
                                   void (*set_config)(void* ctx, KilnStr config_json));
  /* ABI 1.2, may be NULL: the server's settings for this backend (--backend-config), as
     {"cmdline": {"<setting>": "<value>", ...}}; called at most once, after backend_init and
     before any model is loaded. */
  KilnError* (*backend_configure)(void* backend, KilnStr config_json);
} KilnBackendApi;

typedef const KilnBackendApi* (*KilnBackendEntryFn)(void);

#define KILN_P sizeof(void*)
_Static_assert(sizeof(void*) == 8, "the Kiln ABI is defined for 64-bit targets");
_Static_assert(sizeof(KilnStr) == 16, "KilnStr");
_Static_assert(sizeof(KilnApiHeader) == 24, "KilnApiHeader");
_Static_assert(offsetof(KilnApiHeader, abi_major) == 16, "KilnApiHeader.abi_major");
_Static_assert(sizeof(KilnTensorView) == 64, "KilnTensorView");
_Static_assert(offsetof(KilnTensorView, dtype) == 16, "KilnTensorView.dtype");
_Static_assert(offsetof(KilnTensorView, device_id) == 24, "KilnTensorView.device_id");
_Static_assert(offsetof(KilnTensorView, shape) == 32, "KilnTensorView.shape");
_Static_assert(offsetof(KilnTensorView, data) == 48, "KilnTensorView.data");
_Static_assert(offsetof(KilnTensorView, byte_len) == 56, "KilnTensorView.byte_len");
_Static_assert(sizeof(KilnRequestView) == 104, "KilnRequestView");
_Static_assert(offsetof(KilnRequestView, id) == 8, "KilnRequestView.id");
_Static_assert(offsetof(KilnRequestView, correlation_id) == 24, "KilnRequestView.correlation_id");
_Static_assert(offsetof(KilnRequestView, timeout_us) == 40, "KilnRequestView.timeout_us");
_Static_assert(offsetof(KilnRequestView, parameters_json) == 48, "KilnRequestView.parameters_json");
_Static_assert(offsetof(KilnRequestView, inputs) == 64, "KilnRequestView.inputs");
_Static_assert(offsetof(KilnRequestView, requested_outputs) == 80, "KilnRequestView.requested_outputs");
_Static_assert(offsetof(KilnRequestView, batch_size) == 96, "KilnRequestView.batch_size");
_Static_assert(sizeof(KilnModelInfo) == 56, "KilnModelInfo");
_Static_assert(offsetof(KilnModelInfo, version) == 16, "KilnModelInfo.version");
_Static_assert(offsetof(KilnModelInfo, config_json) == 40, "KilnModelInfo.config_json");
_Static_assert(sizeof(KilnInstanceInfo) == 40, "KilnInstanceInfo");
_Static_assert(offsetof(KilnInstanceInfo, kind) == 16, "KilnInstanceInfo.kind");
_Static_assert(offsetof(KilnInstanceInfo, host_instance) == 32, "KilnInstanceInfo.host_instance");
_Static_assert(sizeof(KilnHostApi) == 24 + 20 * KILN_P, "KilnHostApi");
_Static_assert(offsetof(KilnHostApi, infer_cancel) == 24 + 19 * KILN_P, "KilnHostApi.infer_cancel");
_Static_assert(offsetof(KilnHostApi, infer_response_parameters) == 24 + 18 * KILN_P, "KilnHostApi.infer_response_parameters");
_Static_assert(offsetof(KilnHostApi, request_correlation_id_text) == 24 + 17 * KILN_P, "KilnHostApi.request_correlation_id_text");
_Static_assert(offsetof(KilnHostApi, model_control) == 24 + 16 * KILN_P, "KilnHostApi.model_control");
_Static_assert(offsetof(KilnHostApi, response_set_parameter) == 24 + 15 * KILN_P, "KilnHostApi.response_set_parameter");
_Static_assert(offsetof(KilnHostApi, metric) == 24 + 14 * KILN_P, "KilnHostApi.metric");
_Static_assert(sizeof(KilnMetricOp) == 80, "KilnMetricOp");
_Static_assert(offsetof(KilnMetricOp, labels_json) == 40, "KilnMetricOp.labels_json");
_Static_assert(offsetof(KilnMetricOp, value) == 72, "KilnMetricOp.value");
_Static_assert(offsetof(KilnHostApi, infer) == 24 + 13 * KILN_P, "KilnHostApi.infer");
_Static_assert(sizeof(KilnInferRequest) == 112, "KilnInferRequest");
_Static_assert(offsetof(KilnInferRequest, version) == 16, "KilnInferRequest.version");
_Static_assert(offsetof(KilnInferRequest, inputs) == 56, "KilnInferRequest.inputs");
_Static_assert(offsetof(KilnInferRequest, correlation_id) == 88, "KilnInferRequest.correlation_id");
_Static_assert(offsetof(KilnInferRequest, timeout_us) == 104, "KilnInferRequest.timeout_us");
_Static_assert(offsetof(KilnHostApi, output_alloc) == 24 + 7 * KILN_P, "KilnHostApi.output_alloc");
_Static_assert(offsetof(KilnHostApi, report_compute) == 24 + 12 * KILN_P, "KilnHostApi.report_compute");
_Static_assert(sizeof(KilnBackendApi) == 40 + 9 * KILN_P, "KilnBackendApi");
_Static_assert(offsetof(KilnBackendApi, backend_init) == 40, "KilnBackendApi.backend_init");
_Static_assert(offsetof(KilnBackendApi, instance_execute) == 40 + 6 * KILN_P, "KilnBackendApi.instance_execute");
_Static_assert(offsetof(KilnBackendApi, model_autocomplete) == 40 + 7 * KILN_P, "KilnBackendApi.model_autocomplete");
_Static_assert(offsetof(KilnBackendApi, backend_configure) == 40 + 8 * KILN_P, "KilnBackendApi.backend_configure");

#ifdef __cplusplus
}
#endif
#endif /* KILN_BACKEND_H */
