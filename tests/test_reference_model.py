"""The bundled reference model: the UNet loads with attention, the classifier reads real digits,
the Frechet distance matches closed forms, and DDIM sampling through the project sampler works."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from adpdm_export.model_loading import load_model
from adpdm_export.reference import load_reference_classifier, reference_real_feature_stats
from calibration.digits_classifier import DigitsClassifier, prepare_digits
from calibration.frechet import feature_stats, frechet_distance
from engines.sampler import initial_noise, sample
from engines.scheduling import make_scheduler
from engines.torch_predictor import TorchNoisePredictor


@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


@pytest.fixture(scope="module")
def classifier():
    return load_reference_classifier()


@pytest.fixture(scope="module")
def heldout_digits():
    """200 digits of the classifier's held-out split (same split the training script uses)."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    assert sklearn
    d = load_digits()
    _, test_idx = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    idx = np.sort(test_idx)[:200]
    return prepare_digits(d.data[idx]), torch.as_tensor(d.target[idx])


def test_reference_loads_as_unet_with_attention(reference):
    assert reference.kind == "UNet2DModel"
    assert isinstance(reference.unet, UNet2DModel)
    assert reference.sample_shape == (1, 16, 16)
    assert reference.scheduler_config["num_train_timesteps"] == 1000
    assert reference.scheduler_config["prediction_type"] == "epsilon"
    n_attn = sum(isinstance(m, Attention) for m in reference.unet.modules())
    assert n_attn >= 2  # 8x8 down/up blocks and the mid block
    assert not reference.unet.training


def test_classifier_reads_real_digits(classifier, heldout_digits):
    x, y = heldout_digits
    assert x.shape == (200, 1, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    with torch.no_grad():
        acc = float((classifier(x).argmax(1) == y).float().mean())
        feats = classifier.features(x)
    assert acc >= 0.95
    assert feats.shape == (200, classifier.config["feature_dim"])
    assert not classifier.training


def test_real_feature_stats_match_the_classifier(classifier, heldout_digits):
    mu, sigma = reference_real_feature_stats()
    d = classifier.config["feature_dim"]
    assert mu.dtype == np.float64 and mu.shape == (d,) and sigma.shape == (d, d)
    np.testing.assert_allclose(sigma, sigma.T, atol=1e-10)
    assert np.linalg.eigvalsh(sigma).min() > -1e-8
    # held-out real digits are close to the full set, random noise images are far from it
    x, _ = heldout_digits
    with torch.no_grad():
        real = frechet_distance(*feature_stats(classifier.features(x)), mu, sigma)
        noise = frechet_distance(*feature_stats(classifier.features(torch.rand(200, 1, 16, 16) * 2 - 1)), mu, sigma)
    assert real < 0.25 * noise


def test_classifier_rebuilds_from_config(classifier):
    clone = DigitsClassifier.from_config({**classifier.config, "_class_name": "DigitsClassifier", "heldout_accuracy": 1.0})
    clone.load_state_dict(classifier.state_dict())
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(clone.eval()(x), classifier(x))


def test_frechet_closed_form_1d():
    # FD(N(m1, v1), N(m2, v2)) = (m1 - m2)^2 + v1 + v2 - 2 sqrt(v1 v2)
    got = frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]])
    assert got == pytest.approx(9.0 + 4.0 + 9.0 - 2 * 6.0)


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    # torch inputs give the same number
    t = [torch.as_tensor(a, dtype=torch.float32) for a in (mu1, np.diag(v1), mu2, np.diag(v2))]
    assert frechet_distance(*t) == pytest.approx(want, rel=1e-5)


def test_frechet_full_covariance_is_rotation_invariant_and_zero_on_itself():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    s1 = a @ a.T + 0.1 * np.eye(6)
    v1 = np.array([0.5, 1, 2, 3, 4, 5.0])
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert abs(frechet_distance(np.zeros(6), s1, np.zeros(6), s1)) < 1e-9
    # diagonal case rotated by the same orthogonal Q keeps the closed form
    v2 = v1[::-1].copy()
    want = np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(np.zeros(6), q @ np.diag(v1) @ q.T, np.zeros(6), q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(want, rel=1e-8)


def test_feature_stats_and_identical_samples():
    f = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.double().numpy(), rowvar=False), rtol=1e-12)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    with pytest.raises(ValueError):
        feature_stats(torch.zeros(1, 8))


def test_ddim_sampling_smoke(reference):
    sched = make_scheduler(reference.scheduler_config, "ddim")
    out = sample(TorchNoisePredictor(reference.unet), sched, initial_noise(6, reference.sample_shape, 0), num_steps=10)
    assert out.images.shape == (6, 1, 16, 16)
    assert torch.isfinite(out.images).all()
    assert float(out.images.abs().max()) < 1.5


@pytest.mark.slow
def test_reference_samples_are_confident_digits(reference, classifier):
    """The quality target at a smaller scale: DDIM 50 steps, 64 samples, most classified confidently."""
    sched = make_scheduler(reference.scheduler_config, "ddim")
    out = sample(TorchNoisePredictor(reference.unet), sched, initial_noise(64, reference.sample_shape, 123), num_steps=50)
    with torch.no_grad():
        conf = classifier(out.images.clamp(-1, 1)).softmax(1).max(1).values
    assert float((conf >= 0.9).float().mean()) >= 0.8
