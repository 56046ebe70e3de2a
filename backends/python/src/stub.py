# Kiln's Python backend stub: runs one instance of a Triton Python model (`model.py` with
# `TritonPythonModel`) in its own process and talks to the backend over stdin/stdout.
#
# Frames both ways: u32 LE header length, u64 LE payload length, the JSON header, then the
# payload (tensor bytes, in the order the header lists them). The model's own prints go to
# stderr, so they reach the server's log and never the protocol.
import asyncio
import importlib.util
import itertools
import json
import os
import queue
import struct
import sys
import threading
import traceback

import numpy as np

_proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
_proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.dup2(2, 1)
sys.stdout = sys.stderr
_write_lock = threading.Lock()


def _read_exact(n):
    """`n` bytes from the pipe, in a bytearray: arrays made over it are writable, as the
    input tensors of Triton's python backend are."""
    buf = bytearray(n)
    view, at = memoryview(buf), 0
    while at < n:
        got = _proto_in.readinto(view[at:])
        if not got:
            raise EOFError("the backend closed the pipe")
        at += got
    return buf


def _recv():
    h, p = struct.unpack("<IQ", _read_exact(12))
    header = json.loads(_read_exact(h))
    return header, memoryview(_read_exact(p)) if p else memoryview(b"")


def _send(header, blobs=()):
    head = json.dumps(header).encode()
    payload = b"".join(blobs)
    with _write_lock:
        _proto_out.write(struct.pack("<IQ", len(head), len(payload)) + head + payload)
        _proto_out.flush()


# ---------------------------------------------------------------- triton_python_backend_utils

_NP = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}


def _datatype_of(array):
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return "BYTES"
    for name, t in _NP.items():
        if t is not np.object_ and array.dtype == np.dtype(t):
            return name
    raise TritonModelException(f"numpy dtype {array.dtype} has no Triton datatype")


def _decode(datatype, shape, raw):
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(raw):
            (n,) = struct.unpack_from("<I", raw, at)
            items.append(bytes(raw[at + 4:at + 4 + n]))
            at += 4 + n
        out = np.empty(len(items), dtype=np.object_)
        out[:] = items
        return out.reshape(shape)
    if datatype == "BF16":
        raise TritonModelException("BF16 tensors have no numpy type")
    return np.frombuffer(raw, dtype=_NP[datatype]).reshape(shape)


def _encode(array):
    datatype = _datatype_of(array)
    if datatype == "BYTES":
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return datatype, b"".join(parts)
    return datatype, np.ascontiguousarray(array).tobytes()


class TritonModelException(Exception):
    pass


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=INTERNAL):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class Tensor:
    def __init__(self, name, array):
        if not isinstance(array, np.ndarray):
            raise TritonModelException(f"tensor '{name}' must be a numpy array")
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True

    def shape(self):
        return list(self._array.shape)

    def triton_dtype(self):
        """The tensor's TRITONSERVER_DataType code."""
        return _CODES.index(_datatype_of(self._array)) + 1

    def to_dlpack(self):
        """The tensor as a DLPack capsule (CPU memory, shared, not copied)."""
        return _exportable(self._array).__dlpack__()

    def __dlpack__(self, stream=None, **kwargs):
        return _exportable(self._array).__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (_DL_CPU, 0)

    @staticmethod
    def from_dlpack(name, tensor):
        """A tensor from a DLPack capsule or an object with `__dlpack__` (a torch or cupy
        tensor, a numpy array). CPU memory is shared; a GPU tensor is copied to host memory,
        where every tensor of Kiln's python backend lives."""
        return Tensor(name, _from_dlpack(tensor))


