"""The quantization-aware wrapper for diffusers `UNet2DModel` / `UNet2DConditionModel`.

`quantize_model(unet, config)` returns the same kind of diffusers model (a copy unless
`inplace=True`) with quantizers placed exactly where the QDQ export places Q/DQ:

* every `nn.Conv2d` / `nn.Linear` not matched by `config.fp_layers` has its class swapped
  to a quantized subclass (parameter names are unchanged: `...conv1.weight` stays) and
  gets child modules `input_quantizer` (ActQuantizer, one scale per group),
  `weight_quantizer` (WeightQuantizer, per output channel) and `output_quantizer`
  (ActQuantizer, applied only in the `ort` target but always observed in calibration);
* attention projections that read one tensor share one input quantizer: in
  self-attention `to_k.input_quantizer` and `to_v.input_quantizer` are the very module
  registered as `to_q.input_quantizer`; in cross-attention `to_v.input_quantizer` is
  `to_k.input_quantizer`. A shared quantizer's name is its first path (`...to_q.input_quantizer`,
  resp. `...to_k.input_quantizer`); `quantizer_aliases()` lists the other paths;
* option `quantize_attention_bmm`: each `Attention` gets `qk_matmul` (input_quantizer on
  q, other_quantizer on k) and `av_matmul` (input_quantizer on the softmax output,
  other_quantizer on v) and runs `QuantAttnProcessor` (explicit matmuls instead of SDPA);
* option `quantize_residual`: `ResnetBlock2D` and `Attention(residual_connection=True)`
  get `residual_add` (input_quantizer on the shortcut, other_quantizer on the branch).
  Transformer-block residuals (UNet2DConditionModel) are not implemented: refused.

The active group of each batch item is `table[timestep]`, computed from the timestep
*value* handed to the UNet's forward (scalar or (B,)) by a forward pre-hook and kept in
the model's `QuantState`; every quantizer applies each item's own group scale. In
`export_mode(qmodel, group=k)` the hook does nothing and every quantizer runs
`torch.fake_quantize_per_*_affine` with group k's scale (no timestep-dependent control flow).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from calibration.fingerprint import model_sha256
from calibration.qconfig import QuantConfig
from calibration.quantizers import ActQuantizer, QuantState, WeightQuantizer
from engines.conditioning import accept_added_cond_inputs
from engines.errors import AdpdmError

_STATE_ATTR = "_adpdm_qstate"


# ----------------------------------------------------------------------------------------
# quantized layers (class swap: same parameters, same names, extra child quantizers)
# ----------------------------------------------------------------------------------------
class QuantLayerMixin:
    """Forward of a quantized Conv2d/Linear: Q(input) -> op(Q(weight)) -> [Q(output)]."""

    def _quant_io(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_quantizer(x), self.weight_quantizer(self.weight)

    def _quant_out(self, y: torch.Tensor) -> torch.Tensor:
        oq = getattr(self, "output_quantizer", None)
        return oq(y) if oq is not None else y


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quant_io(x)
        return self._quant_out(self._conv_forward(x, w, self.bias))


class QuantLinear(QuantLayerMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quant_io(x)
        return self._quant_out(F.linear(x, w, self.bias))


class QuantMatMul(nn.Module):
    """a @ b with both inputs quantized (attention BMMs)."""

    def __init__(self, bits: int, num_groups: int):
        super().__init__()
        self.input_quantizer = ActQuantizer(bits, num_groups, role="bmm")
        self.other_quantizer = ActQuantizer(bits, num_groups, role="bmm")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.input_quantizer(a), self.other_quantizer(b))


class QuantAdd(nn.Module):
    """a + b with both inputs quantized (residual additions)."""

    def __init__(self, bits: int, num_groups: int):
        super().__init__()
        self.input_quantizer = ActQuantizer(bits, num_groups, role="residual")
        self.other_quantizer = ActQuantizer(bits, num_groups, role="residual")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(a) + self.other_quantizer(b)


_QUANT_CLASSES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def _quant_class_for(mod: nn.Module) -> Optional[type]:
    cls = type(mod)
    if cls in _QUANT_CLASSES:
        return _QUANT_CLASSES[cls]
    for base, qcls in _QUANT_CLASSES.items():
        if isinstance(mod, base) and cls.forward is base.forward:
            # a subclass that keeps the stock forward: quantized subclass of that class
            return type(f"Quant{cls.__name__}", (qcls, cls), {})
    return None


class QuantAttnProcessor:
    """AttnProcessor2_0's computation with explicit, optionally quantized, matmuls / residual.

    Layout (batch, heads, seq, head_dim) so per-item group scales broadcast on dim 0.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        qk = getattr(attn, "qk_matmul", None)
        av = getattr(attn, "av_matmul", None)
        if qk is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            scores = qk(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            if attn.upcast_softmax:
                scores = scores.float()
            probs = scores.softmax(dim=-1).to(value.dtype)
            hidden_states = av(probs, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            add = getattr(attn, "residual_add", None)
            hidden_states = add(residual, hidden_states) if add is not None else hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _quant_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers ResnetBlock2D.forward with the residual addition through `self.residual_add`."""
    hidden_states = input_tensor
    hidden_states = self.norm1(hidden_states)
    hidden_states = self.nonlinearity(hidden_states)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "default":
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.norm2(hidden_states)
    elif self.time_embedding_norm == "scale_shift":
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
    else:
        hidden_states = self.norm2(hidden_states)
    hidden_states = self.nonlinearity(hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous())
    return self.residual_add(input_tensor, hidden_states) / self.output_scale_factor


# ----------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------
def _timestep_arg(args: tuple, kwargs: dict) -> Any:
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) > 1:
        return args[1]
    raise AdpdmError("the quantized UNet needs the timestep (second argument or timestep=)")


def timesteps_to_groups(table: torch.Tensor, timestep: Any) -> torch.Tensor:
    """Group id of each timestep value (scalar or (B,)), via the table; (1,) or (B,) int64."""
    t = torch.as_tensor(timestep)
    if t.is_floating_point():
        t = t.round()
    t = t.to(torch.int64).reshape(-1)
    n = table.numel()
    if t.numel() == 0:
        raise AdpdmError("empty timestep tensor")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise AdpdmError(f"timestep {lo if lo < 0 else hi} is outside the model's training range 0..{n - 1}")
    return table.to(t.device)[t]


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    st: QuantState = getattr(module, _STATE_ATTR)
    if st.export_group is not None:
        return None
    t = _timestep_arg(args, kwargs)
    if st.mixture_fn is not None:
        tt = torch.as_tensor(t)
        tt = (tt.round() if tt.is_floating_point() else tt).to(torch.int64).reshape(-1)
        st.set_groups(None)
        st.mixture = st.mixture_fn(tt)
    else:
        st.set_groups(timesteps_to_groups(st.table, t))
    return None


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
    st: QuantState = getattr(module, _STATE_ATTR)
    if st.export_group is None:
        st.set_groups(None)
    return None


def is_quantized(model: nn.Module) -> bool:
    return hasattr(model, _STATE_ATTR)


def get_state(qmodel: nn.Module) -> QuantState:
    st = getattr(qmodel, _STATE_ATTR, None)
    if st is None:
        raise AdpdmError("this model is not quantization-aware; wrap it with quantize_model() first")
    return st


def get_config(qmodel: nn.Module) -> QuantConfig:
    get_state(qmodel)
    return qmodel._adpdm_qconfig


def fp_sha256(qmodel: nn.Module) -> str:
    """sha256 of the FP model the wrapper was built from (calibration.fingerprint)."""
    get_state(qmodel)
    return qmodel._adpdm_fp_sha256


def default_table(num_train_timesteps: int) -> torch.Tensor:
    return torch.zeros(int(num_train_timesteps), dtype=torch.int64)


def _num_train_timesteps_of(unet: nn.Module) -> int:
    # The UNet itself does not know T; 1000 is the diffusers default. Callers with a
    # scheduler config pass num_train_timesteps (or a table) explicitly.
    return 1000


def quantize_model(
    unet: nn.Module,
    config: Optional[QuantConfig] = None,
    *,
    num_groups: int = 1,
    table: Optional[torch.Tensor] = None,
    num_train_timesteps: Optional[int] = None,
    result: Any = None,
    inplace: bool = False,
    share_weights: bool = False,
) -> nn.Module:
    """A quantization-aware copy (or, with inplace=True, the model itself) of `unet`.

    share_weights=True: the copy's parameters and buffers are `unet`'s own tensors (modules, classes
    and quantizers are new), so wrapping costs no second set of weights; for uses that leave the
    weights alone (the export, parity checks). Moving or casting either model then moves both.

    The timestep->group table defaults to one group for all `num_train_timesteps`
    (default 1000). `result` (a CalibrationResult) configures everything from a
    calibration (config, table, scales) and checks the model hash.
    Weight scales start at max-abs; activation scales at 1 until calibrated.
    """
    if is_quantized(unet):
        raise AdpdmError("model is already quantization-aware")
    if result is not None:
        if config is None:
            quant = (result.config or {}).get("quant") or {"w_bits": result.w_bits, "a_bits": result.a_bits}
            config = QuantConfig.from_dict(quant)
        table = result.timestep_to_group
    config = QuantConfig() if config is None else QuantConfig.from_dict(config.to_dict())
    sha = model_sha256(unet)
    if result is not None and result.model_sha256 != sha:
        raise AdpdmError(
            f"calibration is for model {result.model_sha256[:12]}, this model is {sha[:12]}: recalibrate for this model"
        )
    if table is None:
        t_count = int(num_train_timesteps) if num_train_timesteps else _num_train_timesteps_of(unet)
        table = default_table(t_count)
        if num_groups != 1:
            raise AdpdmError("num_groups > 1 needs a timestep->group table")
    table = _check_table(table)
    num_groups = int(table.max()) + 1 if table.numel() else 1
    if not inplace:
        unet = copy.deepcopy(unet, _shared_tensors(unet) if share_weights else None)
    model = accept_added_cond_inputs(unet)  # SDXL: flat text_embeds / time_ids
    state = QuantState(num_groups)
    state.table = table
    state.mixture_fn = None
    state.target = config.target
    _place(model, config, state)
    setattr(model, _STATE_ATTR, state)
    model._adpdm_qconfig = config
    model._adpdm_fp_sha256 = sha
    model._adpdm_hooks = (
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        model.register_forward_hook(_post_hook, with_kwargs=True),
    )
    if result is not None:
        result.apply(model)
    return model


def _shared_tensors(unet: nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo that maps every parameter and buffer to itself: the copy shares them."""
    return {id(t): t for t in list(unet.parameters()) + list(unet.buffers())}


def _check_table(table: Any) -> torch.Tensor:
    t = torch.as_tensor(table).to(torch.int64).reshape(-1).cpu()
    if t.numel() == 0:
        raise AdpdmError("empty timestep->group table")
    if int(t.min()) < 0:
        raise AdpdmError("timestep->group table has negative group ids")
    used = torch.unique(t)
    g = int(t.max()) + 1
    if used.numel() != g:
        missing = sorted(set(range(g)) - set(used.tolist()))
        raise AdpdmError(f"timestep->group table leaves groups {missing[:8]} unused; number groups 0..G-1")
    return t


def _place(model: nn.Module, config: QuantConfig, state: QuantState) -> None:
    g = state.num_groups
    names = dict(model.named_modules())
    if config.quantize_residual:
        blocked = [n for n, m in names.items() if type(m).__name__ in ("BasicTransformerBlock", "Transformer2DModel")]
        if blocked:
            raise AdpdmError(
                "quantize_residual is implemented for ResnetBlock2D and Attention(residual_connection) only; "
                f"this model has transformer-block residuals ({blocked[0]}, ...) that it would leave unquantized"
            )
    # 1. Conv2d / Linear
    for name, mod in names.items():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or config.is_fp_layer(name):
            continue
        qcls = _quant_class_for(mod)
        if qcls is None:
            raise AdpdmError(f"{name}: {type(mod).__name__} overrides forward; cannot quantize it (add it to fp_layers)")
        mod.__class__ = qcls
        mod.input_quantizer = ActQuantizer(config.a_bits, g, role="input")
        mod.weight_quantizer = WeightQuantizer(config.w_bits, mod.weight.shape[0])
        mod.weight_quantizer.init_from_weight(mod.weight)
        mod.output_quantizer = ActQuantizer(config.a_bits, g, role="output")
    # 2. attention: shared q/k/v input quantizers, BMMs, residual
    for name, mod in names.items():
        if type(mod).__name__ != "Attention" or not hasattr(mod, "to_q"):
            continue
        q, k, v = (getattr(mod, a, None) for a in ("to_q", "to_k", "to_v"))
        if config.share_qkv_input and all(isinstance(p, QuantLayerMixin) for p in (q, k, v)):
            if getattr(mod, "is_cross_attention", False):
                v.input_quantizer = k.input_quantizer
            else:
                k.input_quantizer = q.input_quantizer
                v.input_quantizer = q.input_quantizer
        needs_proc = config.quantize_attention_bmm or (config.quantize_residual and mod.residual_connection)
        if needs_proc:
            proc = type(mod.processor).__name__
            if proc not in ("AttnProcessor2_0", "AttnProcessor"):
                raise AdpdmError(f"{name}: attention processor {proc} is not supported with BMM/residual quantization")
            if config.quantize_attention_bmm:
                mod.qk_matmul = QuantMatMul(config.a_bits, g)
                mod.av_matmul = QuantMatMul(config.a_bits, g)
            if config.quantize_residual and mod.residual_connection:
                mod.residual_add = QuantAdd(config.a_bits, g)
            mod.set_processor(QuantAttnProcessor())
    if config.quantize_residual:
        for name, mod in names.items():
            if type(mod).__name__ == "ResnetBlock2D":
                mod.residual_add = QuantAdd(config.a_bits, g)
                mod.__class__ = type("QuantResnetBlock2D", (type(mod),), {"forward": _quant_resnet_forward})
    # 3. names and the shared state
    seen: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (ActQuantizer, WeightQuantizer)):
            mod._state = state
            mod._owns_state = False
            if id(mod) not in seen:
                seen.add(id(mod))
                mod.qname = name


# ----------------------------------------------------------------------------------------
# listing quantizers and scales
# ----------------------------------------------------------------------------------------
def activation_quantizers(qmodel: nn.Module, role: Optional[str] = None) -> dict[str, ActQuantizer]:
    """Activation quantizers by canonical name (first module path), in module order."""
    get_state(qmodel)
    out: dict[str, ActQuantizer] = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, ActQuantizer) and (role is None or mod.role == role):
            out[name] = mod
    return out


