"""Classifier-free guidance (Ho & Salimans 2022): label dropout in training, guided noise at sampling."""

from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def drop_labels(
    y: torch.Tensor, p_uncond: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """c <- null with probability p_uncond, independently per sample (CFG Algorithm 1, line 3)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def guided(net: Callable, y: torch.Tensor | None, w: float, null_class: int | None) -> EpsFn:
    """The noise prediction eps(x, t) that a sampler calls.

    Unconditional nets (y is None) are called as they are. Otherwise the guided noise
    eps~ = (1 + w) eps(x, c) - w eps(x, null)  (eq. 10) comes from one forward pass over a batch of 2B
    (conditional half, then unconditional half); w = 0 is the purely conditional model and needs only B.
    """
    if y is None:
        return lambda x, t: net(x, t)
    if w == 0:
        return lambda x, t: net(x, t, y)
    y2 = torch.cat([y, torch.full_like(y, null_class)])

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_c, eps_u = net(torch.cat([x, x]), torch.cat([t, t]), y2).chunk(2)
        return (1 + w) * eps_c - w * eps_u  # eq. 10

    return eps_fn
