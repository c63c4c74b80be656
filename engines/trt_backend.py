"""TensorRT runtime for a build: one runtime, one engine per group, one shared device-memory block, one stream.

Only one group runs at a time, so every group's execution context runs in ONE block of
scratch (activation) memory, sized by the largest `engine.device_memory_size`: contexts
are created with `ExecutionContextAllocationStrategy.USER_MANAGED` (TensorRT 10; older:
`create_execution_context_without_device_memory`) and handed the block's address. All
work goes to one CUDA stream, which orders the groups' use of the shared block.
Inputs and outputs are torch CUDA tensors (`set_tensor_address` + `execute_async_v3`).
Optionally one CUDA graph is captured per (group, input shapes) and replayed.

Engines are specific to the GPU model and TensorRT version they were built with: the
manifest records both, and loading on anything else is an AdpdmError that says to rebuild.
`TrtGroupEngines` is the runner's `GroupBackend` for builds with engines; its `InputSpec`
is the engines' optimization profile (batch, height and width ranges).
Written against the TensorRT 10 Python API; imported lazily (loads without TensorRT).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from engines.errors import AdpdmError
from engines.group_backend import InputSpec
from engines.manifest_schema import Manifest
from engines.ort_backend import OUTPUT_NAME
from engines.platform import gpu_identity, require_tensorrt


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, td in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if dt not in table:
        raise AdpdmError(f"engine I/O tensor has TensorRT type {dt}, which this runner does not handle")
    return table[dt]


def check_engine_platform(manifest: Manifest, trt_version: str, gpu_name: str, cc: str) -> None:
    """Refuse engines built with another TensorRT version or on another GPU model."""
    info = manifest.tensorrt
    if info is None:
        raise AdpdmError("this build has no TensorRT section in its manifest: run `adpdm build-engine --backend trt`")
    problems = []
    if info.tensorrt_version != trt_version:
        problems.append(f"TensorRT {info.tensorrt_version} (this machine: {trt_version})")
    if info.compute_capability != cc or info.gpu_name != gpu_name:
        problems.append(f"GPU {info.gpu_name}, compute capability {info.compute_capability} (this machine: {gpu_name}, {cc})")
    if problems:
        raise AdpdmError(
            "the TensorRT engines in this build were made for " + " and ".join(problems)
            + ": engines only run where they were built; rebuild them here with `adpdm build-engine` "
            "(or run with backend='ort')"
        )


class _Graphed:
    """A captured CUDA graph with its static input/output buffers."""

    def __init__(self, graph, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class TrtGroupEngines:
    """Group engines of a TensorRT build; `run(k, feeds)` runs group k on torch CUDA tensors (a `GroupBackend`)."""

    name = "trt"
    target = None  # engines, not ONNX graphs

    def __init__(self, manifest: Manifest, *, cuda_graphs: bool = False, device: Optional[int] = None, check_platform: bool = True):
        trt = require_tensorrt()  # one AdpdmError line where TensorRT or a GPU is missing
        self.trt = trt
        if device is not None:
            torch.cuda.set_device(device)
        self.device = torch.device("cuda", torch.cuda.current_device())
        name, cc = gpu_identity(self.device.index)
        if check_platform:
            check_engine_platform(manifest, str(trt.__version__), name, cc)
        self.manifest = manifest
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = []
        for path in manifest.engine_paths():
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise AdpdmError(
                    f"TensorRT could not load {path.name} (built with another TensorRT version or for another GPU?): "
                    "rebuild the engines with `adpdm build-engine`"
                )
            self.engines.append(engine)
        sizes = [self._device_memory_size(e) for e in self.engines]
        self.device_memory_size = max(sizes) if sizes else 0
        # one block for every context; torch's allocator aligns to >= 256 bytes, as TensorRT requires
        self.device_memory = torch.empty(max(self.device_memory_size, 1), dtype=torch.uint8, device=self.device)
        self.contexts = [self._context(e) for e in self.engines]
        self.stream = torch.cuda.Stream(device=self.device)
        self.io = []
        for e in self.engines:
            names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
            inputs = {n: _torch_dtype(trt, e.get_tensor_dtype(n)) for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
            outputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if outputs != [OUTPUT_NAME]:
                raise AdpdmError(f"engine outputs are {outputs}, expected ['{OUTPUT_NAME}']")
            self.io.append((inputs, _torch_dtype(trt, e.get_tensor_dtype(OUTPUT_NAME))))
        self.input_names = list(self.io[0][0]) if self.io else []
        p = manifest.tensorrt.optimization_profile  # type: ignore[union-attr]
        self.input_spec = InputSpec(
            names=tuple(self.input_names),
            batch=(p.batch[0], p.batch[2]),
            height=(p.height[0], p.height[2]),
            width=(p.width[0], p.width[2]),
            sequence_length=p.sequence_length or None,
        )
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: dict[tuple, _Graphed] = {}

    # --------------------------------------------------------------- TensorRT version shims
    @staticmethod
    def _device_memory_size(engine) -> int:
        v2 = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
        return int(v2 if v2 is not None else engine.device_memory_size)

    def _context(self, engine):
        trt = self.trt
        if hasattr(trt, "ExecutionContextAllocationStrategy"):
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            ctx = engine.create_execution_context_without_device_memory()
        if ctx is None:
            raise AdpdmError("TensorRT could not create an execution context (out of GPU memory?)")
        ptr = self.device_memory.data_ptr()
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
            ctx.set_device_memory(ptr, self.device_memory.numel())
        else:
            ctx.device_memory = ptr
        return ctx

    # --------------------------------------------------------------- running
    def _prepare(self, k: int, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, _ = self.io[k]
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise AdpdmError(f"engine of group {k} needs input(s) {missing}")
        return {n: feeds[n].to(device=self.device, dtype=dt).contiguous() for n, dt in inputs.items()}

    def _set_shapes(self, ctx, k: int, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        for n, t in tensors.items():
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise AdpdmError(f"input {n} of shape {tuple(t.shape)} is outside the engine's optimization profile")
        return tuple(ctx.get_tensor_shape(OUTPUT_NAME))

    @staticmethod
    def _set_addresses(ctx, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        for n, t in tensors.items():
            ctx.set_tensor_address(n, t.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())

    def _execute(self, ctx, k: int) -> None:
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise AdpdmError(f"TensorRT failed to run the engine of group {k} (see the TensorRT log)")

    def run(self, k: int, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Group k on `feeds` (torch tensors, any device); returns a float32 CUDA tensor.

        Runs on the backend's stream, ordered after the caller's current stream (which
        produced the inputs) and before it (which reads the output).
        """
        caller = torch.cuda.current_stream(self.device)
        tensors = self._prepare(k, feeds)  # copies/casts on the caller's stream
        if self.cuda_graphs:
            return self._run_graphed(k, tensors, caller)
        ctx = self.contexts[k]
        out = torch.empty(self._set_shapes(ctx, k, tensors), dtype=self.io[k][1], device=self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            self._set_addresses(ctx, tensors, out)
            self._execute(ctx, k)
        for t in (*tensors.values(), out):
            t.record_stream(self.stream)  # allocated on the caller's stream, used on ours
        caller.wait_stream(self.stream)
        return out.float()

    def _run_graphed(self, k: int, tensors: Mapping[str, torch.Tensor], caller) -> torch.Tensor:
        """Replay (capturing on first use) a CUDA graph for group k at these input shapes.

        Each captured graph gets its own execution context, never touched after capture
        (TensorRT: the context must not change between capture and replay); all of them
        still share the one device-memory block, which the single stream keeps safe.
        """
        key = (k, *((n, tuple(t.shape)) for n, t in tensors.items()))
        g = self._graphs.get(key)
        if g is None:
            ctx = self._context(self.engines[k])
            static = {n: t.clone() for n, t in tensors.items()}
            out = torch.empty(self._set_shapes(ctx, k, static), dtype=self.io[k][1], device=self.device)
            self._set_addresses(ctx, static, out)
            torch.cuda.synchronize(self.device)
            self._execute(ctx, k)  # one run before capture: TensorRT finishes shape-dependent setup
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute(ctx, k)
            g = self._graphs[key] = _Graphed(graph, static, out)
            g.context = ctx  # type: ignore[attr-defined]
        else:
            for n, t in tensors.items():
                g.inputs[n].copy_(t)  # on the caller's stream
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            g.graph.replay()
        caller.wait_stream(self.stream)
        return g.output.float().clone()

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self.contexts.clear()
        self.engines.clear()
