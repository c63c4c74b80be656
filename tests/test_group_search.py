"""ADP-DM group search: planted partition recovery, entropy -> one-hot, tables, refinement."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibration.group_search import CalibSet, GroupSearchConfig, fp_predictions, search_groups, step_errors
from calibration.qconfig import QuantConfig
from calibration.quant_unet import activation_quantizers, get_state, quantize_model
from calibration.weight_clipping import calibrate_weights

SWITCHES = (150, 450)  # planted: activation range switches at these timesteps
FACTORS = (1.0, 16.0, 256.0)


class PlantedModel(nn.Module):
    """eps(x, t): a tiny conv net whose hidden activation is scaled by a factor that switches at
    SWITCHES (and divided back after the next conv): in FP the factor cancels, quantized a single
    scale cannot serve all three ranges, so the best partition has boundaries at SWITCHES."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_a = nn.Conv2d(1, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv_c = nn.Conv2d(8, 1, 3, padding=1)

    factors = FACTORS

    def factor(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).float()
        f = torch.full_like(t, self.factors[0])
        f = torch.where(t >= SWITCHES[0], torch.full_like(t, self.factors[1]), f)
        f = torch.where(t >= SWITCHES[1], torch.full_like(t, self.factors[2]), f)
        return f

    def forward(self, sample, timestep):
        f = self.factor(timestep).to(sample.dtype)
        f = f.expand(sample.shape[0]) if f.numel() == 1 else f
        f = f.view(-1, 1, 1, 1)
        h = F.relu(self.conv_a(sample)) * f
        h = self.conv_b(h) / f
        return self.conv_c(F.relu(h))


def planted_setup(a_bits=6, steps=24, items=12, seed=0, factors=None):
    model = PlantedModel(seed)
    if factors is not None:
        model.factors = factors
    cfg = QuantConfig(w_bits=8, a_bits=a_bits, fp_layers=())
    qm = quantize_model(model, cfg, num_train_timesteps=1000)
    calibrate_weights(qm, search=False)
    gen = torch.Generator().manual_seed(seed)
    ts = torch.linspace(990, 0, steps).round().to(torch.int64)
    x = torch.randn(steps, items, 1, 8, 8, generator=gen)
    eps = fp_predictions(qm, ts, x)
    return qm, CalibSet(ts, x, eps)


def regime(t: int) -> int:
    return sum(t >= s for s in SWITCHES)


FAST = dict(search_iters=120, refine_iters=10, batch_size=16, seed=0)
SEARCH = dict(FAST, partition="search")  # the paper's relaxed search deciding the partition


pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_recovers_planted_partition():
    qm, data = planted_setup()
    out = search_groups(qm, data, GroupSearchConfig(num_groups=3, **SEARCH))
    groups = out.step_groups.tolist()
    regimes = [regime(int(t)) for t in data.timesteps]
    # the found partition equals the planted one (up to renaming)
    assert out.num_groups == 3
    pairs = set(zip(groups, regimes))
    assert len(pairs) == 3, pairs
    # canonical numbering: group 0 holds the smallest timesteps
    assert groups == regimes


def test_search_with_more_groups_never_straddles_a_switch():
    qm, data = planted_setup()
    out = search_groups(qm, data, GroupSearchConfig(num_groups=4, **SEARCH))
    by_group = {}
    for g, t in zip(out.step_groups.tolist(), data.timesteps.tolist()):
        by_group.setdefault(g, set()).add(regime(int(t)))
    assert all(len(r) == 1 for r in by_group.values()), by_group
    assert 3 <= out.num_groups <= 4


def test_search_beats_uniform_groups_on_planted_model():
    qm, data = planted_setup()
    search_groups(qm, data, GroupSearchConfig(num_groups=3, **SEARCH))
    searched = float(step_errors(qm, data).mean())
    qm2, _ = planted_setup()
    base = search_groups(qm2, data, GroupSearchConfig(num_groups=3, search_iters=0, refine_iters=0, partition="search"))
    uniform = float(step_errors(qm2, data).mean())
    assert base.num_groups == 3
    assert searched < 0.5 * uniform, (searched, uniform)


def test_entropy_term_drives_weights_to_one_hot():
    # no planted switch: every group serves every step about equally well, so only the
    # entropy term can make the weights one-hot (temperature held at 1)
    flat = (1.0, 1.0, 1.0)
    kw = dict(num_groups=3, search_iters=80, refine_iters=0, batch_size=16, temp_start=1.0, temp_end=1.0, partition="search")
    qm, data = planted_setup(factors=flat)
    on = search_groups(qm, data, GroupSearchConfig(entropy_weight=1.0, entropy_ramp=0.0, **kw))
    qm2, _ = planted_setup(factors=flat)
    off = search_groups(qm2, data, GroupSearchConfig(entropy_weight=0.0, **kw))
    # 0.96-0.97 (0.961 with ONEDNN_MAX_CPU_ISA=AVX2) against 0.41 without the term
    assert on.mean_max_pi() > 0.9 and on.mean_max_pi() - off.mean_max_pi() > 0.4, (on.mean_max_pi(), off.mean_max_pi())
    assert off.mean_max_pi() < 0.8, off.mean_max_pi()


def test_search_is_reproducible_and_installs_table():
    qm, data = planted_setup(steps=12, items=8)
    cfg = GroupSearchConfig(num_groups=2, search_iters=20, refine_iters=5)
    a = search_groups(qm, data, cfg)
    sa = {n: q.scale.clone() for n, q in activation_quantizers(qm).items()}
    qm2, _ = planted_setup(steps=12, items=8)
    b = search_groups(qm2, data, cfg)
    assert torch.equal(a.step_groups, b.step_groups)
    for n, q in activation_quantizers(qm2).items():
        assert torch.equal(sa[n], q.scale), n
    assert torch.equal(get_state(qm).table, a.table)
    assert all(q.log_scale is None for q in activation_quantizers(qm).values())


def test_per_step_partition_is_the_learned_ceiling():
    """partition='per-step': one group per calibration step, scales learned like the search's, at
    least as good as searched groups on the planted model (it can represent any partition)."""
    qm, data = planted_setup()
    out = search_groups(qm, data, GroupSearchConfig(partition="per-step", **FAST))
    assert out.num_groups == data.num_steps
    assert sorted(out.step_groups.tolist()) == list(range(data.num_steps))
    per_step = float(step_errors(qm, data).mean())
    qm3, _ = planted_setup()
    search_groups(qm3, data, GroupSearchConfig(num_groups=3, **SEARCH))
    assert per_step <= 1.05 * float(step_errors(qm3, data).mean())
    with pytest.raises(Exception, match="partition"):
        GroupSearchConfig(partition="nope").validate()


def test_one_group_learns_its_scales_for_the_search_iterations_too():
    """G = 1 gets the same scale learning as G > 1 (search_iters + refine_iters), not refinement alone."""
    def scales_after(search_iters):
        qm, data = planted_setup()
        search_groups(qm, data, GroupSearchConfig(num_groups=1, search_iters=search_iters, refine_iters=0, batch_size=16))
        return torch.cat([q.scale.detach().flatten() for q in activation_quantizers(qm).values()])

    assert not torch.equal(scales_after(0), scales_after(20))


def test_scale_dp_search_recovers_planted_partition():
    qm, data = planted_setup()
    out = search_groups(qm, data, GroupSearchConfig(num_groups=3, partition="scale-dp", **FAST))
    assert out.num_groups == 3
    assert out.step_groups.tolist() == [regime(int(t)) for t in data.timesteps]
