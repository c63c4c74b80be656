"""`adpdm serve`: a build folder's runner on Triton Inference Server, through PyTriton.

Two Triton models:

- ``unet``: one noise prediction, ``(sample, timestep[, class_labels | encoder_hidden_states[, text_embeds, time_ids]])
  -> out_sample``, with Triton's dynamic batcher. Requests at *different* timesteps are
  batched together; `TimestepDispatchRunner` splits each batch by timestep group and
  reassembles it, so each request gets exactly what it would get alone.
- ``generate``: ``(seed, n, steps[, scheduler, class_labels | encoder_hidden_states]) -> images``:
  the whole sampling loop (the build manifest's scheduler config) runs in the server, no
  step crosses the network. ``images`` are in model space ([-1, 1], (n, C, H, W) float32);
  `engines.images.to_uint8` turns them into pixels. Same seed, same images as
  `generate_images` in process. A build of a text-to-image pipeline (the manifest's model
  source, or `pipeline=`) also takes ``prompt[, negative_prompt, guidance_scale]`` instead of
  ``encoder_hidden_states``: the pipeline's text encoder, the guided loop (2n runner items per
  step) and its VAE all run in the server (`engines.text_pipeline`, the same code as
  `adpdm sample --prompt`); its images are the VAE's pixels, and ``notes`` says when a prompt was
  truncated to the tokenizer's limit.

Safe defaults: the user's HTTP and gRPC ports (127.0.0.1 unless told otherwise; a host name
is resolved, `localhost` -> 127.0.0.1; anything but loopback needs allow_remote) are served by
the fronts of `engines.serving_guard`; Triton itself listens on loopback ports of its own.
The fronts bound the body size and every input's declared shape before decoding data (the
bundled Triton 2.51 has no size limit and aborts on a huge declared JSON shape), check each
request's values with the models' own checks (`UnetModel.check`, `GenerateModel.parse`), and
answer a bad request alone with HTTP 400 / gRPC INVALID_ARGUMENT and one line: PyTriton
reports an error raised by a model callable for the whole executed batch (HTTP 500, full
traceback), so a bad value must never reach the dynamic batcher. Ports are checked (range,
distinct, free) before anything starts. n, steps, batch and sequence length are bounded
(`ServeLimits`). Metrics are served by Triton directly (GET only). Stop: `stop()` / SIGINT /
SIGTERM, with a short exit timeout (an open client connection otherwise stretches shutdown).

PyTriton (and grpcio) are optional dependencies (extra ``serve``): this module imports them
only inside `AdpdmServer.start`, so the rest (`generate_images`, `ServeLimits`) works without.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from engines.conditioning import ADDED_COND_INPUTS, check_time_ids, request_added_conditions
from engines.errors import AdpdmError

LOGGER = logging.getLogger("adpdm.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
UNET_MODEL = "unet"
GENERATE_MODEL = "generate"
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ServeLimits:
    """Bounds every request is checked against (defaults sized for a CPU server)."""

    max_batch: int = 16  # unet: Triton max_batch_size (items per executed batch and per request)
    max_queue_delay_us: int = 2000  # unet: how long the dynamic batcher waits to fill a batch
    max_n: int = 16  # generate: images per request
    max_steps: int = 250  # generate: sampling steps per request
    max_sequence_length: int = 256  # encoder_hidden_states tokens
    exit_timeout_s: int = 3  # how long stop() waits for in-flight requests

    def __post_init__(self):
        for name in ("max_batch", "max_n", "max_steps", "max_sequence_length", "exit_timeout_s"):
            if int(getattr(self, name)) < 1:
                raise AdpdmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise AdpdmError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_host(host: str) -> str:
    """The IP address to bind for `host`: an IP as given, a name resolved (localhost -> 127.0.0.1)."""
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host:
        raise AdpdmError("--host is empty: give an IP address or a host name (default 127.0.0.1)")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AdpdmError(f"--host {host[:100]!r} does not resolve to an address ({getattr(e, 'strerror', None) or e})") from None
    addrs = [i[4][0] for i in infos if i[0] == socket.AF_INET] or [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    if not addrs:
        raise AdpdmError(f"--host {host[:100]!r} does not resolve to an IPv4 or IPv6 address")
    return addrs[0]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on `host` right now (for tests and tools)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_ports(host: str, ports: Mapping[str, int]) -> None:
    """Each port in 1..65535 (0: any free port), distinct, and free on `host` now; else one line."""
    for name, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise AdpdmError(f"--{name}-port must be in 1..65535 (0: any free port), got {port}")
    given = [p for p in ports.values() if p]
    if len(set(given)) != len(given):
        raise AdpdmError(f"--http-port, --grpc-port and --metrics-port must differ, got {', '.join(map(str, ports.values()))}")
    for name, port in ports.items():
        if not port:
            continue
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise AdpdmError(f"--{name}-port {port} on {host}: {why}") from None


def python_libdir_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """`env` with this interpreter's LIBDIR first on LD_LIBRARY_PATH.

    Triton's Python backend stub links libpython3.X dynamically; without this it may load
    a different installation's libpython (pyenv, conda, system) than the venv's and crash
    or fail to import the venv's packages.
    """
    env = dict(os.environ if env is None else env)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        if libdir not in parts:
            env["LD_LIBRARY_PATH"] = ":".join([libdir, *parts])
    return env


# --------------------------------------------------------------------------- the sampling loop


def generate_images(
    runner,
    seed: int,
    n: int,
    steps: int,
    scheduler: str = "ddim",
    cond: Optional[Mapping[str, Any]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[Mapping[str, Any]] = None,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """The `generate` model's computation, in process: (n, C, H, W) float32 in model space.

    The initial noise is `initial_noise(n, runner.sample_shape, seed)` and the scheduler is
    built from the build manifest's scheduler config, so the server and this function give
    the same images for the same arguments. guidance_scale > 1 with `uncond`: classifier-free
    guidance; decode: latents -> images (a text pipeline's VAE).
    """
    from engines.sampler import initial_noise, sample
    from engines.scheduling import make_scheduler

    sched = make_scheduler(runner.manifest.scheduler, scheduler)
    noise = initial_noise(int(n), runner.sample_shape, int(seed))
    images = sample(runner, sched, noise, int(steps), cond=dict(cond or {}), seed=int(seed),
                    guidance_scale=guidance_scale, uncond=uncond).images
    return images if decode is None else decode(images)


# --------------------------------------------------------------------------- model callables


def _scalar(req: Mapping[str, np.ndarray], name: str, lo: int, hi: int) -> int:
    v = np.asarray(req[name])
    if v.size != 1:
        raise AdpdmError(f"{name} must hold exactly one value, got shape {tuple(v.shape)}")
    x = int(v.reshape(-1)[0])
    if not lo <= x <= hi:
        raise AdpdmError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


class BatchStats:
    """Executed batch sizes of the unet model (items per runner call) and groups per batch."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batch_sizes: collections.Counter = collections.Counter()
        self.groups_per_batch: collections.Counter = collections.Counter()

    def record(self, items: int, groups: int) -> None:
        with self._lock:
            self.batch_sizes[items] += 1
            self.groups_per_batch[groups] += 1


class UnetModel:
    """The ``unet`` model callable: a list of Triton requests -> one runner call -> split."""

    def __init__(self, runner, limits: ServeLimits, stats: Optional[BatchStats] = None):
        self.runner, self.limits = runner, limits
        self.cond_names = tuple(runner.cond_names)
        self.stats = stats or BatchStats()

    def check(self, req: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One request's inputs, checked (shape, NaN/inf, timestep range, conditioning) and normalized."""
        for name in ("sample", "timestep", *self.cond_names):
            if name not in req:
                raise AdpdmError(f"missing input {name!r}: this model needs sample, timestep"
                                 + "".join(f", {n}" for n in self.cond_names))
        x = torch.from_numpy(np.ascontiguousarray(req["sample"]))
        t = torch.from_numpy(np.ascontiguousarray(req["timestep"])).reshape(-1)
        cond = {}
        for name in self.cond_names:
            v = torch.from_numpy(np.ascontiguousarray(req[name]))
            cond[name] = v.reshape(-1) if name == "class_labels" else v
        checked = self.runner.check_inputs(x, t, **cond)
        if "time_ids" in checked[2]:
            check_time_ids(checked[2]["time_ids"])
        return checked

    def validate(self, req: Mapping[str, np.ndarray]) -> None:
        self.check(req)

    def _one(self, i: int, req: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        try:
            return self.check(req)
        except AdpdmError as e:
            raise AdpdmError(f"request {i} of the batch: {e}") from None

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        checked = [self._one(i, r) for i, r in enumerate(requests)]
        sizes = [c[0].shape[0] for c in checked]
        x = torch.cat([c[0] for c in checked])
        t = torch.cat([c[1] for c in checked])
        cond = {n: torch.cat([c[2][n] for c in checked]) for n in self.cond_names}
        if x.shape[0] > self.limits.max_batch:  # Triton already bounds this; belt and braces
            raise AdpdmError(f"batch of {x.shape[0]} items is above --max-batch {self.limits.max_batch}")
        self.stats.record(int(x.shape[0]), int(torch.unique(self.runner.group_of(t)).numel()))
        y = self.runner(x, t, **cond).numpy()
        out, start = [], 0
        for b in sizes:
            out.append({"out_sample": y[start:start + b]})
            start += b
        return out


@dataclass
class GenerateRequest:
    """One `generate` request, checked: what `generate_images` takes, and the prompt (None: none)."""

    seed: int
    n: int
    steps: int
    scheduler: str
    cond: dict[str, torch.Tensor]
    prompt: Any = None  # engines.text_pipeline.PromptRequest


class GenerateModel:
    """The ``generate`` model callable: the sampling loop in the server (one request at a time).

    text: the build's text pipeline (`engines.text_pipeline.TextPipeline`), or None: prompts are
    refused in one line and `images` are what the UNet samples (latents of a latent pipeline).
    """

    def __init__(self, runner, limits: ServeLimits, text=None, no_text_reason: str = ""):
        from engines.scheduling import SCHEDULERS

        self.runner, self.limits, self.text = runner, limits, text
        self.schedulers = tuple(SCHEDULERS)
        self.cond_names = tuple(runner.cond_names)
        self.no_text_reason = no_text_reason or "this build's UNet takes no text (it is not of a text-to-image pipeline)"

    def parse(self, req: Mapping[str, np.ndarray]) -> GenerateRequest:
        """One request checked (values, limits, the prompt's text and guidance), before anything runs."""
        from engines.text_pipeline import PROMPT_INPUTS, TEXT_INPUT, prompt_request

        L = self.limits
        prompt = prompt_request(req)
        if prompt is not None and self.text is None:
            raise AdpdmError(f"prompt given, but {self.no_text_reason}")
        for name in ("seed", "n", "steps", *[c for c in self.cond_names if c not in ADDED_COND_INPUTS]):
            if name == TEXT_INPUT and prompt is not None:
                if name in req:
                    raise AdpdmError(f"give prompt or {TEXT_INPUT}, not both")
                continue
            if name not in req:
                raise AdpdmError(f"missing input {name!r}" + (" (or give a prompt)" if name == TEXT_INPUT and self.text
                                                               else ""))
        seed = _scalar(req, "seed", 0, MAX_SEED)
        n = _scalar(req, "n", 1, L.max_n)
        steps = _scalar(req, "steps", 1, L.max_steps)
        scheduler = "ddim"
        if "scheduler" in req:
            v = np.asarray(req["scheduler"]).reshape(-1)
            if v.size != 1:
                raise AdpdmError(f"scheduler must hold one string, got {v.size}")
            s = v[0]
            scheduler = s.decode("utf-8", "replace") if isinstance(s, (bytes, np.bytes_)) else str(s)
            if scheduler not in self.schedulers:
                raise AdpdmError(f"unknown scheduler {scheduler[:40]!r}: choose one of {', '.join(self.schedulers)}")
        cond: dict[str, torch.Tensor] = request_added_conditions(self.runner.cond_specs, req, n, prompt is not None)
        for name in self.cond_names:
            if name not in req or name in ADDED_COND_INPUTS:
                continue  # the prompt's embeddings, made in run(); the added conditions, above
            v = torch.from_numpy(np.ascontiguousarray(req[name]))
            if name == "class_labels":
                v = v.reshape(-1)
                if v.numel() not in (1, n):
                    raise AdpdmError(f"class_labels has {v.numel()} values for n={n} (give 1 or n)")
                v = v.expand(n).clone() if v.numel() == 1 else v
            else:
                if v.dim() == 2:
                    v = v.unsqueeze(0)
                if v.dim() != 3 or v.shape[0] not in (1, n):
                    raise AdpdmError(f"encoder_hidden_states must be (1 or n={n}, sequence, dim), got {tuple(v.shape)}")
                if v.shape[1] > L.max_sequence_length:
                    raise AdpdmError(f"encoder_hidden_states has {v.shape[1]} tokens, above {L.max_sequence_length}")
                v = v.expand(n, -1, -1).contiguous() if v.shape[0] == 1 else v
            cond[name] = v
        # Check the conditioning (and NaN) and the batch the runner will see once, before `steps` steps:
        # with guidance every step is one runner call of 2n items.
        items = 2 * n if prompt is not None and prompt.guidance_scale > 1.0 else n
        check = {k: v.repeat_interleave(items // n, 0) for k, v in cond.items()}
        if prompt is not None:  # the shapes the encoder(s) will give
            specs = self.runner.cond_specs
            check[TEXT_INPUT] = torch.zeros((items, self.text.text_encoder.max_length, int(specs[TEXT_INPUT]["dim"])))
            for name in PROMPT_INPUTS[1:]:
                if name in specs:
                    check[name] = torch.zeros((items, int(specs[name]["dim"])))
        C, H, W = self.runner.sample_shape
        self.runner.check_inputs(torch.zeros((items, C, H, W)), torch.zeros(items, dtype=torch.int64), **check)
        return GenerateRequest(seed, n, steps, scheduler, cond, prompt)

    def validate(self, req: Mapping[str, np.ndarray]) -> None:
        self.parse(req)

    def run(self, r: GenerateRequest) -> tuple[torch.Tensor, list[str]]:
        """(images, notes) of a checked request: the prompt encoded, the guided loop, the VAE (text builds)."""
        from engines.text_pipeline import guided_conditions

        cond, uncond, scale, notes = r.cond, None, 1.0, []
        if r.prompt is not None:
            g = guided_conditions(self.text.text_encoder, r.prompt, r.n, r.cond)
            cond, uncond, scale, notes = g.cond, g.uncond, g.guidance_scale, g.notes
            for note in notes:
                LOGGER.warning("generate: %s", note)
        decode = None if self.text is None else self.text.decode
        images = generate_images(self.runner, r.seed, r.n, r.steps, r.scheduler, cond, scale, uncond, decode)
        return images, notes

    def _one(self, req: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, notes = self.run(self.parse(req))
        out = {"images": images.numpy().astype(np.float32)}
        if self.text is not None:
            out["notes"] = np.array(["; ".join(notes).encode()], dtype=np.object_)
        return out

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [self._one(r) for r in requests]


# --------------------------------------------------------------------------- the server


class AdpdmServer:
    """A build folder served by Triton (PyTriton): models ``unet`` and ``generate``.

    Usage::

        with AdpdmServer("runs/reference/build") as server:   # starts, returns when ready
            print(server.http_url, server.grpc_url)
            ...                                                 # serve requests
        # or: AdpdmServer(build).serve_forever()                # blocks until SIGINT/SIGTERM

    runner: an existing `TimestepDispatchRunner` to serve (else one is made from `build`).
    pipeline: where `generate` finds a text pipeline's text encoder and VAE: "auto" (the pipeline
    folder the build was made from, the manifest's model source, where it is one), a folder (a
    moved pipeline), or None (no prompts).
    host: address for HTTP, gRPC and metrics; anything but loopback needs allow_remote=True.
    Port 0 picks a free port.
    """

    def __init__(
        self,
        build: Any = None,
        *,
        runner=None,
        backend: str = "auto",
        threads: Optional[int] = None,
        host: str = DEFAULT_HOST,
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        limits: ServeLimits = ServeLimits(),
        allow_remote: bool = False,
        log_verbose: int = 0,
        pipeline: Any = "auto",
    ):
        address = resolve_host(host)
        if not is_loopback(address) and not allow_remote:
            named = host if host == address else f"{host} ({address})"
            raise AdpdmError(
                f"refusing to listen on {named}: the server has no authentication; pass allow_remote=True "
                f"(`adpdm serve --host {host} --allow-remote`) to bind to a non-loopback address"
            )
        check_ports(address, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
        if runner is None:
            if build is None:
                raise AdpdmError("give a build folder or a runner")
            from engines.runner import TimestepDispatchRunner

            runner = TimestepDispatchRunner(build, backend=backend, threads=threads)
            self._own_runner = True
        else:
            self._own_runner = False
        self.runner = runner
        self.limits = limits
        if runner.max_batch is not None and limits.max_batch > runner.max_batch:
            raise AdpdmError(
                f"--max-batch {limits.max_batch} is above the largest batch the TensorRT engines take ({runner.max_batch})"
            )
        self.text, self.no_text_reason = self._text_pipeline(pipeline)
        self.host = address
        self.ports = {
            "http": http_port or free_port(address),
            "grpc": grpc_port or free_port(address),
            "metrics": metrics_port or free_port(address),
        }
        self._internal_ports: dict[str, int] = {}
        self._fronts: list = []
        self.log_verbose = int(log_verbose)
        self.stats = BatchStats()
        self._triton = None
        self._lock = threading.Lock()

    def _text_pipeline(self, pipeline: Any):
        """(the build's TextPipeline or None, why there is none) for `pipeline` (see the class doc)."""
        from engines.text_pipeline import TEXT_INPUT, load_build_pipeline, pipeline_of_build

        m = self.runner.manifest
        if pipeline is None or pipeline is False:
            return None, "this server was started without a text pipeline"
        if isinstance(pipeline, str) and pipeline == "auto":
            if TEXT_INPUT not in m.model.conditioning:
                return None, ""
            try:
                folder = pipeline_of_build(m)
            except AdpdmError as e:
                LOGGER.warning("generate serves no prompts: %s; pass the pipeline folder (--pipeline DIR)", e)
                return None, f"this server has no text encoder ({m.model.source} is not a pipeline folder here)"
            return load_build_pipeline(m, folder), ""
        return load_build_pipeline(m, pipeline), ""

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self._url_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._url_host}:{self.ports['metrics']}/metrics"

    @property
    def _url_host(self) -> str:
        if self.host == "0.0.0.0":
            return "127.0.0.1"
        if self.host == "::":
            return "[::1]"
        return f"[{self.host}]" if ":" in self.host else self.host

    # ------------------------------------------------------------------ model configs
    def _tensors(self):
        from pytriton.model_config import Tensor

        C, H, W = self.runner.sample_shape
        specs = self.runner.cond_specs
        unet_in = [
            Tensor(name="sample", dtype=np.float32, shape=(C, H, W)),
            Tensor(name="timestep", dtype=np.int64, shape=(1,)),
        ]
        gen_in = [
            Tensor(name="seed", dtype=np.int64, shape=(1,)),
            Tensor(name="n", dtype=np.int64, shape=(1,)),
            Tensor(name="steps", dtype=np.int64, shape=(1,)),
            Tensor(name="scheduler", dtype=bytes, shape=(1,), optional=True),
        ]
        gen_out = [Tensor(name="images", dtype=np.float32, shape=(-1, C, H, W))]
        if self.text is not None:  # a text pipeline: prompts, and the VAE's images
            gen_in += [Tensor(name="prompt", dtype=bytes, shape=(1,), optional=True),
                       Tensor(name="negative_prompt", dtype=bytes, shape=(1,), optional=True),
                       Tensor(name="guidance_scale", dtype=np.float64, shape=(1,), optional=True)]
            gen_out = [Tensor(name="images", dtype=np.float32, shape=(-1, *self.text.image_shape((C, H, W)))),
                       Tensor(name="notes", dtype=bytes, shape=(1,))]
        if "class_labels" in specs:
            unet_in.append(Tensor(name="class_labels", dtype=np.int64, shape=(1,)))
            gen_in.append(Tensor(name="class_labels", dtype=np.int64, shape=(-1,)))
        if "encoder_hidden_states" in specs:
            D = int(specs["encoder_hidden_states"]["dim"])
            unet_in.append(Tensor(name="encoder_hidden_states", dtype=np.float32, shape=(-1, D)))
            gen_in.append(Tensor(name="encoder_hidden_states", dtype=np.float32, shape=(-1, -1, D),
                                 optional=self.text is not None))
        for name in ADDED_COND_INPUTS:  # SDXL: text_embeds (P,), time_ids (6,) per item
            if name in specs:
                P = int(specs[name]["dim"])
                unet_in.append(Tensor(name=name, dtype=np.float32, shape=(P,)))
                gen_in.append(Tensor(name=name, dtype=np.float32, shape=(-1, P),
                                     optional=name == "time_ids" or self.text is not None))
        unet_out = [Tensor(name="out_sample", dtype=np.float32, shape=(C, H, W))]
        return unet_in, unet_out, gen_in, gen_out

    def request_guard(self, unet: "UnetModel", generate: "GenerateModel"):
        """What the HTTP/gRPC fronts check before Triton sees a request (`engines.serving_guard`)."""
        from engines.serving_guard import InputSpec, ModelSpec, RequestGuard

        L = self.limits
        C, H, W = self.runner.sample_shape
        specs = self.runner.cond_specs
        B, N, S = L.max_batch, L.max_n, L.max_sequence_length
        unet_in = {
            "sample": InputSpec("FP32", B * C * H * W, max_batch=B),
            "timestep": InputSpec("INT64", B, max_batch=B),
        }
        gen_in = {
            "seed": InputSpec("INT64", 1),
            "n": InputSpec("INT64", 1),
            "steps": InputSpec("INT64", 1),
            "scheduler": InputSpec("BYTES", 1, optional=True),
            # every build's front knows the prompt inputs, so a prompt sent to a build without a text
            # encoder gets GenerateModel's one line ("prompt given, but ...") rather than "unknown input"
            "prompt": InputSpec("BYTES", 1, optional=True),
            "negative_prompt": InputSpec("BYTES", 1, optional=True),
            "guidance_scale": InputSpec("FP64", 1, optional=True),
        }
        if "class_labels" in specs:
            unet_in["class_labels"] = InputSpec("INT64", B, max_batch=B)
            gen_in["class_labels"] = InputSpec("INT64", N)
        if "encoder_hidden_states" in specs:
            D = int(specs["encoder_hidden_states"]["dim"])
            unet_in["encoder_hidden_states"] = InputSpec("FP32", B * S * D, max_batch=B)
            gen_in["encoder_hidden_states"] = InputSpec("FP32", N * S * D, optional=self.text is not None)
        for name in ADDED_COND_INPUTS:
            if name in specs:
                P = int(specs[name]["dim"])
                unet_in[name] = InputSpec("FP32", B * P, max_batch=B)
                gen_in[name] = InputSpec("FP32", N * P, optional=name == "time_ids" or self.text is not None)
        return RequestGuard({
            UNET_MODEL: ModelSpec(unet_in, unet.validate),
            GENERATE_MODEL: ModelSpec(gen_in, generate.validate),
        })

    def _triton_config(self):
        from pytriton.triton import TritonConfig

        # Triton itself listens on loopback ports of its own; the user's HTTP and gRPC ports are
        # served by the fronts (engines.serving_guard), which check every request first.
        return TritonConfig(
            http_address="127.0.0.1",
            grpc_address="127.0.0.1",
            metrics_address=self.host,
            http_port=self._internal_ports["http"],
            grpc_port=self._internal_ports["grpc"],
            metrics_port=self.ports["metrics"],
            exit_timeout_secs=self.limits.exit_timeout_s,
            log_verbose=self.log_verbose,
        )

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "AdpdmServer":
        """Start Triton and load both models; returns when they are ready."""
        try:
            from pytriton.exceptions import PyTritonError
            from pytriton.model_config import DynamicBatcher, ModelConfig
            from pytriton.triton import Triton

            from engines.serving_guard import GrpcFront, HttpFront
        except ImportError as e:
            raise AdpdmError(
                f"serving needs PyTriton ({e}): pip install 'adpdm-export[serve]' "
                f"(nvidia-pytriton; it needs numpy<2)"
            ) from None
        with self._lock:
            if self._triton is not None:
                return self
            os.environ.update(python_libdir_env())  # Triton and the backend stub inherit it
            unet_in, unet_out, gen_in, gen_out = self._tensors()
            unet = UnetModel(self.runner, self.limits, self.stats)
            generate = GenerateModel(self.runner, self.limits, self.text, self.no_text_reason)
            guard = self.request_guard(unet, generate)
            self._internal_ports = {"http": free_port("127.0.0.1"), "grpc": free_port("127.0.0.1")}
            fronts = []
            try:  # bind the user's ports first: a port taken since __init__ fails here, in one line
                fronts.append(HttpFront(self.host, self.ports["http"], guard, self._internal_ports["http"]))
                fronts.append(GrpcFront(self.host, self.ports["grpc"], guard, self._internal_ports["grpc"]))
            except BaseException:
                for f in fronts:
                    f.stop()
                raise
            triton = Triton(config=self._triton_config())
            try:
                triton.bind(
                    model_name=UNET_MODEL,
                    infer_func=unet,
                    inputs=unet_in,
                    outputs=unet_out,
                    config=ModelConfig(
                        max_batch_size=self.limits.max_batch,
                        batcher=DynamicBatcher(max_queue_delay_microseconds=self.limits.max_queue_delay_us),
                    ),
                    strict=True,
                )
                triton.bind(
                    model_name=GENERATE_MODEL,
                    infer_func=generate,
                    inputs=gen_in,
                    outputs=gen_out,
                    config=ModelConfig(max_batch_size=0, batching=False),
                    strict=True,
                )
                triton.run()
            except BaseException as e:
                triton.stop()
                for f in fronts:
                    f.stop()
                if isinstance(e, PyTritonError):
                    raise AdpdmError(f"Triton Inference Server did not start: {str(e).strip().splitlines()[0][:300]}") from None
                raise
            for f in fronts:
                f.start()
            self._triton, self._fronts = triton, fronts
        LOGGER.info("serving %s on %s and %s", self.runner, self.http_url, self.grpc_url)
        return self

    def is_alive(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def stop(self) -> None:
        """Stop Triton (waits at most limits.exit_timeout_s for in-flight requests)."""
        with self._lock:
            triton, self._triton = self._triton, None
            fronts, self._fronts = self._fronts, []
        for f in fronts:
            f.stop()
        if triton is not None:
            triton.stop()

    def close(self) -> None:
        self.stop()
        if self._own_runner:
            self.runner.close()

    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Start (if needed) and block until SIGINT/SIGTERM or until Triton dies; then stop."""
        done = threading.Event()
        old = {}

        def handler(signum, frame):
            LOGGER.info("signal %s: stopping", signum)
            done.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        try:
            self.start()
            while not done.wait(poll_s):
                if not self.is_alive():
                    raise AdpdmError("Triton Inference Server stopped unexpectedly (see the log above)")
        finally:
            self.close()
            for sig, h in old.items():
                signal.signal(sig, h)

    def __enter__(self) -> "AdpdmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