def _parameters_json(parameters):
    """Request or response parameters as Triton's python backend takes them: a dict of
    str keys and bool/int/str values (or, as older releases took, its JSON text)."""
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        parameters = json.loads(parameters)
    if not isinstance(parameters, dict):
        raise TritonModelException(f"Expect <class 'dict'>, got {type(parameters)}")
    for k, v in parameters.items():
        if not isinstance(k, str):
            raise TritonModelException(f"Expect parameters keys to have type str, found type {type(k)}")
        if not isinstance(v, (bool, int, str)):
            raise TritonModelException(
                f"Expect parameters values to have type bool/int/str, found type {type(v)}")
    return json.dumps(parameters)


_DL_CPU = 1


def _exportable(array):
    """`array` if DLPack can export it; a writable copy of a read-only one (legacy DLPack
    capsules cannot mark memory read-only)."""
    return array if array.flags.writeable else array.copy()


class _Capsule:
    """Wraps a bare DLPack capsule for numpy, which imports objects with `__dlpack__`."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, stream=None, **kwargs):
        return self._capsule

    def __dlpack_device__(self):
        return (_DL_CPU, 0)


def _capsule_device(capsule):
    """The DLPack device type of a capsule: its DLTensor's `device` follows the data pointer."""
    import ctypes
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    try:
        managed = get(capsule, b"dltensor")
        return ctypes.c_int32.from_address(managed + ctypes.sizeof(ctypes.c_void_p)).value
    except ValueError:
        raise TritonModelException("from_dlpack: the capsule is not an unused DLPack tensor") from None


def _from_dlpack(tensor):
    if hasattr(tensor, "__dlpack__"):
        device = tensor.__dlpack_device__()[0] if hasattr(tensor, "__dlpack_device__") else _DL_CPU
        if device != _DL_CPU:
            for to_host in ("cpu", "get"):  # torch, cupy
                if hasattr(tensor, to_host):
                    tensor = getattr(tensor, to_host)()
                    break
            else:
                raise TritonModelException(f"from_dlpack: cannot copy a tensor on DLPack device {device} to the host")
        return np.asarray(tensor) if isinstance(tensor, np.ndarray) else np.from_dlpack(tensor)
    if type(tensor).__name__ != "PyCapsule":
        raise TritonModelException(f"from_dlpack expects a DLPack capsule or an object with __dlpack__, got {type(tensor)}")
    if _capsule_device(tensor) != _DL_CPU:
        try:
            import torch.utils.dlpack
        except ImportError:
            raise TritonModelException("from_dlpack: a GPU capsule needs torch in the stub's Python to reach the host") from None
        return torch.utils.dlpack.from_dlpack(tensor).cpu().numpy()
    return np.from_dlpack(_Capsule(tensor))


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None, parameters=None):
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = _parameters_json(parameters)

    def parameters(self):
        return self._parameters

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class ResponseSender:
    def __init__(self, handle):
        self._handle, self._closed = handle, False

    def send(self, response=None, flags=0):
        if self._closed:
            raise TritonModelException("the response sender is closed: the final flag was already sent")
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException("a response or the final flag is required")
        _send_response(self._handle, response, final)
        self._closed = final

    def is_cancelled(self):
        return _ask_cancelled(self._handle)


