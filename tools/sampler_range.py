"""FP sampling of the bundled model with DDIM, with and without eps re-derived from the clipped x0.

    .venv/bin/python tools/sampler_range.py [--samples 256] [--steps 50,100]

Prints, per step count and per DDIM step rule (diffusers' default: raw eps beside the clipped x0;
ours: `engines.sampler.scheduler_step_kwargs`), the seeds whose trajectory leaves the data range
(`calibration.metrics.off_range_items`), the largest |x_t|, the fraction of digits the bundled
classifier labels with confidence >= 0.9 and the Frechet distance to the real digits. The table
in docs/method.md ("Sampler") comes from this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> None:
    from adpdm_export.model_loading import load_model
    from adpdm_export.reference import load_reference_classifier, reference_real_feature_stats
    from calibration.frechet import feature_stats, frechet_distance
    from calibration.metrics import off_range_items
    from calibration.trajectories import TrajectorySet
    from engines.sampler import initial_noise, sample
    from engines.scheduling import make_scheduler
    from engines.torch_predictor import TorchNoisePredictor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", default="50,100")
    p.add_argument("--seed", type=int, default=1_000_000, help="first seed (item i uses seed + i)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model("reference")
    clf, real = load_reference_classifier(), reference_real_feature_stats()
    noise = torch.cat([initial_noise(1, lm.sample_shape, args.seed + i) for i in range(args.samples)])
    print("| DDIM steps | step | seeds off range | max abs x_t | confident >= 0.9 | FD |")
    print("|---:|---|---:|---:|---:|---:|")
    for steps in [int(s) for s in args.steps.split(",")]:
        for rule in ("diffusers default", "eps re-derived (ours)"):
            sched = make_scheduler(lm.scheduler_config, "ddim")
            if rule == "diffusers default":
                step = sched.step
                sched.step = lambda *a, _s=step, **k: _s(*a, **{**k, "use_clipped_model_output": False})
            out = sample(TorchNoisePredictor(lm.unet), sched, noise, steps, keep_trajectory=True)
            tr = out.trajectory
            ts = TrajectorySet(timesteps=tr.timesteps, x_t=tr.x_t, eps=tr.eps, x0_hat=tr.x0_hat, final=out.images,
                               noise=noise, settings={"seed": args.seed})
            off = off_range_items(ts, lm.scheduler_config)
            images = out.images.clamp(-1, 1)
            with torch.no_grad():
                conf = clf(images).softmax(1).max(1).values
                fd = frechet_distance(*feature_stats(clf.features(images)), *real)
            print(f"| {steps} | {rule} | {len(off)} | {float(tr.x_t.abs().max()):.1f} | "
                  f"{100 * float((conf >= 0.9).float().mean()):.1f}% | {float(fd):.1f} |", flush=True)


if __name__ == "__main__":
    main()
