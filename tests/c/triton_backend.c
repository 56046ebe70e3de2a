/* Looks like a Triton C++ backend: exports TRITONBACKEND_ModelInstanceExecute only. */
int TRITONBACKEND_ModelInstanceExecute(void* instance, void** requests, unsigned count) {
  (void)instance; (void)requests; (void)count; return 0;
}