class InferenceRequest:
    """A request the model received, or one it makes to another model (BLS, `exec`)."""

    def __init__(self, model_name=None, inputs=None, requested_output_names=None, request_id="",
                 correlation_id=0, flags=0, timeout=0, model_version=-1, parameters=None,
                 preferred_memory=None, trace=None, **kwargs):
        self._bls = (model_name, model_version, timeout)
        self._inputs, self._outputs = list(inputs or []), list(requested_output_names or [])
        self._id, self._corr, self._flags = request_id, correlation_id, flags
        self._timeout, self._trace = timeout, trace if trace is not None else InferenceTrace()
        self._params = _parameters_json(parameters)
        self._handle, self._sender, self._release_flags = None, None, 0

    @classmethod
    def _incoming(cls, spec, inputs):
        r = cls.__new__(cls)
        r._bls = None
        r._handle, r._inputs = spec["handle"], inputs
        r._outputs = spec.get("requested_outputs", [])
        r._id, r._corr = spec.get("id", ""), spec.get("correlation_id", 0)
        r._flags, r._params = spec.get("flags", 0), json.dumps(spec.get("parameters", {}))
        r._timeout, r._trace = spec.get("timeout", 0), InferenceTrace()
        r._sender, r._release_flags = None, 0
        return r

    def inputs(self):
        return self._inputs

    def requested_output_names(self):
        return self._outputs

    def request_id(self):
        return self._id

    def correlation_id(self):
        return self._corr

    def flags(self):
        return self._flags

    def set_flags(self, flags):
        self._flags = flags

    def timeout(self):
        """The request's timeout in microseconds (0: none)."""
        return self._timeout

    def trace(self):
        return self._trace

    def set_release_flags(self, flags):
        """`TRITONSERVER_REQUEST_RELEASE_RESCHEDULE` asks for the request to run again; Kiln
        has no iterative sequences, so such a request gets an error after `execute`."""
        self._release_flags = flags

    def parameters(self):
        return self._params

    def is_cancelled(self):
        return self._handle is not None and _ask_cancelled(self._handle)

    def get_response_sender(self):
        if self._sender is None:
            self._sender = ResponseSender(self._handle)
        return self._sender

    def exec(self, decoupled=False):
        """Runs this request on its model and returns its response (or, with `decoupled`,
        an iterator over its responses, the last one empty when the model ended with the
        final flag alone). Errors come back as responses with `error()` set."""
        if self._bls is None:
            raise TritonModelException("exec() is for requests the model builds, not ones it received")
        model, version, timeout = self._bls
        blobs, specs = [], []
        for t in self._inputs:
            datatype, raw = _encode(t.as_numpy())
            specs.append({"name": t.name(), "datatype": datatype, "shape": list(t.as_numpy().shape),
                          "size": len(raw)})
            blobs.append(raw)
        header = {"op": "bls", "model": model, "version": version, "id": self._id,
                  "correlation_id": self._corr, "flags": self._flags, "timeout_us": timeout,
                  "parameters": self._params, "requested_outputs": self._outputs, "inputs": specs}
        call, stream = _bls_start(header, blobs)
        if decoupled:
            return _ResponseIterator(call, stream)
        responses = [r for r, _ in stream]
        if responses and responses[-1].has_error():
            return responses[-1]
        real = [r for r in responses if r.output_tensors() or r.has_error()]
        if len(real) != 1:
            return InferenceResponse(error=TritonError(
                f"exec() received {len(real)} responses from '{model}'; use exec(decoupled=True) for a decoupled model"))
        return real[0]

    async def async_exec(self, decoupled=False):
        """`exec` on a thread of the event loop's executor, so other coroutines run meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(None, self.exec, decoupled)


class _ResponseIterator:
    """The responses of a decoupled BLS request, each as it arrives (the last one empty
    when the model ended with the final flag alone)."""

    def __init__(self, call, stream):
        self._call, self._stream = call, stream

    def __iter__(self):
        return self

    def __next__(self):
        response, _ = next(self._stream)
        return response

    def cancel(self):
        """Cancels the request: the called model sees `is_cancelled()` (from its next
        response on), and this iterator ends."""
        with _calls_lock:
            _calls.pop(self._call, None)
        _send({"op": "bls_cancel", "call": self._call})
        self._stream.close()


class LogLevel:
    INFO, WARNING, ERROR, VERBOSE = 0, 1, 2, 3


class Logger:
    """Writes to the server's log: each line on stderr marked with its level, which the
    backend reads."""

    @staticmethod
    def log(message, logging_level=LogLevel.INFO):
        for line in str(message).splitlines() or [""]:
            sys.stderr.write(f"\x1f{int(logging_level)}{line}\n")
        sys.stderr.flush()

    @staticmethod
    def log_info(message):
        Logger.log(message, LogLevel.INFO)

    @staticmethod
    def log_warn(message):
        Logger.log(message, LogLevel.WARNING)

    @staticmethod
    def log_error(message):
        Logger.log(message, LogLevel.ERROR)

    @staticmethod
    def log_verbose(message):
        Logger.log(message, LogLevel.VERBOSE)


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2


class PreferredMemory:
    """Where a BLS caller would like output tensors (Kiln's are always in CPU memory)."""

    def __init__(self, preferred_memory_type=TRITONSERVER_MEMORY_CPU, preferred_device_id=0):
        self.preferred_memory_type = preferred_memory_type
        self.preferred_device_id = preferred_device_id


class InferenceTrace:
    """A request's trace, passed on to BLS requests (Kiln traces them on their own)."""

    def __init__(self, context=None):
        self._context = context

    def get_context(self, key=None):
        return self._context


class ModelConfig:
    """What `auto_complete_config(auto_complete_model_config)` receives and returns."""

    def __init__(self, config):
        self._config = config

    def as_dict(self):
        return self._config

    def max_batch_size(self):
        return self._config.get("max_batch_size", 0)

    def set_max_batch_size(self, max_batch_size):
        current = self._config.get("max_batch_size", 0)
        if current not in (0, max_batch_size):
            raise ValueError(f"configuration specified max_batch_size {current}, "
                             f"but in auto-complete-config function for model "
                             f"'{self._config.get('name')}' specified max_batch_size {max_batch_size}")
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self):
        if "sequence_batching" not in self._config:
            self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, policy):
        self._config.setdefault("model_transaction_policy", {}).update(policy)

    def _add(self, key, tensor):
        if not isinstance(tensor, dict) or "name" not in tensor:
            raise ValueError(f"{key} must be a dict with a 'name'")
        existing = next((t for t in self._config.get(key, []) if t.get("name") == tensor["name"]), None)
        if existing is None:
            self._config.setdefault(key, []).append(dict(tensor))
            return
        for field in ("data_type", "dims"):
            if field in tensor and field in existing and existing[field] != tensor[field]:
                raise ValueError(f"unable to add {key} '{tensor['name']}': the configuration already "
                                 f"has it with {field} {existing[field]}, not {tensor[field]}")
            if field in tensor:
                existing[field] = tensor[field]

    def add_input(self, tensor):
        self._add("input", tensor)

    def add_output(self, tensor):
        self._add("output", tensor)


