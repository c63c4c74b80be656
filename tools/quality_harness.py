"""What tools/eval_quality.py and tools/bench_quality.py share: bit-width parsing, our quantization
config, the calibration / held-out trajectories and the metrics of one quantized model.

Both scripts score every method the same way on the same held-out seeds, so their numbers can
be read side by side. A text-to-image pipeline (`reference-text`) is set up as `adpdm calibrate`
and `adpdm eval` set it up (guided calibration trajectories holding both guidance halves, held-out
seeds with the same prompts and guidance, VAE decode, the digits classifier for prompt fidelity)
and scored by `adpdm eval`'s own metrics (`evaluate_text_model`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHUNK = 16  # seeds per PSNR chunk: the spread over chunks is the seed noise
PSNR_CAP_DB = 60.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_setup_arguments(p) -> None:
    """The flags both quality scripts share: budget, held-out set, seeds, threads, ADP-DM options, cache."""
    p.add_argument("--samples", type=int, default=64, help="held-out seeds for evaluation")
    p.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the evaluation")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adpdm-option", action="append", default=[], help="key=value passed to the ADP-DM method")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"), help="trajectory cache")


def parse_bits(text: str) -> tuple[int, int]:
    t = text.upper()
    if not (t.startswith("W") and "A" in t):
        raise SystemExit(f"bits must look like W8A6, got {text}")
    w, a = t[1:].split("A")
    return int(w), int(a)


def quant_config(w: int, a: int, quantize_conv_in: bool):
    """Our default QuantConfig at W{w}A{a}; conv_in's input quantized only if asked (docs/design.md keeps it FP)."""
    from calibration.qconfig import DEFAULT_FP_LAYERS, QuantConfig

    fp = tuple(p for p in DEFAULT_FP_LAYERS if not (quantize_conv_in and p == "conv_in"))
    return QuantConfig(w_bits=w, a_bits=a, fp_layers=fp)


@dataclass
class TextEval:
    """What scoring a text-to-image pipeline adds (adpdm_export.commands.eval_cmd.text_eval_inputs):
    the VAE decode (None: pixel space), the digits classifier and the digit each held-out seed's
    prompt asks for (None, with `note`, when there is no prompt fidelity)."""

    decode: Optional[Callable[[torch.Tensor], torch.Tensor]]
    classifier: Optional[Callable[[torch.Tensor], torch.Tensor]]
    labels: Optional[list[int]]
    note: Optional[str]


@dataclass
class QualitySetup:
    """The FP model, its calibration trajectories (the calibration budget) and the held-out ones."""

    loaded: Any
    calib: Any
    heldout: Any
    feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]]
    real_stats: Optional[tuple]
    calib_trajectories_s: float
    guidance_scale: float = 1.0
    text: Optional[TextEval] = None  # text-to-image pipelines only


def prepare(model: str, calib_samples: int, calib_steps: int, eval_samples: int, eval_steps: int,
            seed: int, cache_dir: str, guidance_scale: Optional[float] = None) -> QualitySetup:
    """Load `model`, the digits classifier (for the Frechet distance) and both trajectory sets (cached).

    guidance_scale: text-to-image pipelines only (default: the pipeline's own, as `adpdm calibrate`)."""
    import time

    from adpdm_export.model_loading import load_model
    from adpdm_export.reference import load_reference_classifier, reference_real_feature_stats
    from calibration.trajectories import generate_trajectories, heldout_seed

    loaded = load_model(model)
    if loaded.text_encoder is not None:
        return prepare_text(loaded, calib_samples, calib_steps, eval_samples, eval_steps, seed, cache_dir,
                            guidance_scale)
    if guidance_scale is not None:
        raise SystemExit(f"--guidance-scale needs a text-to-image pipeline; {model} has no text encoder")
    unet, sc = loaded.unet, loaded.scheduler_config
    try:
        clf = load_reference_classifier()
        feature_fn, real_stats = clf.features, reference_real_feature_stats()
    except Exception as e:  # no classifier: no Frechet distance (reported as missing)
        log(f"no Frechet distance: {e}")
        feature_fn, real_stats = None, None
    t0 = time.perf_counter()
    calib = generate_trajectories(unet, sc, num_samples=calib_samples, num_steps=calib_steps, seed=seed,
                                  cond=loaded.default_condition(calib_samples), cache_dir=cache_dir, model_sha=loaded.sha256)
    t_traj = time.perf_counter() - t0
    heldout = generate_trajectories(unet, sc, num_samples=eval_samples, num_steps=eval_steps,
                                    seed=heldout_seed(seed), cond=loaded.default_condition(eval_samples),
                                    cache_dir=cache_dir, model_sha=loaded.sha256)
    return QualitySetup(loaded, calib, heldout, feature_fn, real_stats, t_traj)


def reference_sweep(args) -> tuple[Path, dict, QualitySetup, tuple[int, int]]:
    """What a sweep of calibrations on the reference model starts from (tools/budget_levels.py,
    tools/sampling_precision_quality.py): torch's threads set, the JSON record so far (`args.json`;
    runs already there are kept), the held-out setup and the bit widths of `args.bits`."""
    import json

    torch.set_num_threads(args.threads)
    store = Path(args.json)
    out = json.loads(store.read_text()) if store.is_file() else {"runs": {}}
    setup = prepare("reference", 8, 10, args.samples, args.eval_steps, args.seed, args.cache_dir)
    return store, out, setup, parse_bits(args.bits)


