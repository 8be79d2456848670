"""Speed options must not change the result: the same seeds give the same loss curve within noise."""

import pytest
import torch

from ddpm_lightning.data import random_hflip, step_seed, to_unit_range
from ddpm_lightning.module import DiffusionModule


def loss_curve(steps: int, compile: bool, channels_last: bool, bf16: bool) -> torch.Tensor:
    torch.manual_seed(0)
    m = DiffusionModule(net=dict(width=8, emb_dim=32, heads=2), schedule=dict(kind="linear", T=500), class_names=["a", "b"],
                        conditional=True, p_uncond=0.1, guidance_w=1.0, sampler=dict(name="ddim", steps=2),
                        compile=compile, channels_last=channels_last)
    m.setup("fit")
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(1)
    colours = torch.randint(0, 256, (2, 3, 1, 1), generator=g, dtype=torch.uint8)
    losses = []
    for step in range(steps):
        y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(step))
        x = to_unit_range(colours[y].expand(16, 3, 32, 32))
        gen = torch.Generator().manual_seed(step_seed(0, step, 0))
        x = random_hflip(x, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m.loss(x, y, generator=gen, net=m.forward_train)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_speed_options_give_the_loss_curve_of_the_all_off_path():
    off = loss_curve(300, compile=False, channels_last=False, bf16=False)
    on = loss_curve(300, compile=True, channels_last=True, bf16=True)
    assert torch.isfinite(on).all()
    assert off[-100:].mean() < 0.5 * off[:20].mean()  # it learns
    # the same draws each step: per-step losses track each other, and the late means agree within noise
    late_off, late_on = off[-100:], on[-100:]
    assert abs(late_on.mean() - late_off.mean()) < 2 * late_off.std() / 10 + 0.05 * late_off.mean()
    assert torch.corrcoef(torch.stack([off, on]))[0, 1] > 0.9