def _metric_op(family, labels, code, value=0.0):
    header = {"op": "metric", "family": family._name, "description": family._description,
              "kind": family._kind, "code": code, "value": float(value),
              "labels": json.dumps({str(k): str(v) for k, v in labels.items()}),
              "buckets": [float(b) for b in family._buckets]}
    answer = _ask(header)
    if "error" in answer:
        raise TritonModelException(answer["error"])
    return answer["value"]


class MetricFamily:
    """A custom metric family, served on the server's metrics port (Triton's API)."""
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, name, description, kind):
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(f"unknown metric kind {kind}")
        self._name, self._description, self._kind, self._buckets = name, description, kind, []

    def Metric(self, labels=None, buckets=None):
        if self._kind == self.HISTOGRAM:
            if not buckets:
                raise TritonModelException("a histogram metric needs buckets")
            self._buckets = list(buckets)
        return Metric(self, dict(labels or {}))


class Metric:
    def __init__(self, family, labels):
        self._family, self._labels = family, labels
        _metric_op(family, labels, 3)  # the series exists (at 0) from now on

    def increment(self, value):
        _metric_op(self._family, self._labels, 1, value)

    def set(self, value):
        _metric_op(self._family, self._labels, 0, value)

    def observe(self, value):
        _metric_op(self._family, self._labels, 2, value)

    def value(self):
        return _metric_op(self._family, self._labels, 3)


def get_input_tensor_by_name(request, name):
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response, name):
    return next((t for t in response.output_tensors() if t.name() == name), None)


def _config_by_name(model_config, key, name):
    config = model_config if isinstance(model_config, dict) else json.loads(model_config)
    return next((c for c in config.get(key, []) if c.get("name") == name), None)


