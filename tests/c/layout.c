/* Prints the ABI layout as the C compiler sees it, in kiln_abi::LAYOUT's format. */
#include <stdio.h>
#include "kiln_backend.h"
#define S(T) printf("sizeof(%s)=%zu\n", #T, sizeof(T))
#define O(T, f) printf("offsetof(%s,%s)=%zu\n", #T, #f, offsetof(T, f))
int main(void) {
  S(KilnStr); S(KilnApiHeader); S(KilnTensorView); S(KilnRequestView); S(KilnModelInfo);
  S(KilnInstanceInfo); S(KilnHostApi); S(KilnBackendApi);
  O(KilnTensorView, data); O(KilnRequestView, batch_size); O(KilnRequestView, requested_outputs);
  O(KilnInstanceInfo, host_instance); O(KilnHostApi, report_compute); O(KilnHostApi, infer); O(KilnHostApi, metric); O(KilnHostApi, response_set_parameter); O(KilnHostApi, model_control); O(KilnHostApi, request_correlation_id_text); O(KilnHostApi, infer_response_parameters); O(KilnHostApi, infer_cancel);
  S(KilnMetricOp); O(KilnMetricOp, value);
  S(KilnInferRequest); O(KilnInferRequest, timeout_us); O(KilnBackendApi, instance_execute); O(KilnBackendApi, model_autocomplete); O(KilnBackendApi, backend_configure);
  printf("magic=%llu\n", (unsigned long long)KILN_ABI_MAGIC);
  return 0;
}
