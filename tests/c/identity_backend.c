/* A Kiln backend written in C against kiln_backend.h: OUTPUT0 = INPUT0.
 * TEST_ABI_MAJOR / TEST_ABI_MINOR let the tests build deliberately mismatched libraries. */
#include <string.h>
#include "kiln_backend.h"

#ifndef TEST_ABI_MAJOR
#define TEST_ABI_MAJOR KILN_ABI_MAJOR
#endif
#ifndef TEST_ABI_MINOR
#define TEST_ABI_MINOR KILN_ABI_MINOR
#endif

static const KilnHostApi* host;
static int backend_state, model_state, instance_state;

static KilnStr str(const char* s) { KilnStr k = {(const uint8_t*)s, strlen(s)}; return k; }

static KilnError* backend_init(const KilnHostApi* h, void** state) {
  host = h;
  *state = &backend_state;
  return NULL;
}
static KilnError* backend_fini(void* s) { (void)s; return NULL; }
static KilnError* model_init(void* b, const KilnModelInfo* info, void** state) {
  (void)b; (void)info; *state = &model_state; return NULL;
}
static KilnError* model_fini(void* m) { (void)m; return NULL; }
static KilnError* instance_init(void* m, const KilnInstanceInfo* info, void** state) {
  (void)m; (void)info; *state = &instance_state; return NULL;
}
static KilnError* instance_fini(void* i) { (void)i; return NULL; }

static KilnError* execute(void* inst, const KilnRequestView* reqs, size_t n) {
  (void)inst;
  for (size_t r = 0; r < n; r++) {
    const KilnRequestView* rq = &reqs[r];
    KilnResponse* resp = NULL;
    KilnError* err = host->response_new(rq->handle, &resp);
    if (err) return err;
    KilnError* send_err = NULL;
    const KilnTensorView* in = NULL;
    for (size_t i = 0; i < rq->input_count; i++)
      if (rq->inputs[i].name.len == 6 && memcmp(rq->inputs[i].name.ptr, "INPUT0", 6) == 0) in = &rq->inputs[i];
    if (!in) {
      send_err = host->error_new(KILN_ERROR_INVALID_ARG, str("C backend: INPUT0 missing"));
    } else {
      uint8_t* buf = NULL;
      KilnMemoryKind kind;
      send_err = host->output_alloc(resp, str("OUTPUT0"), in->dtype, in->shape, in->ndim, in->byte_len,
                                    KILN_MEMORY_CPU, &buf, &kind);
      if (!send_err && in->byte_len) memcpy(buf, in->data, in->byte_len);
    }
    /* ABI 1.4 response parameters, when the host's table has them. */
    if (!send_err && host->header.struct_size > offsetof(KilnHostApi, response_set_parameter)) {
      KilnStr backend = str("c");
      double scale = 0.5;
      send_err = host->response_set_parameter(resp, str("backend"), KILN_PARAMETER_STRING, &backend);
      if (!send_err)
        send_err = host->response_set_parameter(resp, str("scale"), KILN_PARAMETER_DOUBLE, &scale);
    }
    err = host->response_send(resp, KILN_RESPONSE_FLAG_FINAL, send_err);
    if (err) return err;
    err = host->request_release(rq->handle, KILN_REQUEST_RELEASE_ALL);
    if (err) return err;
  }
  return NULL;
}

/* -DTEST_ABI_1_0 / -DTEST_ABI_1_1 build the table as an ABI 1.0 / 1.1 backend did:
   shorter (without model_autocomplete / backend_configure). */
#ifdef TEST_ABI_1_0
#define TEST_TABLE_SIZE offsetof(KilnBackendApi, model_autocomplete)
#elif defined(TEST_ABI_1_1)
#define TEST_TABLE_SIZE offsetof(KilnBackendApi, backend_configure)
#else
#define TEST_TABLE_SIZE sizeof(KilnBackendApi)
#endif

static const KilnBackendApi API = {
  {KILN_ABI_MAGIC, TEST_TABLE_SIZE, TEST_ABI_MAJOR, TEST_ABI_MINOR},
  {(const uint8_t*)"c_identity", 10},
  backend_init, backend_fini, model_init, model_fini, instance_init, instance_fini, execute,
  NULL, NULL,
};

const KilnBackendApi* kiln_backend_entry(void) { return &API; }
