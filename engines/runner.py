"""The timestep-dispatching runner: one build folder, G group graphs/engines, one noise predictor.

`TimestepDispatchRunner(build_dir)(sample, timestep, **cond)` looks up each batch item's
group from its timestep *value* (the manifest's `TimestepGroups`), runs the group on its
slice of the batch through a `GroupBackend` (onnxruntime sessions or TensorRT engines,
chosen once by `engines.group_backend.open_group_backend`), and returns the outputs in
input order. A batch may mix groups. Every input is checked against the manifest and the
backend's `InputSpec` before anything runs: a bad input is one AdpdmError line, never an
onnxruntime or TensorRT error from inside a run.

The runner is a noise predictor for `engines.sampler.sample`; `runner.as_unet()` is a
drop-in for `pipe.unet` in diffusers pipelines (engines/unet_adapter.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from engines.conditioning import ADDED_COND_INPUTS
from engines.errors import AdpdmError
from engines.group_backend import GroupBackend, open_group_backend
from engines.manifest import load_manifest
from engines.manifest_schema import Manifest

ORT_CHUNK = 16  # onnxruntime's default largest call: its arena keeps the peak of any call it ran
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class TimestepDispatchRunner:
    """Run a build folder's group graphs (onnxruntime) or engines (TensorRT), dispatching on the timestep.

    build: a build folder (or its manifest.json), or a Manifest loaded from one.
    backend: "auto" (TensorRT when the build has engines and this machine runs them, else
        onnxruntime), "ort" or "trt".
    providers / threads / ort_options: onnxruntime session settings (engines.ort_group_sessions).
    target: which group graphs onnxruntime loads ("ort", "trt", "fp"); default: the first
        of engines.group_backend.ORT_TARGET_ORDER the build has.
    verify: check every build file's sha256 on load (True), its size only ("size"), or not.
    cuda_graphs: TensorRT only: capture one CUDA graph per (group, input shapes).
    chunk: the largest batch one backend call gets; larger batches are split into near-equal
        chunks (so each stays at or above the smallest batch TensorRT was built for) and their
        outputs joined. Default: the TensorRT engines' largest batch, or ORT_CHUNK for
        onnxruntime, whose memory arena keeps the peak of the largest call it ever ran.
    """

    def __init__(
        self,
        build: str | os.PathLike | Manifest,
        backend: str = "auto",
        providers: Optional[Sequence[Any]] = None,
        threads: Optional[int] = None,
        *,
        target: Optional[str] = None,
        verify: bool | str = True,
        cuda_graphs: bool = False,
        ort_options: Optional[Mapping[str, Any]] = None,
        chunk: Optional[int] = None,
    ):
        if isinstance(build, Manifest):
            if build.root is None:
                raise AdpdmError("the runner needs a manifest loaded from its build folder (load_manifest)")
            self.manifest = build
        else:
            self.manifest = load_manifest(build, verify=verify)
        m = self.manifest
        self.group_backend: GroupBackend = open_group_backend(
            m, backend, providers=providers, threads=threads, target=target, cuda_graphs=cuda_graphs,
            ort_options=ort_options,
        )
        self.backend = self.group_backend.name
        self.target: Optional[str] = self.group_backend.target
        self.device = self.group_backend.device
        self.input_spec = self.group_backend.input_spec
        self.min_batch, self.max_batch = self.input_spec.batch
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise AdpdmError(f"chunk must be an integer >= 1, got {chunk!r}")
        limit = self.max_batch  # TensorRT: the engines' largest batch; onnxruntime: none
        self.chunk = min(chunk or limit or ORT_CHUNK, limit) if limit else (chunk or ORT_CHUNK)
        if self.chunk < self.min_batch:
            raise AdpdmError(f"chunk {self.chunk} is below the smallest batch the {self.input_spec.limited_by} engines "
                             f"were built for ({self.min_batch})")
        self._closed = False
        self.cond_specs: dict[str, dict[str, Any]] = dict(m.model.conditioning)
        self.cond_names: tuple[str, ...] = tuple(self.cond_specs)
        self.timestep_groups = m.timestep_groups

    # ------------------------------------------------------------------ properties
    @property
    def num_groups(self) -> int:
        return self.manifest.num_groups

    @property
    def num_train_timesteps(self) -> int:
        return self.manifest.num_train_timesteps

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the model was built for."""
        h, w = self.manifest.model.sample_size
        return (self.manifest.model.in_channels, h, w)

    # ------------------------------------------------------------------ dispatch
    def group_of(self, timestep: Any) -> torch.Tensor:
        """Group id per timestep value (int64 tensor); raises for values outside [0, T)."""
        t = self._timesteps(timestep, None)
        return self.timestep_groups.group_of(t)

    def __call__(self, sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
        if self._closed:
            raise AdpdmError("this runner is closed: open a new TimestepDispatchRunner")
        sample, t, cond = self.check_inputs(sample, timestep, **cond)
        B = sample.shape[0]
        if B <= self.chunk:
            return self._dispatch(sample, t, cond)
        n = -(-B // self.chunk)
        if B // n < self.min_batch:  # e.g. a 16..16 optimization profile and a batch of 17
            raise AdpdmError(f"batch {B} cannot be split into chunks of {self.min_batch}..{self.chunk} items (the "
                             f"{self.input_spec.limited_by} engines' batch range): use a multiple-friendly batch size")
        sizes = [B // n + (1 if i < B % n else 0) for i in range(n)]  # near-equal: no tiny tail chunk
        outs, lo = [], 0
        for size in sizes:
            sl = slice(lo, lo + size)
            outs.append(self._dispatch(sample[sl], t[sl], {k: v[sl] for k, v in cond.items()}))
            lo += size
        return torch.cat(outs)

    def _dispatch(self, sample: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One backend call per group present in the batch (checked inputs, at most `chunk` items)."""
        out_device = sample.device
        groups = self.timestep_groups.group_of(t.cpu())
        run_device = self.device
        x = sample.to(run_device)
        tt = t.to(run_device)
        cc = {k: v.to(run_device) for k, v in cond.items()}
        B = x.shape[0]
        g0 = int(groups[0])
        if B == 1 or bool((groups == g0).all()):  # the sampling loop's case: one timestep, one group
            return self._run_group(g0, x, tt, cc).to(device=out_device, dtype=torch.float32)
        out = None
        for k in torch.unique(groups).tolist():
            idx = torch.nonzero(groups == k, as_tuple=True)[0]
            if len(idx) == B:
                y = self._run_group(k, x, tt, cc)
            else:
                i = idx.to(run_device)
                y = self._run_group(k, x.index_select(0, i), tt.index_select(0, i), {n: v.index_select(0, i) for n, v in cc.items()})
            if out is None:
                out = torch.empty((B, *y.shape[1:]), dtype=torch.float32, device=y.device)
            if len(idx) == B:
                out.copy_(y)
            else:
                out.index_copy_(0, idx.to(y.device), y.to(torch.float32))
        assert out is not None
        return out.to(out_device)

    predict = __call__

    def _run_group(self, k: int, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.group_backend.run(k, {"sample": x, "timestep": t, **cond})

    # ------------------------------------------------------------------ input checks
    def check_inputs(
        self, sample: Any, timestep: Any, **cond: Any
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Validate and normalize (sample float32 (B,C,H,W), timestep int64 (B,), conditioning)."""
        if isinstance(sample, np.ndarray):
            sample = torch.from_numpy(sample)
        if not isinstance(sample, torch.Tensor):
            raise AdpdmError(f"sample must be a torch tensor, got {type(sample).__name__}")
        if sample.dtype != torch.float32:
            raise AdpdmError(f"sample must be float32, got {sample.dtype} (cast it with .float())")
        C, H, W = self.sample_shape
        if sample.dim() != 4:
            raise AdpdmError(f"sample must be (batch, {C}, H, W), got shape {tuple(sample.shape)}")
        B = sample.shape[0]
        if B < 1:
            raise AdpdmError("sample has an empty batch")
        if sample.shape[1] != C:
            raise AdpdmError(f"sample has {sample.shape[1]} channels, the model takes {C} (shape {tuple(sample.shape)})")
        self._check_resolution(sample.shape[2], sample.shape[3])
        by = self.input_spec.limited_by
        if B < self.min_batch:
            raise AdpdmError(f"batch {B} is below the smallest batch the {by} engines were built for ({self.min_batch})")
        bad = ~torch.isfinite(sample.reshape(B, -1)).all(dim=1)
        if bad.any():
            raise AdpdmError(f"sample contains NaN or inf (batch item(s) {torch.nonzero(bad).flatten().tolist()})")
        t = self._timesteps(timestep, B)
        cond = {k: v for k, v in cond.items() if v is not None}
        missing = [n for n in self.cond_names if n not in cond]
        extra = sorted(set(cond) - set(self.cond_names))
        if extra:
            takes = ", ".join(self.cond_names) or "none"
            raise AdpdmError(f"unexpected conditioning input(s) {extra}: this model takes conditioning: {takes}")
        if missing:
            raise AdpdmError(f"missing conditioning input(s) {missing}: this model needs {', '.join(self.cond_names)}")
        out = {}
        if "encoder_hidden_states" in cond:
            out["encoder_hidden_states"] = self._check_ehs(cond["encoder_hidden_states"], B)
        if "class_labels" in cond:
            out["class_labels"] = self._check_labels(cond["class_labels"], B)
        for name in ADDED_COND_INPUTS:
            if name in cond:
                out[name] = self._check_rows(name, cond[name], B)
        return sample, t, out

    def _check_resolution(self, h: int, w: int) -> None:
        spec = self.input_spec
        if spec.height is not None and spec.width is not None:
            (h0, h1), (w0, w1) = spec.height, spec.width
            if not (h0 <= h <= h1 and w0 <= w <= w1):
                raise AdpdmError(
                    f"resolution {h}x{w} is outside the {spec.limited_by} optimization profile ({h0}..{h1} x "
                    f"{w0}..{w1}): rebuild the engines for it"
                )
        elif (h, w) != tuple(self.manifest.model.sample_size):
            H, W = self.manifest.model.sample_size
            raise AdpdmError(f"sample is {h}x{w}, the build is calibrated for {H}x{W}")

    def _timesteps(self, timestep: Any, B: Optional[int]) -> torch.Tensor:
        T = self.num_train_timesteps
        if isinstance(timestep, np.ndarray):
            timestep = torch.from_numpy(timestep)
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            t = torch.tensor([int(timestep)], dtype=torch.int64)
        elif isinstance(timestep, (float, np.floating)):
            t = torch.tensor([float(timestep)], dtype=torch.float64)
        elif isinstance(timestep, torch.Tensor):
            t = timestep.detach().cpu()
            if t.dim() > 1:
                raise AdpdmError(f"timestep must be a scalar or a (batch,) tensor, got shape {tuple(t.shape)}")
            t = t.reshape(-1)
        else:
            raise AdpdmError(f"timestep must be an int or a tensor, got {type(timestep).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise AdpdmError(f"timestep must hold integer timestep values, got dtype {t.dtype}")
        if t.is_floating_point():
            if not torch.isfinite(t).all() or (t != t.round()).any():
                raise AdpdmError(
                    f"timestep values must be integer training timesteps, got {t[:4].tolist()}: the runner keys on "
                    f"the timestep value (use a scheduler with integer timesteps, e.g. DDIM/DDPM)"
                )
        t = t.to(torch.int64)
        if B is not None:
            if t.numel() == 1 and B != 1:
                t = t.expand(B).clone()
            elif t.numel() != B:
                raise AdpdmError(f"timestep has {t.numel()} values for a batch of {B}")
        bad = (t < 0) | (t >= T)
        if bad.any():
            raise AdpdmError(f"timestep {t[bad][0].item()} is outside [0, {T}) (the model's training timesteps)")
        return t

    def _check_ehs(self, v: Any, B: int) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise AdpdmError(f"encoder_hidden_states must be a torch tensor, got {type(v).__name__}")
        spec = self.cond_specs["encoder_hidden_states"]
        if v.dtype != torch.float32:
            raise AdpdmError(f"encoder_hidden_states must be float32, got {v.dtype}")
        if v.dim() != 3 or v.shape[0] != B or v.shape[2] != spec["dim"]:
            raise AdpdmError(
                f"encoder_hidden_states must be (batch={B}, sequence, {spec['dim']}), got {tuple(v.shape)}"
            )
        S = self.input_spec.sequence_length
        if S is not None and v.shape[1] != S:
            raise AdpdmError(f"encoder_hidden_states has sequence length {v.shape[1]}, the engines take {S}")
        if not torch.isfinite(v).all():
            raise AdpdmError("encoder_hidden_states contains NaN or inf")
        return v

    def _check_rows(self, name: str, v: Any, B: int) -> torch.Tensor:
        """An SDXL added condition (text_embeds, time_ids): float32 (batch, the width the build declares)."""
        if not isinstance(v, torch.Tensor):
            raise AdpdmError(f"{name} must be a torch tensor, got {type(v).__name__}")
        if v.dtype != torch.float32:
            raise AdpdmError(f"{name} must be float32, got {v.dtype}")
        dim = self.cond_specs[name]["dim"]
        if v.dim() != 2 or v.shape[0] != B or v.shape[1] != dim:
            raise AdpdmError(f"{name} must be (batch={B}, {dim}), got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise AdpdmError(f"{name} contains NaN or inf")
        return v

    def _check_labels(self, v: Any, B: int) -> torch.Tensor:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = torch.tensor([int(v)])
        if not isinstance(v, torch.Tensor) or v.dtype not in _INT_DTYPES:
            raise AdpdmError(f"class_labels must be an integer tensor, got {getattr(v, 'dtype', type(v).__name__)}")
        v = v.reshape(-1).to(torch.int64)
        if v.numel() == 1 and B != 1:
            v = v.expand(B).clone()
        if v.numel() != B:
            raise AdpdmError(f"class_labels has {v.numel()} values for a batch of {B}")
        n = self.cond_specs["class_labels"].get("num_classes")
        if n is not None and ((v < 0) | (v >= n)).any():
            raise AdpdmError(f"class_labels must be in [0, {n}), got {v.tolist()}")
        return v

    # ------------------------------------------------------------------ adapters
    def as_unet(self):
        """A stand-in for `pipe.unet` in diffusers pipelines (see engines/unet_adapter.py)."""
        from engines.unet_adapter import RunnerUNet

        return RunnerUNet(self)

    def close(self) -> None:
        """Release the sessions or engines; calling the runner afterwards is one AdpdmError line."""
        if not self._closed:
            self._closed = True
            self.group_backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        root = self.manifest.root
        extra = f", target={self.target!r}" if self.target else ""
        return f"TimestepDispatchRunner({str(root)!r}, backend={self.backend!r}{extra}, groups={self.num_groups})"
