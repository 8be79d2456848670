import pytest
import torch

from ddpm_lightning.diffusion.samplers import ancestral
from ddpm_lightning.diffusion.schedule import build_schedule

MEAN, STD = torch.tensor([0.5, -0.3, 0.0]), torch.tensor([0.2, 0.5, 0.05])


def exact_eps(schedule):
    """E[eps | x_t] for data x_0 ~ N(MEAN, diag(STD^2)): the optimal noise predictor in closed form."""

    def eps_fn(x, t):
        ab = schedule.alpha_bar[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * MEAN) / (ab * STD**2 + 1 - ab)

    return eps_fn


@pytest.mark.parametrize("variance, tol", [("beta", 0.05), ("posterior", 0.12)])
def test_ancestral_with_the_exact_predictor_reproduces_the_data(variance, tol):
    s = build_schedule("linear", T=500)
    g = torch.Generator().manual_seed(0)
    x = ancestral(exact_eps(s), s, torch.randn(40_000, 3, generator=g), g, variance)
    assert torch.allclose(x.mean(0), MEAN, atol=0.015)
    assert torch.allclose(x.std(0), STD, rtol=tol)


def test_ancestral_visits_every_step_once_from_T_down_to_1():
    s = build_schedule("linear", T=50)
    seen = []

    def eps_fn(x, t):
        assert (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ancestral(eps_fn, s, torch.zeros(4, 3))
    assert seen == list(range(49, -1, -1))  # paper steps t = 50..1 as 0-based indices


def test_last_step_adds_no_noise():
    """With eps = 0 and T = 1, x_0 = x_1 / sqrt(alpha_1) exactly (z = 0 at t = 1)."""
    s = build_schedule("linear", T=1)
    x1 = torch.randn(8, 3)
    x0 = ancestral(lambda x, t: torch.zeros_like(x), s, x1)
    assert torch.allclose(x0, x1 / s.alphas[0].sqrt())
