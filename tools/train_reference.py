"""Train the bundled reference model: a digits DDPM UNet and the digits classifier used for metrics.

Everything is seeded and runs on the CPU (2 threads by default) in about a quarter of an hour:

    .venv/bin/python tools/train_reference.py            # writes adpdm_export/assets/reference

Data: sklearn `load_digits` (1797 8x8 images, 0..16) upsampled bilinearly to 16x16, 1 channel,
scaled to [-1, 1]. The classifier trains on a fixed stratified 80% split and reports accuracy
on the other 20%; the UNet trains on all digits. At the end the EMA UNet is sampled with the
project sampler (DDIM, 50 steps) and judged by the classifier: the fraction of samples classified
with confidence >= 0.9, and the Frechet distance of classifier features to the full real set.
A JSON summary is printed (and written with --summary-json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# Must precede the torch import (libgomp reads it once). With the default spin-waiting, 2 OpenMP
# threads on 2 cores shared with other jobs ran a step ~5x slower (measured: 1.3 s -> 6-10 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adpdm_export.model_loading import REFERENCE_DIR  # noqa: E402
from calibration.digits_classifier import DigitsClassifier, prepare_digits  # noqa: E402
from calibration.frechet import feature_stats, frechet_distance  # noqa: E402
from engines.images import save_grid  # noqa: E402
from engines.sampler import initial_noise, sample  # noqa: E402
from engines.scheduling import make_scheduler  # noqa: E402
from engines.torch_predictor import TorchNoisePredictor  # noqa: E402

IMAGE_SIZE = 16
CONFIDENCE = 0.9


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(seed: int, heldout: float):
    """All digits in model space, their labels, and the fixed stratified train/held-out split indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = prepare_digits(d.data, IMAGE_SIZE)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=heldout, stratify=d.target, random_state=seed)
    return x, y, torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(test_idx))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with background (-1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, oy: oy + h, ox: ox + w] for i, (oy, ox) in enumerate(off.tolist())])


def build_unet(layers_per_block: int) -> UNet2DModel:
    """16 -> 8 -> 4 resolutions; self-attention at 8x8 (down and up) and in the 4x4 mid block."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


@torch.no_grad()
def accuracy(clf: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    clf.eval()
    return float((clf(x).argmax(1) == y).float().mean())


def train_classifier(x, y, train_idx, test_idx, args) -> tuple[DigitsClassifier, float, float]:
    """Adam + cosine LR, +-1 px shifts so generated digits off by a pixel are still read right."""
    t0 = time.time()
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 11)
    clf = DigitsClassifier(in_channels=1, image_size=IMAGE_SIZE, channels=(32, 64), feature_dim=64, num_classes=10)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    xtr, ytr = x[train_idx], y[train_idx]
    per_epoch = math.ceil(len(ytr) / 64)
    total = args.clf_epochs * per_epoch
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, per_epoch, total, floor=0.0))
    for epoch in range(args.clf_epochs):
        clf.train()
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(per_epoch):
            b = perm[i * 64: (i + 1) * 64]
            loss = F.cross_entropy(clf(random_shift(xtr[b], 1, gen)), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.clf_epochs:
            acc = accuracy(clf, x[test_idx], y[test_idx])
            print(f"[classifier] epoch {epoch + 1}/{args.clf_epochs} loss {loss.item():.4f} held-out acc {acc:.4f}", flush=True)
    clf.eval()
    return clf, accuracy(clf, x[test_idx], y[test_idx]), time.time() - t0


@torch.no_grad()
def judge(unet, scheduler_config, clf, real_stats, n: int, steps: int, seed: int) -> dict:
    """Sample n digits with DDIM (project sampler) and score them with the classifier."""
    unet.eval()
    sched = make_scheduler(dict(scheduler_config), "ddim")
    out = sample(TorchNoisePredictor(unet), sched, initial_noise(n, (1, IMAGE_SIZE, IMAGE_SIZE), seed), num_steps=steps, seed=seed)
    images = out.images.clamp(-1, 1)
    probs = clf(images).softmax(1)
    conf, label = probs.max(1)
    fd = frechet_distance(*feature_stats(clf.features(images)), *real_stats)
    return {
        "images": images,
        "fraction_confident": float((conf >= CONFIDENCE).float().mean()),
        "mean_confidence": float(conf.mean()),
        "class_counts": torch.bincount(label, minlength=10).tolist(),
        "frechet_distance": fd,
        "finite": bool(torch.isfinite(out.images).all()),
    }


class EMA:
    """Exponential moving average of the weights, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)


