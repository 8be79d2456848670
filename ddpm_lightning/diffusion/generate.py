"""Noise -> sampler -> uint8 images, in batches, with classifier-free guidance and a stop check."""

from typing import Callable

import torch

from ddpm_lightning.diffusion.guidance import guided
from ddpm_lightning.diffusion.samplers import StepCallback, get_sampler
from ddpm_lightning.diffusion.schedule import Schedule
from ddpm_lightning.errors import Interrupted


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def stoppable(eps_fn, stop_requested: Callable[[], bool] | None):
    """eps_fn that raises Interrupted, before the next sampler step, once ``stop_requested()`` is true."""
    if stop_requested is None:
        return eps_fn

    def checked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if stop_requested():
            raise Interrupted("a preemption signal arrived while sampling")
        return eps_fn(x, t)

    return checked


@torch.no_grad()
def generate(
    net,
    schedule: Schedule,
    sampler: dict,
    n: int,
    image_shape: tuple[int, int, int],
    labels: torch.Tensor | None = None,
    w: float = 0.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
    callback: StepCallback = None,
    stop_requested: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """``n`` images as uint8 (n, C, H, W): x_T ~ N(0, I), then the sampler ``sampler["name"]`` with its other settings
    over eps(x, t) = net(x, t, y), guided with weight ``w`` (eq. 10) when ``labels`` (one per image) are given.
    ``batch_size`` images at a time; ``callback(i, x)`` sees every intermediate state; ``stop_requested`` is checked
    before every network call (generation then raises Interrupted)."""
    settings = dict(sampler)
    run_sampler = get_sampler(settings.pop("name"))
    device = schedule.device
    out = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        y = None if labels is None else labels[start : start + size]
        x_T = torch.randn((size, *image_shape), device=device, generator=generator)
        eps_fn = stoppable(guided(net, y, w, null_class), stop_requested)
        out.append(to_uint8(run_sampler(eps_fn, schedule, x_T, generator=generator, callback=callback, **settings)))
    return torch.cat(out)
