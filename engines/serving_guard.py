"""The front of `adpdm serve`: HTTP and gRPC listeners that check every request before Triton sees it.

Why a front at all: the bundled tritonserver (PyTriton 0.7.0, Triton 2.51) has no option to bound
request sizes (no ``--http-max-input-size``) and allocates the byte size an HTTP/JSON request
*declares* before it checks anything (``"shape": [1000000000, 1, 16, 16]`` with one value aborts the
server with ``std::bad_alloc``); and PyTriton answers an error raised by a model callable for the
whole executed batch, with the full traceback, as an INTERNAL error (HTTP 500). So Triton listens on
loopback ports of its own and the user's ports are served here:

1. size: the body (HTTP ``Content-Length``, gRPC message) is bounded; every input's declared shape is
   checked against the model's bounds (batch, elements) *before* its data is decoded;
2. structure: known model, known input names, required inputs present, declared datatype;
3. values: the model's own per-request check (`ModelSpec.validate`: NaN, timestep range, seed, n,
   steps, scheduler, conditioning), so a bad request never reaches the dynamic batcher and never
   fails the good requests batched with it;
4. errors: a refused request is HTTP 400 / gRPC INVALID_ARGUMENT with one line; an error that still
   comes back from Triton is cut to one line (no traceback, no path leaves the server).

Everything else (health, metadata, config) is passed through unchanged. Not served: HTTP
``/generate`` and ``/generate_stream`` (Triton's generate extension), compressed or chunked HTTP
bodies, shared-memory inputs and gRPC ``ModelStreamInfer``.

Needs grpcio and tritonclient's protobufs (both come with the ``serve`` extra); imported lazily.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

import numpy as np

from engines.errors import AdpdmError

LOGGER = logging.getLogger("adpdm.serve")

NUMPY_DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
    "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_,
}
MAX_RANK = 8
MAX_BYTES_ELEMENT = 1024  # longest string a BYTES element may hold (scheduler names are short)
JSON_BYTES_PER_ELEMENT = 32  # worst case a number takes in JSON ("-1.2345678901234567e-300, ")
_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/(infer|generate|generate_stream)$")
_ADPDM_LINE = re.compile(r"AdpdmError: (.*?)(?:\\n|\n|$)")


class NotFound(AdpdmError):
    """An unknown model or endpoint (HTTP 404 / gRPC NOT_FOUND)."""


@dataclass(frozen=True)
class InputSpec:
    datatype: str  # Triton datatype ("FP32", "INT64", "BYTES")
    max_elements: int  # bound on prod(shape) of one request
    max_batch: Optional[int] = None  # bound on shape[0] (batched models)
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    inputs: Mapping[str, InputSpec]
    validate: Callable[[dict[str, np.ndarray]], None] = field(default=lambda arrays: None)

    def max_body_bytes(self) -> int:
        return 65536 + sum(JSON_BYTES_PER_ELEMENT * s.max_elements
                           + (s.max_elements * MAX_BYTES_ELEMENT if s.datatype == "BYTES" else 0)
                           for s in self.inputs.values())


def one_line(message: str) -> tuple[str, bool]:
    """(the line a client may see, whether it is the caller's fault) of a server-side error text."""
    found = _ADPDM_LINE.findall(message)
    if found:
        return found[-1].strip()[:500], True
    if "Traceback" in message or "File \"/" in message:
        return "internal server error (details are in the server log)", False
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    return (lines[0][:500] if lines else "internal server error"), False


class RequestGuard:
    """Checks one inference request (declared shapes first, then data and values) against `models`."""

    def __init__(self, models: Mapping[str, ModelSpec], max_body_bytes: Optional[int] = None):
        self.models = dict(models)
        self.max_body_bytes = int(max_body_bytes or max(m.max_body_bytes() for m in self.models.values()))

    def _spec(self, model: str) -> ModelSpec:
        if model not in self.models:
            raise NotFound(f"unknown model {model[:60]!r}: this server has {', '.join(self.models)}")
        return self.models[model]

    def check_declared(self, model: str, inputs: list[tuple[str, str, Any]]) -> list[tuple[int, ...]]:
        """Structure and sizes from the request header alone: (name, datatype, shape) per input."""
        spec = self._spec(model)
        seen, shapes = set(), []
        for name, datatype, shape in inputs:
            if not isinstance(name, str) or name not in spec.inputs:
                raise AdpdmError(f"unknown input {str(name)[:60]!r} for model {model}: it takes {', '.join(spec.inputs)}")
            if name in seen:
                raise AdpdmError(f"input {name!r} is given twice")
            seen.add(name)
            s = spec.inputs[name]
            if datatype != s.datatype:
                raise AdpdmError(f"input {name!r} must be {s.datatype}, got datatype {str(datatype)[:20]}")
            if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise AdpdmError(f"input {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers")
            shape = tuple(int(d) for d in shape)
            if s.max_batch is not None and shape and shape[0] > s.max_batch:
                raise AdpdmError(f"input {name!r}: batch of {shape[0]} is above the server's maximum batch {s.max_batch}")
            if math.prod(shape) > s.max_elements:
                raise AdpdmError(f"input {name!r}: shape {list(shape)} holds more than the {s.max_elements} values a request may send")
            shapes.append(shape)
        missing = [n for n, s in spec.inputs.items() if not s.optional and n not in seen]
        if missing:
            raise AdpdmError(f"missing input(s) {', '.join(repr(m) for m in missing)} for model {model}")
        return shapes

    def check_values(self, model: str, arrays: dict[str, np.ndarray]) -> None:
        try:
            self._spec(model).validate(arrays)
        except AdpdmError:
            raise
        except Exception as e:  # a validator bug must not leak a traceback either
            LOGGER.exception("request check failed")
            raise AdpdmError(f"request could not be checked ({type(e).__name__})") from None

    # ------------------------------------------------------------------ HTTP (KServe v2 JSON + binary extension)
    def check_http(self, model: str, body: bytes, header_length: Optional[int]) -> None:
        hl = len(body) if header_length is None else header_length
        if not 0 < hl <= len(body):
            raise AdpdmError("Inference-Header-Content-Length does not fit the body")
        try:
            header = json.loads(body[:hl])
        except (ValueError, UnicodeDecodeError):
            raise AdpdmError("request body is not valid JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise AdpdmError("request must be a JSON object with an 'inputs' list")
        raw = header["inputs"]
        if not all(isinstance(i, dict) for i in raw):
            raise AdpdmError("every entry of 'inputs' must be an object")
        shapes = self.check_declared(model, [(i.get("name"), i.get("datatype"), i.get("shape")) for i in raw])
        arrays, offset = {}, hl
        for inp, shape in zip(raw, shapes):
            name, datatype = inp["name"], inp["datatype"]
            params = inp.get("parameters") or {}
            if not isinstance(params, dict):
                raise AdpdmError(f"input {name!r}: parameters must be an object")
            if "shared_memory_region" in params:
                raise AdpdmError(f"input {name!r}: shared-memory inputs are not accepted by this server")
            if "binary_data_size" in params:
                size = params["binary_data_size"]
                if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(body):
                    raise AdpdmError(f"input {name!r}: binary_data_size does not fit the body")
                arrays[name] = _from_bytes(name, datatype, shape, body[offset:offset + size])
                offset += size
            elif "data" in inp:
                arrays[name] = _from_json(name, datatype, shape, inp["data"])
            else:
                raise AdpdmError(f"input {name!r} has no data")
        if offset != len(body):
            raise AdpdmError("the binary data does not add up to the body length")
        self.check_values(model, arrays)

    # ------------------------------------------------------------------ gRPC (ModelInferRequest)
    def check_grpc(self, request) -> None:
        model = request.model_name
        inputs = list(request.inputs)
        shapes = self.check_declared(model, [(i.name, i.datatype, list(i.shape)) for i in inputs])
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(inputs):
            raise AdpdmError(f"{len(raw)} raw_input_contents for {len(inputs)} inputs")
        arrays = {}
        for k, (inp, shape) in enumerate(zip(inputs, shapes)):
            if "shared_memory_region" in inp.parameters:
                raise AdpdmError(f"input {inp.name!r}: shared-memory inputs are not accepted by this server")
            if raw:
                arrays[inp.name] = _from_bytes(inp.name, inp.datatype, shape, raw[k])
            else:
                arrays[inp.name] = _from_contents(inp.name, inp.datatype, shape, inp.contents)
        self.check_values(model, arrays)


def _count(name: str, got: int, shape: tuple[int, ...]) -> None:
    if got != math.prod(shape):
        raise AdpdmError(f"input {name!r}: {got} values for shape {list(shape)}")


def _bytes_elements(name: str, buf: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise AdpdmError(f"input {name!r}: malformed BYTES data")
        n = int.from_bytes(buf[i:i + 4], "little")
        if n > MAX_BYTES_ELEMENT or i + 4 + n > len(buf):
            raise AdpdmError(f"input {name!r}: a BYTES element is longer than {MAX_BYTES_ELEMENT} bytes or malformed")
        out.append(buf[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _from_bytes(name: str, datatype: str, shape: tuple[int, ...], buf: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items = _bytes_elements(name, bytes(buf))
        _count(name, len(items), shape)
        return np.array(items, dtype=np.object_).reshape(shape)
    dt = np.dtype(NUMPY_DTYPES[datatype])
    if len(buf) != math.prod(shape) * dt.itemsize:
        raise AdpdmError(f"input {name!r}: {len(buf)} bytes of data for shape {list(shape)} ({datatype})")
    return np.frombuffer(buf, dtype=dt).reshape(shape).copy()


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    flat: list = []
    stack = [data]
    while stack:  # flatten nested lists without recursion
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            flat.append(v)
        if len(flat) > math.prod(shape):
            break
    _count(name, len(flat), shape)
    if datatype == "BYTES":
        if not all(isinstance(v, str) and len(v) <= MAX_BYTES_ELEMENT for v in flat):
            raise AdpdmError(f"input {name!r}: BYTES data must be strings of at most {MAX_BYTES_ELEMENT} characters")
        return np.array([v.encode() for v in flat], dtype=np.object_).reshape(shape)
    if not all(isinstance(v, (int, float)) for v in flat):
        raise AdpdmError(f"input {name!r}: data must be numbers")
    try:
        return np.array(flat, dtype=NUMPY_DTYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError):
        raise AdpdmError(f"input {name!r}: a value does not fit {datatype}") from None


_CONTENTS_FIELD = {
    "FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
    "INT16": "int_contents", "INT8": "int_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents", "BYTES": "bytes_contents",
}


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents) -> np.ndarray:
    field_name = _CONTENTS_FIELD.get(datatype)
    if field_name is None:
        raise AdpdmError(f"input {name!r}: {datatype} data must be sent as raw_input_contents")
    values = list(getattr(contents, field_name))
    _count(name, len(values), shape)
    if datatype == "BYTES":
        if any(len(v) > MAX_BYTES_ELEMENT for v in values):
            raise AdpdmError(f"input {name!r}: a BYTES element is longer than {MAX_BYTES_ELEMENT} bytes")
        return np.array(values, dtype=np.object_).reshape(shape)
    return np.array(values, dtype=NUMPY_DTYPES[datatype]).reshape(shape)


# --------------------------------------------------------------------------- HTTP front

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection",
               "proxy-authorization", "te", "trailer", "upgrade"}


class _HttpFrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, family, guard: RequestGuard, upstream_port: int):
        self.address_family = family
        self.guard, self.upstream_port = guard, upstream_port
        self._local = threading.local()
        self._conns: set = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _HttpHandler)

    def upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        """This handler thread's keep-alive connection to Triton."""
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                self.release(conn)
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=None)
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    def release(self, conn) -> None:
        conn.close()
        with self._conns_lock:
            self._conns.discard(conn)

    def close_upstreams(self) -> None:
        """Close every connection to Triton (an open one would hold up Triton's shutdown)."""
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.close()
            except OSError:
                pass


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "adpdm-serve"
    timeout = 300  # idle keep-alive connections are closed after this many seconds

    def log_message(self, fmt, *args):  # noqa: D401 - quiet; Triton logs requests itself
        LOGGER.debug("http %s - " + fmt, self.client_address[0], *args)

    def do_GET(self):
        self._handle()

    def finish(self):
        conn = getattr(self.server._local, "conn", None)  # type: ignore[attr-defined]
        if conn is not None:  # the client left: so does this thread's connection to Triton
            self.server.release(conn)  # type: ignore[attr-defined]
            self.server._local.conn = None  # type: ignore[attr-defined]
        super().finish()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        if close:
            self.close_connection = True
        self._reply(status, json.dumps({"error": message}).encode(), [("Content-Type", "application/json")]
                    + ([("Connection", "close")] if close else []))

    def _handle(self) -> None:
        srv: _HttpFrontServer = self.server  # type: ignore[assignment]
        guard = srv.guard
        if self.headers.get("Transfer-Encoding"):
            return self._error(411, "chunked request bodies are not accepted: send Content-Length", close=True)
        if (self.headers.get("Content-Encoding") or "identity").lower() != "identity":
            return self._error(415, "compressed request bodies are not accepted", close=True)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return self._error(400, "bad Content-Length", close=True)
        if length > guard.max_body_bytes:
            return self._error(413, f"request body of {length} bytes is above this server's limit of "
                                    f"{guard.max_body_bytes} bytes", close=True)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        m = _INFER_PATH.match(path)
        infer = m is not None
        if infer:
            if self.command != "POST":
                return self._error(405, "use POST for inference")
            if m.group(2) != "infer":
                return self._error(404, f"/{m.group(2)} is not served; use /infer")
            hl = self.headers.get("Inference-Header-Content-Length")
            try:
                guard.check_http(m.group(1), body, int(hl) if hl is not None else None)
            except NotFound as e:
                return self._error(404, str(e))
            except (AdpdmError, ValueError) as e:
                return self._error(400, str(e) if isinstance(e, AdpdmError) else "bad Inference-Header-Content-Length")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        resp = None
        for attempt in (0, 1):
            conn = srv.upstream(fresh=attempt > 0)
            try:
                conn.request(self.command, self.path, body=body if length else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                if attempt:
                    LOGGER.warning("upstream Triton: %s", e)
            except OSError as e:
                LOGGER.warning("upstream Triton: %s", e)
                break
        if resp is None:
            srv.upstream(fresh=True)
            return self._error(503, "the inference server is not available")
        out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        if infer and resp.status >= 400:
            try:
                message = str(json.loads(data).get("error", ""))
            except (ValueError, AttributeError):
                message = data.decode("utf-8", "replace")
            line, client_fault = one_line(message)
            if message != line:
                LOGGER.warning("model error (answered as one line): %s", message)
            status = 400 if client_fault else resp.status
            return self._error(status, line)
        self._reply(resp.status, data, out_headers)


class HttpFront:
    """HTTP listener on (host, port) that checks requests and forwards them to Triton on 127.0.0.1:upstream_port."""

    def __init__(self, host: str, port: int, guard: RequestGuard, upstream_port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.server = _HttpFrontServer((host, port), family, guard, upstream_port)
        except OSError as e:
            raise AdpdmError(f"cannot listen for HTTP on {host} port {port}: {e.strerror or e}") from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="adpdm-http-front", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self.server.close_upstreams()


# --------------------------------------------------------------------------- gRPC front

_SERVICE = "/inference.GRPCInferenceService/"


class GrpcFront:
    """gRPC listener on (host, port): ModelInfer is checked, other unary calls pass through to Triton."""

    def __init__(self, host: str, port: int, guard: RequestGuard, upstream_port: int, workers: int = 32):
        import concurrent.futures

        import grpc
        from tritonclient.grpc import service_pb2

        self._grpc, self._pb = grpc, service_pb2
        self.guard = guard
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{upstream_port}",
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adpdm-grpc-front"),
            handlers=[_make_handler(grpc, self)],
            options=[("grpc.max_receive_message_length", guard.max_body_bytes),
                     ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)],
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise AdpdmError(f"cannot listen for gRPC on {host} port {port}: {e}") from None
        if not self.port:
            raise AdpdmError(f"cannot listen for gRPC on {host} port {port}")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=1).wait(5)
        self.channel.close()

    def unary(self, method: str, request: bytes, context):
        grpc = self._grpc
        infer = method == _SERVICE + "ModelInfer"
        if infer:
            try:
                req = self._pb.ModelInferRequest.FromString(request)
                self.guard.check_grpc(req)
            except NotFound as e:
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except AdpdmError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Exception:  # undecodable message
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed ModelInferRequest")
        metadata = [(k, v) for k, v in context.invocation_metadata()
                    if not k.startswith(":") and k not in ("user-agent", "content-type", "te", "grpc-timeout")]
        remaining = context.time_remaining()
        try:
            return self.channel.unary_unary(method)(
                request, metadata=metadata, timeout=remaining if remaining and remaining < 1e8 else None
            )
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if infer:
                line, client_fault = one_line(details)
                if line != details:
                    LOGGER.warning("model error (answered as one line): %s", details)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT if client_fault else code, line)
            context.abort(code, details)

    def stream(self, request_iterator, context):
        context.abort(self._grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not served; use ModelInfer")


def _make_handler(grpc, front: GrpcFront):
    class _Handler(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            if not method.startswith(_SERVICE):
                return None
            if method == _SERVICE + "ModelStreamInfer":
                return grpc.stream_stream_rpc_method_handler(front.stream)
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: front.unary(method, req, ctx))

    return _Handler()
