import pytest
import torch

from ddpm_lightning.diffusion.guidance import drop_labels, guided
from ddpm_lightning.diffusion.samplers import ancestral
from ddpm_lightning.diffusion.schedule import build_schedule


class FakeNet:
    """eps(x, t, y) = y + 10 (the null class is 4): records the batch size of every call."""

    null_class = 4

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(x.shape[0])
        return torch.zeros_like(x) + (y.float() + 10)[:, None]


def test_guided_noise_is_eq10():
    net, y, x, t = FakeNet(), torch.tensor([0, 1, 2]), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    w = 2.5
    eps = guided(net, y, w, net.null_class)(x, t)
    expected = (1 + w) * (y.float() + 10) - w * (4 + 10)
    assert torch.allclose(eps, expected[:, None].expand(3, 2))
    assert net.calls == [6]  # one forward pass over 2B


def test_w0_is_the_conditional_prediction():
    net, y = FakeNet(), torch.tensor([3, 1])
    eps = guided(net, y, 0.0, net.null_class)(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(eps, (y.float() + 10)[:, None].expand(2, 2))
    assert net.calls == [2]


def test_one_network_call_per_guided_step():
    net, s = FakeNet(), build_schedule("linear", T=20)
    ancestral(guided(net, torch.tensor([0, 1, 2]), 1.0, net.null_class), s, torch.zeros(3, 2))
    assert net.calls == [6] * 20


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_label_drop_rate_is_p_uncond(p):
    y = torch.randint(0, 4, (200_000,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, p, null_class=4, generator=torch.Generator().manual_seed(2))
    dropped = out == 4
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.005)
    assert torch.equal(out[~dropped], y[~dropped])