def get_input_config_by_name(model_config, name):
    return _config_by_name(model_config, "input", name)


def get_output_config_by_name(model_config, name):
    return _config_by_name(model_config, "output", name)


TRITON_STRING_TO_NUMPY = {f"TYPE_{k}": v for k, v in _NP.items() if k != "BYTES"}
TRITON_STRING_TO_NUMPY["TYPE_BOOL"] = bool
TRITON_STRING_TO_NUMPY["TYPE_STRING"] = np.object_
# TRITONSERVER_DataType codes, as the python backend's functions take and return them.
_CODES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
          "FP64", "BYTES", "BF16"]


def triton_string_to_numpy(triton_type):
    return TRITON_STRING_TO_NUMPY[triton_type]


def numpy_to_triton_type(data_type):
    """The TRITONSERVER_DataType code (an int) of a numpy dtype; None for one it has not."""
    try:
        return _CODES.index(_datatype_of(np.empty(0, dtype=data_type))) + 1
    except (TritonModelException, TypeError):
        return None


def triton_to_numpy_type(data_type):
    """The numpy type of a TRITONSERVER_DataType code (or of a datatype name)."""
    if isinstance(data_type, str):
        return _NP.get(data_type)
    if 1 <= data_type <= 13:
        return _NP[_CODES[data_type - 1]]
    return None


def serialize_byte_tensor(input_tensor):
    """A bytes tensor as one object array holding its elements, each a 4-byte little-endian
    length then the bytes, in C order (Triton's wire form of BYTES)."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.object_)
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts = []
    for v in input_tensor.reshape(-1, order="C"):
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return np.asarray(b"".join(parts), dtype=np.object_)


def deserialize_bytes_tensor(encoded_tensor):
    """The elements of Triton's wire form of a BYTES tensor, as a 1-D object array."""
    raw = encoded_tensor.item() if isinstance(encoded_tensor, np.ndarray) else bytes(encoded_tensor)
    return _decode("BYTES", [-1], raw)


def using_decoupled_model_transaction_policy(model_config):
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def get_model_dir():
    """The folder of the model's `model.py` (its version folder)."""
    return _model_dir


def _utils_module():
    import types
    m = types.ModuleType("triton_python_backend_utils")
    for k, v in list(globals().items()):
        if not k.startswith("_") and k not in ("asyncio", "importlib", "itertools", "json", "os", "queue",
                                               "struct", "sys", "threading", "traceback", "np", "main"):
            setattr(m, k, v)
    return m


# ---------------------------------------------------------------- the loop

_finished = set()
_decoupled = False
_model_dir = None
_requests_in = queue.Queue()
_asks_lock = threading.Lock()
_answers = queue.Queue()
_calls = {}
_calls_lock = threading.Lock()
_next_call = itertools.count(1)
_async_loop = None


def _reader():
    """The only reader of the pipe: BLS responses go to the call they answer, answers to
    questions to the thread that asked, the rest to the main loop."""
    while True:
        try:
            frame = _recv()
        except EOFError:
            _answers.put(None)
            _requests_in.put(None)
            with _calls_lock:
                for q in _calls.values():
                    q.put(None)
            return
        op = frame[0]["op"]
        if op in ("bls_response", "control_result"):
            with _calls_lock:
                q = _calls.get(frame[0].get("call"))
            if q is not None:
                q.put(frame)
        elif op in ("cancelled", "metric_value"):
            _answers.put(frame)
        else:
            _requests_in.put(frame)


def _ask(header):
    """Sends a question to the backend (one at a time) and returns its answer's header."""
    with _asks_lock:
        _send(header)
        frame = _answers.get()
    if frame is None:
        raise TritonModelException("the backend closed the pipe")
    return frame[0]


def _ask_cancelled(handle):
    """Whether the client of request `handle` has gone away."""
    return bool(_ask({"op": "is_cancelled", "request": handle}).get("cancelled"))