def weight_quantizers(qmodel: nn.Module) -> dict[str, WeightQuantizer]:
    get_state(qmodel)
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, WeightQuantizer)}


def quantized_layers(qmodel: nn.Module) -> dict[str, nn.Module]:
    """The quantized Conv2d/Linear layers by module path."""
    get_state(qmodel)
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin)}


def quantizer_aliases(qmodel: nn.Module) -> dict[str, str]:
    """Every further path of a shared quantizer -> its canonical name."""
    canon = {id(m): n for n, m in activation_quantizers(qmodel).items()}
    out = {}
    for name, mod in qmodel.named_modules(remove_duplicate=False):
        if isinstance(mod, ActQuantizer) and canon.get(id(mod)) not in (None, name):
            out[name] = canon[id(mod)]
    return out


def activation_scales(qmodel: nn.Module, role: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Canonical quantizer name -> its per-group scales (G,) (a detached copy)."""
    return {n: q.effective_scale().detach().clone() for n, q in activation_quantizers(qmodel, role).items()}


def weight_scales(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Weight quantizer name -> its per-output-channel scales (C_out,) (a detached copy)."""
    return {n: q.effective_scale().detach().clone() for n, q in weight_quantizers(qmodel).items()}


def set_table(qmodel: nn.Module, table: Any) -> None:
    """Install a new timestep->group table; changing G resets every activation scale to 1."""
    st = get_state(qmodel)
    t = _check_table(table)
    if st.table is not None and t.numel() != st.table.numel():
        raise AdpdmError(f"table has {t.numel()} timesteps, the model was wrapped for {st.table.numel()}")
    g = int(t.max()) + 1
    if g != st.num_groups:
        for q in activation_quantizers(qmodel).values():
            q.resize_groups(g)
        st.num_groups = g
    st.table = t


def set_target(qmodel: nn.Module, target: str) -> None:
    if target not in ("trt", "ort"):
        raise AdpdmError(f"target must be trt or ort, got {target!r}")
    get_state(qmodel).target = target


# ----------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _swap(st: QuantState, **values) -> Iterator[QuantState]:
    old = {k: getattr(st, k) for k in values}
    for k, v in values.items():
        setattr(st, k, v)
    try:
        yield st
    finally:
        for k, v in old.items():
            setattr(st, k, v)


@contextlib.contextmanager
def export_mode(qmodel: nn.Module, group: int = 0, target: Optional[str] = None, zero_point: str = "int8"):
    """Every quantizer uses group `group`'s scale via torch.fake_quantize_*; no hooks, no state.

    `target` overrides the model's ("ort": output quantizers apply); `zero_point`
    "int8" (0 on -128..127) or "uint8" (128 on 0..255, same grid) for activations.
    """
    st = get_state(qmodel)
    if not 0 <= int(group) < st.num_groups:
        raise AdpdmError(f"group {group} out of range 0..{st.num_groups - 1}")
    if zero_point not in ("int8", "uint8"):
        raise AdpdmError(f"zero_point must be int8 or uint8, got {zero_point!r}")
    tgt = target or st.target
    if tgt not in ("trt", "ort"):
        raise AdpdmError(f"target must be trt or ort, got {tgt!r}")
    quants = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    for q in quants:
        q._export_scale = float(q.scale[int(group)])
    try:
        with _swap(st, export_group=int(group), target=tgt, export_zero_point=zero_point, observer=None):
            yield qmodel
    finally:
        for q in quants:
            q.__dict__.pop("_export_scale", None)


@contextlib.contextmanager
def fp_mode(qmodel: nn.Module):
    """Run the wrapped model in full precision (every quantizer passes through)."""
    with _swap(get_state(qmodel), act_enabled=False, weight_enabled=False):
        yield qmodel


@contextlib.contextmanager
def quant_mode(qmodel: nn.Module, activations: bool = True, weights: bool = True, target: Optional[str] = None):
    st = get_state(qmodel)
    with _swap(st, act_enabled=activations, weight_enabled=weights, target=target or st.target):
        yield qmodel


@contextlib.contextmanager
def observe_mode(qmodel: nn.Module, observer: Callable[[ActQuantizer, torch.Tensor], None], quantized: bool = False):
    """Call `observer(quantizer, x)` on every activation quantizer's input; FP unless `quantized`."""
    st = get_state(qmodel)
    with _swap(st, observer=observer, act_enabled=quantized, weight_enabled=quantized):
        yield qmodel


@contextlib.contextmanager
def relaxed_mode(qmodel: nn.Module, mixture_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Relaxed group mixture: `mixture_fn(timesteps (B,) int64) -> (B, G) or (G,)` weights.

    Each activation quantizer returns sum_g pi[b, g] * Q(x; s[g]) (ADP-DM group search);
    combine with `ActQuantizer.make_learnable()` for learnable log-scales.
    """
    st = get_state(qmodel)
    with _swap(st, mixture_fn=mixture_fn):
        yield qmodel


def forward_eps(qmodel: nn.Module, sample: torch.Tensor, timestep: Any, **cond: Any) -> torch.Tensor:
    out = qmodel(sample, timestep, **cond)
    return out.sample if hasattr(out, "sample") else out
