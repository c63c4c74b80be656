"""A small client for `adpdm serve` (and for the `export-triton` repository): tritonclient, HTTP or gRPC.

    from engines.serving_client import AdpdmClient
    with AdpdmClient("http://127.0.0.1:8000") as c:        # or "grpc://127.0.0.1:8001"
        eps = c.predict(sample, timestep)                   # model "unet": (B, C, H, W) float32
        images = c.generate(seed=0, n=4, steps=50)          # model "generate": (n, C, H, W) in [-1, 1]
        images = c.generate(seed=0, n=4, steps=50, prompt="a red fox", guidance_scale=7.5)  # text builds
        c.notes                                             # e.g. the prompt was truncated

Server-side errors (bad shapes, dtypes, values, limits) come back as one `AdpdmError`
line; the server's traceback is dropped. So do a server that does not answer (connection
refused) and a request past `timeout_s`. Needs only `tritonclient[http,grpc]`, not PyTriton.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from engines.errors import AdpdmError

_TRITON_DTYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
_ADPDM_LINE = re.compile(r"AdpdmError: (.*?)(?:\\n|\n|$)")


def error_message(exc: BaseException) -> str:
    """The useful line of a Triton error: our AdpdmError message, else Triton's own (first line)."""
    text = str(getattr(exc, "message", lambda: None)() or exc)
    found = _ADPDM_LINE.findall(text)
    if found:
        return found[-1].strip()
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:500]


def _triton_dtype(a: np.ndarray) -> str:
    if a.dtype.kind in ("S", "O", "U"):
        return "BYTES"
    try:
        return _TRITON_DTYPES[a.dtype]
    except KeyError:
        raise AdpdmError(f"unsupported dtype {a.dtype}") from None