def _bls_start(header, blobs):
    """Sends a BLS request now; returns its call id and a generator of (response, final) as
    they arrive. Calls run in parallel: each has its own id, which the backend puts on its
    responses."""
    call, q = next(_next_call), queue.Queue()
    with _calls_lock:
        _calls[call] = q
    try:
        _send(dict(header, call=call), blobs)
    except BaseException:
        with _calls_lock:
            _calls.pop(call, None)
        raise
    return call, _bls_replies(call, q)


def _bls_replies(call, q):
    try:
        while True:
            frame = q.get()
            if frame is None:
                raise TritonModelException("the backend closed the pipe")
            h, payload = frame
            yield _bls_response(h, payload), h["final"]
            if h["final"]:
                return
    finally:
        with _calls_lock:
            _calls.pop(call, None)


def _control(action, **fields):
    """A model management request to the server; returns its result's header."""
    call, q = next(_next_call), queue.Queue()
    with _calls_lock:
        _calls[call] = q
    try:
        _send(dict(fields, op="model_control", call=call, action=action))
        frame = q.get()
    finally:
        with _calls_lock:
            _calls.pop(call, None)
    if frame is None:
        raise TritonModelException("the backend closed the pipe")
    if "error" in frame[0]:
        raise TritonModelException(frame[0]["error"])
    return frame[0]


def load_model(model_name, config="", files=None):
    """Loads or reloads a model of the server (explicit model control mode); `config`, a
    JSON model configuration, replaces its config.pbtxt."""
    if files:
        raise TritonModelException("load_model: 'files' is not supported by Kiln's python backend")
    _control("load", model=model_name, config=config or "")


def unload_model(model_name, unload_dependents=False):
    """Unloads a model of the server (explicit model control mode)."""
    _control("unload", model=model_name, unload_dependents=bool(unload_dependents))


def is_model_ready(model_name, model_version=""):
    """Whether the model (version) is ready on the server."""
    version = int(model_version) if str(model_version).strip() else -1
    return bool(_control("ready", model=model_name, version=version)["ready"])


def _background_loop():
    """The event loop coroutines of `async def execute` run on, in a thread of its own so
    that tasks a decoupled model starts go on after `execute` returned (as in Triton)."""
    global _async_loop
    if _async_loop is None:
        _async_loop = asyncio.new_event_loop()
        threading.Thread(target=_async_loop.run_forever, name="kiln-asyncio", daemon=True).start()
    return _async_loop


def _log_failure(future):
    if not future.cancelled() and future.exception() is not None:
        e = future.exception()
        Logger.log_error("".join(traceback.format_exception(type(e), e, e.__traceback__)))


def _bls_response(h, payload):
    if "error" in h:
        return InferenceResponse(error=TritonError(h["error"], h.get("code", TritonError.INTERNAL)))
    at, outs = 0, []
    for o in h.get("outputs", []):
        raw = payload[at:at + o["size"]]
        at += o["size"]
        outs.append(Tensor(o["name"], _decode(o["datatype"], o["shape"], raw)))
    response = InferenceResponse(output_tensors=outs)
    response._parameters = h.get("parameters", "{}")
    return response


def _error_message(e):
    return e.message() if isinstance(e, TritonError) else str(e)


def _send_response(handle, response, final):
    header = {"op": "response", "request": handle, "final": final}
    blobs = []
    if response is not None:
        err = response.error()
        if err is not None:
            header["error"] = _error_message(err)
            header["code"] = err.code() if isinstance(err, TritonError) else TritonError.INTERNAL
        else:
            outs = []
            for t in response.output_tensors():
                datatype, raw = _encode(t.as_numpy())
                outs.append({"name": t.name(), "datatype": datatype, "shape": list(t.as_numpy().shape),
                             "size": len(raw)})
                blobs.append(raw)
            header["outputs"] = outs
            params = json.loads(response.parameters())
            if params:
                header["parameters"] = params
    if final and not _decoupled:
        _finished.add(handle)
    _send(header, blobs)