def train_unet(x, args, clf, real_stats) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """AdamW + warmup/cosine LR, grad-norm clip 1, EMA; epsilon MSE at uniform random timesteps."""
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 23)
    unet = build_unet(args.layers_per_block).train()
    sched = build_scheduler()
    ema = EMA(unet, args.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.warmup, args.steps))
    print(f"[unet] {n_params(unet):,} parameters, {args.steps} steps of batch {args.batch_size}", flush=True)
    t0, losses, history = time.time(), [], []
    eval_seconds = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        x0 = random_shift(x[idx], args.shift, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.update(unet)
        losses.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            el = time.time() - t0 - eval_seconds
            print(
                f"[unet] step {done}/{args.steps} loss(avg {args.log_every}) {np.mean(losses[-args.log_every:]):.4f} "
                f"lr {lr_sched.get_last_lr()[0]:.2e} {el:.0f}s elapsed, ~{el / done * (args.steps - done):.0f}s left",
                flush=True,
            )
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            te = time.time()
            r = judge(ema.model, sched.config, clf, real_stats, 64, 25, args.seed + 1000)
            eval_seconds += time.time() - te
            history.append({"step": done, "fraction_confident": r["fraction_confident"], "frechet_distance": r["frechet_distance"]})
            print(f"[unet] check @ {done} (EMA, 64 samples, DDIM 25): confident {r['fraction_confident']:.3f} FD {r['frechet_distance']:.2f}", flush=True)
    info = {
        "train_seconds": time.time() - t0 - eval_seconds,
        "final_loss": float(np.mean(losses[-100:])),
        "checks": history,
    }
    return ema.model.eval(), sched, info


def write_bundle(out: Path, unet: UNet2DModel, sched: DDPMScheduler, clf: DigitsClassifier, clf_meta: dict, real_stats) -> int:
    """Write the pipeline folder + classifier next to `out`, then move each entry into place."""
    tmp = out.parent / (out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp, safe_serialization=True)
    cdir = tmp / "classifier"
    cdir.mkdir(parents=True)
    (cdir / "config.json").write_text(json.dumps({"_class_name": "DigitsClassifier", **clf.config, **clf_meta}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(cdir / "model.safetensors"), metadata={"format": "pt"})
    mu, sigma = real_stats
    save_file(
        {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)},
        str(cdir / "real_features.safetensors"),
        metadata={"what": "mean/cov (float64) of classifier features over all 1797 sklearn digits"},
    )
    return install_folder(tmp, out)


def install_folder(tmp: Path, out: Path) -> int:
    """Move everything written into `tmp` over the same names in `out` (a finished model replaces the
    shipped one entry by entry, nothing half-written); returns the bytes now in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir()):
        dest = out / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        entry.rename(dest)
    tmp.rmdir()
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REFERENCE_DIR, help="pipeline folder to write")
    p.add_argument("--steps", type=int, default=2000, help="UNet optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--shift", type=int, default=0, help="max random shift (px) augmenting UNet training")
    p.add_argument("--clf-epochs", type=int, default=40)
    p.add_argument("--heldout", type=float, default=0.2, help="classifier held-out fraction (stratified)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=256, help="samples for the final evaluation")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the final evaluation")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500, help="quick EMA check every N steps (0: off)")
    p.add_argument("--grid", default=str(ROOT / "docs" / "img" / "reference-samples.png"), help="sample grid PNG ('' to skip)")
    p.add_argument("--summary-json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    x, y, train_idx, test_idx = load_data(args.seed, args.heldout)
    print(f"[data] {len(x)} digits -> {tuple(x.shape[1:])} in [{x.min():.0f}, {x.max():.0f}]; "
          f"classifier split {len(train_idx)} train / {len(test_idx)} held out", flush=True)

    clf, clf_acc, clf_seconds = train_classifier(x, y, train_idx, test_idx, args)
    with torch.no_grad():
        feats = clf.features(x)
    real_stats = feature_stats(feats)
    gen = torch.Generator().manual_seed(args.seed + 7)
    real256 = torch.randperm(len(x), generator=gen)[: args.num_samples]
    fd_real_subset = frechet_distance(*feature_stats(feats[real256]), *real_stats)
    fd_heldout = frechet_distance(*feature_stats(feats[test_idx]), *feature_stats(feats[train_idx]))
    print(f"[classifier] {n_params(clf):,} params, held-out acc {clf_acc:.4f} ({clf_seconds:.0f}s); "
          f"FD floors: {args.num_samples} real vs all {fd_real_subset:.3f}, held-out vs train {fd_heldout:.3f}", flush=True)

    unet, sched, info = train_unet(x, args, clf, real_stats)
    te = time.time()
    r = judge(unet, sched.config, clf, real_stats, args.num_samples, args.sample_steps, args.seed)
    eval_seconds = time.time() - te
    if args.grid:  # a str: Path("") would be "." and never empty
        save_grid(r["images"][:64], args.grid, ncols=8, scale=4)
        print(f"[eval] grid of 64 samples -> {args.grid}", flush=True)

    clf_meta = {
        "features": "post-ReLU output of `feature` (penultimate layer)",
        "input": "(B, 1, 16, 16) float32 in [-1, 1]: sklearn digits /16, bilinear x2, *2-1",
        "heldout_accuracy": round(clf_acc, 5),
        "heldout_split": {"fraction": args.heldout, "stratified": True, "random_state": args.seed},
    }
    size = write_bundle(args.out, unet, sched, clf, clf_meta, real_stats)
    summary = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "unet_params": n_params(unet),
        "classifier_params": n_params(clf),
        "train_seconds_unet": round(info["train_seconds"], 1),
        "train_seconds_classifier": round(clf_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "final_loss": round(info["final_loss"], 5),
        "classifier_heldout_accuracy": round(clf_acc, 5),
        "eval": {"samples": args.num_samples, "sampler": f"ddim-{args.sample_steps}", "seconds": round(eval_seconds, 1)},
        "fraction_confident": r["fraction_confident"],
        "confidence_threshold": CONFIDENCE,
        "mean_confidence": round(r["mean_confidence"], 4),
        "class_counts": r["class_counts"],
        "frechet_distance": round(r["frechet_distance"], 4),
        "fd_floor_real_subset_vs_all": round(fd_real_subset, 4),
        "fd_heldout_vs_train": round(fd_heldout, 4),
        "checks": info["checks"],
        "bundle_bytes": size,
        "torch": torch.__version__,
    }
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(text + "\n")
    ok = r["finite"] and r["fraction_confident"] >= 0.9 and clf_acc >= 0.97 and size < 10_000_000
    if not ok:
        print("[eval] TARGETS MISSED: need finite samples, >= 90% confident, classifier >= 97%, bundle < 10 MB", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