def prepare_text(loaded, calib_samples: int, calib_steps: int, eval_samples: int, eval_steps: int, seed: int,
                 cache_dir: str, guidance_scale: Optional[float] = None) -> QualitySetup:
    """The setup of a text-to-image pipeline, as the CLI makes it: calibration trajectories from
    `adpdm calibrate PIPE [--guidance-scale S]`'s conditions (the pipeline's default prompts in turn,
    negative prompt "", both guidance halves per seed) and the held-out set of `adpdm eval` (same
    prompts in turn, same guidance, held-out seeds), decoded by the VAE and judged by the digits classifier."""
    import time

    from adpdm_export.commands.eval_cmd import reference_classifier_inputs, text_eval_inputs
    from adpdm_export.text_prompts import calibration_conditions
    from calibration.trajectories import generate_trajectories, heldout_seed

    unet, sc = loaded.unet, loaded.scheduler_config
    conds = calibration_conditions(loaded, calib_samples, guidance_scale=guidance_scale)
    scale = conds.guidance_scale
    t0 = time.perf_counter()
    calib = generate_trajectories(unet, sc, num_samples=calib_samples, num_steps=calib_steps, seed=seed,
                                  cond=conds.cond, uncond=conds.uncond, guidance_scale=scale,
                                  cache_dir=cache_dir, model_sha=loaded.sha256)
    t_traj = time.perf_counter() - t0
    cond, uncond, decode, image_shape, labels, prompt_note = text_eval_inputs(loaded, eval_samples, None, None, scale)
    heldout = generate_trajectories(unet, sc, num_samples=eval_samples, num_steps=eval_steps,
                                    seed=heldout_seed(seed), cond=cond, uncond=uncond, guidance_scale=scale,
                                    cache_dir=cache_dir, model_sha=loaded.sha256)
    clf, real_stats, why = reference_classifier_inputs(image_shape)
    if why:
        log(f"no Frechet distance or prompt fidelity: {why}")
    text = TextEval(decode, None if labels is None else clf, labels, why or prompt_note)
    return QualitySetup(loaded, calib, heldout, None if clf is None else clf.features, real_stats, t_traj,
                        scale, text)


def evaluate_text_model(qmodel, setup: QualitySetup, batch_size: int) -> dict:
    """The metrics `adpdm eval` reports for a text pipeline (calibration.metrics.evaluate): noise rel-L2
    per sample, PSNR vs FP per decoded sample, FD, prompt fidelity of both models and their agreement."""
    from calibration.metrics import evaluate

    t = setup.text
    return evaluate(qmodel, setup.loaded.scheduler_config, setup.heldout, feature_fn=setup.feature_fn,
                    real_stats=setup.real_stats, batch_size=batch_size, decode=t.decode, classifier=t.classifier,
                    labels=t.labels)


def per_sample_psnr(images: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, data range 2, capped) of each sample vs its FP sample."""
    mse = ((images.float().clamp(-1, 1) - fp.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).clamp(max=PSNR_CAP_DB)


def evaluate_model(qmodel, scheduler_config, heldout, feature_fn, real_stats, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Metrics of `qmodel` on the held-out trajectories, and its final samples.

    noise rel-L2 vs FP per timestep (teacher forced) and mean (pooled); per sample (mean over
    timesteps): median (the figure targets are judged on), p90, max; off-range FP trajectories; final-sample PSNR vs FP over all
    samples, per chunk of CHUNK seeds and per sample; Frechet distance and its change vs FP.
    """
    from calibration.metrics import frechet_of, noise_report, psnr, sample_like

    noise = noise_report(qmodel, heldout, scheduler_config, batch_size)
    images = sample_like(qmodel, scheduler_config, heldout, batch_size)
    fp = heldout.final
    chunks = [psnr(images[i: i + CHUNK], fp[i: i + CHUNK]) for i in range(0, images.shape[0], CHUNK)]
    per = per_sample_psnr(images, fp)
    out = {
        **noise,
        "psnr_vs_fp_db": psnr(images, fp),
        "psnr_chunks_db": chunks,
        "psnr_chunk_std_db": float(torch.tensor(chunks).std()) if len(chunks) > 1 else 0.0,
        "psnr_per_sample_median_db": float(per.median()),
        "psnr_per_sample_p10_db": float(torch.quantile(per, 0.1)),
        "samples_below_20db": int((per < 20).sum()),
        "fd": None, "fd_fp": None, "fd_delta": None, "fd_delta_pct": None,
    }
    if feature_fn is not None:
        out["fd"] = frechet_of(images, feature_fn, real_stats)
        out["fd_fp"] = frechet_of(fp, feature_fn, real_stats)
        out["fd_delta"] = out["fd"] - out["fd_fp"]
        out["fd_delta_pct"] = 100.0 * out["fd_delta"] / out["fd_fp"]
    return out, images


def fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)
