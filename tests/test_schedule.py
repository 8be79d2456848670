import math

import pytest
import torch

from ddpm_lightning.diffusion.schedule import build_schedule, cosine_betas, linear_betas


def test_linear_schedule_endpoints_and_indexing():
    s = build_schedule("linear", T=500)
    # index i holds paper step t = i + 1: betas[0] = beta_1, betas[T-1] = beta_T
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)  # alpha_bar_1 = alpha_1
    assert s.alpha_bar_prev[0].item() == 1.0  # alpha_bar_0 = 1
    assert s.posterior_variance[0].item() == 0.0  # beta-tilde_1 = 0


def test_alpha_bar_is_the_running_product():
    s = build_schedule("linear", T=500)
    prod = 1.0
    for i in range(500):
        prod *= 1 - s._f64["betas"][i].item()
        assert s._f64["alpha_bar"][i].item() == pytest.approx(prod, rel=1e-12)
    assert s.alpha_bar[-1].item() == pytest.approx(6.35e-3, rel=0.01)
    assert s.prior_gap == pytest.approx(math.sqrt(6.35e-3), rel=0.01)


@pytest.mark.parametrize("t", [1, 10, 100, 499])
def test_q_sample_matches_t_applications_of_eq1(t):
    """x_t from t steps of q(x_t | x_{t-1}) (eq. 1) and from the closed form (eq. 3) agree in mean and variance."""
    s = build_schedule("linear", T=500)
    g = torch.Generator().manual_seed(t)
    n = 200_000
    x0 = torch.full((n,), 0.7)
    x = x0.clone()
    for i in range(t):  # paper steps 1..t are indices 0..t-1
        x = s.q_step(x, i, torch.randn(n, generator=g))
    closed = s.q_sample(x0, torch.full((n,), t - 1), torch.randn(n, generator=g))
    ab = s.alpha_bar[t - 1].item()
    for sample in (x, closed):
        assert sample.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
        assert sample.var().item() == pytest.approx(1 - ab, abs=0.01)


def test_cosine_schedule_is_valid():
    betas = cosine_betas(1000)
    assert (betas > 0).all() and (betas <= 0.999).all()
    s = build_schedule("cosine", T=1000)
    assert s.alpha_bar[-1].item() < 1e-6


def test_linear_betas_are_float64_linspace():
    b = linear_betas(5, 0.1, 0.5)
    assert b.dtype == torch.float64
    assert torch.allclose(b, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