def _requests(header, payload):
    at, out = 0, []
    for spec in header["requests"]:
        inputs = []
        for t in spec["inputs"]:
            raw = payload[at:at + t["size"]]
            at += t["size"]
            inputs.append(Tensor(t["name"], _decode(t["datatype"], t["shape"], raw)))
        out.append(InferenceRequest._incoming(spec, inputs))
    return out


def _import_model(header):
    global _model_dir
    _model_dir = header["model_dir"]
    sys.path.insert(0, header["model_dir"])
    spec = importlib.util.spec_from_file_location("model", header["model_file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def _autocomplete(header):
    try:
        cls = _import_model(header)
        config = None
        if hasattr(cls, "auto_complete_config"):
            config = cls.auto_complete_config(ModelConfig(json.loads(header["config"]))).as_dict()
        _send({"op": "ok", "config": config})
    except Exception:
        _send({"op": "error", "message": traceback.format_exc()})


def main():
    sys.modules["triton_python_backend_utils"] = _utils_module()
    header, _ = _recv()
    if header["op"] == "autocomplete":
        _autocomplete(header)
        return
    args = header["args"]
    threading.Thread(target=_reader, daemon=True).start()
    try:
        model = _import_model(header)()
        if hasattr(model, "initialize"):
            model.initialize(args)
    except Exception:
        _send({"op": "error", "message": traceback.format_exc()})
        return
    global _decoupled
    decoupled = _decoupled = header.get("decoupled", False)
    _send({"op": "ok"})
    while True:
        frame = _requests_in.get()
        if frame is None:
            break
        header, payload = frame
        if header["op"] == "fini":
            try:
                if hasattr(model, "finalize"):
                    model.finalize()
            finally:
                _send({"op": "ok"})
            break
        requests = []
        try:
            requests = _requests(header, payload)
            responses = model.execute(requests)
            if asyncio.iscoroutine(responses):
                future = asyncio.run_coroutine_threadsafe(responses, _background_loop())
                if decoupled:
                    # Not waited for: the model answers through its response senders.
                    future.add_done_callback(_log_failure)
                    responses = None
                else:
                    responses = future.result()
            _check_responses(args["model_instance_name"], decoupled, requests, responses)
            for request in requests:
                if request._release_flags & TRITONSERVER_REQUEST_RELEASE_RESCHEDULE and \
                        request._handle not in _finished:
                    error = TritonError(_RESCHEDULE_UNSUPPORTED, TritonError.UNSUPPORTED)
                    _send_response(request._handle, InferenceResponse(error=error), True)
            for request, r in zip(requests, responses or []):
                if r is not None and request._handle not in _finished:
                    _send_response(request._handle, r, True)
            _send({"op": "done"})
        except Exception as e:
            _send({"op": "failed", "message": _error_message(e) if isinstance(e, (TritonError, TritonModelException))
                   else f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
        finally:
            _finished.difference_update(r._handle for r in requests)


_RESCHEDULE_UNSUPPORTED = (
    "the model released the request with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE: Kiln does not "
    "run iterative sequences (sequence_batching { iterative_sequence: true }), so the request ends here")


def _check_responses(name, decoupled, requests, responses):
    """What `execute` may return, with Triton's messages."""
    if responses is None:
        return
    if decoupled:
        raise TritonModelException(
            f"Python model '{name}' is using the decoupled mode and the execute function must return None.")
    if not isinstance(responses, list):
        raise TritonModelException(f"Expected a list in the execute return, found type '{type(responses)}'.")
    if len(responses) != len(requests):
        raise TritonModelException(
            "Number of InferenceResponse objects do not match the number of InferenceRequest objects. "
            f"InferenceRequest(s) size is:{len(requests)}, and InferenceResponse(s) size is:{len(responses)}\n")
    for r in responses:
        if r is not None and not isinstance(r, InferenceResponse):
            raise TritonModelException(
                "Expected an 'InferenceResponse' object in the execute function return list, "
                f"found type '{type(r)}'.")

main()