class AdpdmClient:
    """Client of the ``unet`` and ``generate`` models. url: http://host:port or grpc://host:port."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 120.0, unet_model: str = "unet",
                 generate_model: str = "generate"):
        m = re.match(r"^(http|grpc)://([^/]+?)/?$", url.strip())
        if not m:
            raise AdpdmError(f"server url must look like http://127.0.0.1:8000 or grpc://127.0.0.1:8001, got {url!r}")
        self.protocol, self.address = m.group(1), m.group(2)
        self.url = url
        self.timeout_s = float(timeout_s)
        self.unet_model, self.generate_model = unet_model, generate_model
        self.notes: list[str] = []  # what the server said about the last generate call (truncated prompts)
        try:
            if self.protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as e:
            raise AdpdmError(f"the client needs tritonclient ({e}): pip install 'tritonclient[http,grpc]'") from None
        self._tc = tc
        if self.protocol == "http":
            self._client = tc.InferenceServerClient(
                self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )
        else:
            self._client = tc.InferenceServerClient(self.address)

    # ------------------------------------------------------------------ plumbing
    def _input(self, name: str, value: Any):
        a = np.asarray(value)
        if a.dtype.kind == "U":
            a = a.astype(np.object_)
        inp = self._tc.InferInput(name, list(a.shape), _triton_dtype(a))
        inp.set_data_from_numpy(a)
        return inp

    def infer(self, model: str, inputs: Mapping[str, Any], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Raw call: inputs name -> array (sent with its own dtype); returns the named outputs."""
        ins = [self._input(k, v) for k, v in inputs.items() if v is not None]
        outs = [self._tc.InferRequestedOutput(o) for o in outputs]
        try:
            if self.protocol == "http":
                r = self._client.infer(model, ins, outputs=outs)
            else:
                r = self._client.infer(model, ins, outputs=outs, client_timeout=self.timeout_s)
        except self._exception_type() as e:
            status = str(getattr(e, "status", lambda: None)() or "")
            if status.endswith("UNAVAILABLE"):
                raise AdpdmError(self._unreachable("connection failed")) from None
            if status.endswith("DEADLINE_EXCEEDED"):
                raise AdpdmError(self._too_slow()) from None
            raise AdpdmError(f"{model}: {error_message(e)}") from None
        except TimeoutError:
            raise AdpdmError(self._too_slow()) from None
        except OSError as e:
            raise AdpdmError(self._unreachable(e.strerror or type(e).__name__)) from None
        except Exception as e:  # gevent's Timeout (HTTP client) is not an OSError
            if type(e).__name__ == "Timeout":
                raise AdpdmError(self._too_slow()) from None
            raise
        return {o: r.as_numpy(o) for o in outputs}

    def _unreachable(self, why: str) -> str:
        return f"no server answers at {self.url} ({why.lower()}): is `adpdm serve` running there?"

    def _too_slow(self) -> str:
        return f"{self.url}: no answer within {self.timeout_s:g} s (raise the timeout, e.g. `adpdm generate --timeout`)"

    def _exception_type(self):
        from tritonclient.utils import InferenceServerException

        return InferenceServerException

    # ------------------------------------------------------------------ the two models
    def predict(self, sample: Any, timestep: Any, **cond: Any) -> np.ndarray:
        """Noise prediction for a (B, C, H, W) float32 batch at per-item timesteps (model ``unet``)."""
        x = np.ascontiguousarray(_numpy(sample))
        if x.ndim != 4:
            raise AdpdmError(f"sample must be (batch, C, H, W), got shape {x.shape}")
        B = x.shape[0]
        t = np.asarray(_numpy(timestep)).reshape(-1)
        if t.size == 1 and B != 1:
            t = np.repeat(t, B)
        inputs: dict[str, Any] = {"sample": x, "timestep": t.reshape(-1, 1)}
        if cond.get("class_labels") is not None:
            c = np.asarray(_numpy(cond["class_labels"])).reshape(-1)
            inputs["class_labels"] = (np.repeat(c, B) if c.size == 1 and B != 1 else c).reshape(-1, 1)
        if cond.get("encoder_hidden_states") is not None:
            inputs["encoder_hidden_states"] = _numpy(cond["encoder_hidden_states"])
        for name in ("text_embeds", "time_ids"):  # SDXL: (B, P) and (B, 6); one row is repeated
            if cond.get(name) is not None:
                a = np.asarray(_numpy(cond[name]), dtype=np.float32)
                a = a.reshape(1, -1) if a.ndim == 1 else a
                inputs[name] = np.repeat(a, B, axis=0) if a.shape[0] == 1 and B != 1 else a
        _refuse_unknown(cond)
        return self.infer(self.unet_model, inputs, ("out_sample",))["out_sample"]

    def generate(
        self,
        seed: int = 0,
        n: int = 1,
        steps: int = 50,
        scheduler: Optional[str] = None,
        prompt: Optional[str] = None,
        negative_prompt: Optional[str] = None,
        guidance_scale: Optional[float] = None,
        **cond: Any,
    ) -> np.ndarray:
        """Run the whole sampling loop on the server: (n, C, H, W) float32 in [-1, 1] (model ``generate``).

        prompt / negative_prompt / guidance_scale: a build of a text-to-image pipeline (the server
        encodes the prompt, runs the guided loop and the VAE); `self.notes` then holds what the server
        noted (a prompt truncated to the tokenizer's limit)."""
        inputs: dict[str, Any] = {
            "seed": np.array([seed], dtype=np.int64),
            "n": np.array([n], dtype=np.int64),
            "steps": np.array([steps], dtype=np.int64),
        }
        if scheduler is not None:
            inputs["scheduler"] = np.array([scheduler.encode()], dtype=np.object_)
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None:
                inputs[name] = np.array([str(text).encode("utf-8")], dtype=np.object_)
        if guidance_scale is not None:
            inputs["guidance_scale"] = np.array([guidance_scale], dtype=np.float64)
        if cond.get("class_labels") is not None:
            inputs["class_labels"] = np.asarray(_numpy(cond["class_labels"])).reshape(-1)
        if cond.get("encoder_hidden_states") is not None:
            inputs["encoder_hidden_states"] = _numpy(cond["encoder_hidden_states"])
        for name in ("text_embeds", "time_ids"):  # SDXL: (1 or n, P) and (1 or n, 6); time_ids default: the build's
            if cond.get(name) is not None:
                a = np.asarray(_numpy(cond[name]), dtype=np.float32)
                inputs[name] = a.reshape(1, -1) if a.ndim == 1 else a
        _refuse_unknown(cond)
        outputs = ("images", "notes") if prompt is not None else ("images",)
        got = self.infer(self.generate_model, inputs, outputs)
        notes = got.get("notes")
        self.notes = [] if notes is None else [ln for v in np.asarray(notes).reshape(-1)
                                               for ln in _text(v).split("; ") if ln]
        return got["images"]

    # ------------------------------------------------------------------ server state
    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:
            return False

    def models_ready(self) -> bool:
        """Both models loaded (the server answers `ready` a moment before its models are)."""
        try:
            return all(bool(self._client.is_model_ready(m)) for m in (self.unet_model, self.generate_model))
        except Exception:
            return False

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.3) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while not self.models_ready():
            if time.monotonic() > deadline:
                raise AdpdmError(f"{self.url}: models not ready after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def batch_stats(self, model: Optional[str] = None) -> dict[int, int]:
        """Executed batches per batch size, from Triton's statistics API ({batch_size: count})."""
        model = model or self.unet_model
        if self.protocol == "http":
            st = self._client.get_inference_statistics(model)
        else:
            st = self._client.get_inference_statistics(model, as_json=True)
        out: dict[int, int] = {}
        for ms in st.get("model_stats", []):
            for b in ms.get("batch_stats", []):
                size = int(b["batch_size"])
                out[size] = out.get(size, 0) + int(b["compute_infer"]["count"])
        return dict(sorted(out.items()))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> "AdpdmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_COND_NAMES = ("class_labels", "encoder_hidden_states", "text_embeds", "time_ids")


def _refuse_unknown(cond: Mapping[str, Any]) -> None:
    unknown = sorted(k for k in cond if k not in _COND_NAMES)
    if unknown:
        raise AdpdmError(f"unknown conditioning input(s) {unknown}: the servers take {', '.join(_COND_NAMES)}")


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor, without importing torch here
        v = v.detach().cpu().numpy()
    return np.asarray(v)
