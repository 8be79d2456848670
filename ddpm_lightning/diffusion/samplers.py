"""Samplers: an eps_fn(x, t) and the starting noise x_T in, images x_0 out.

``t`` passed to eps_fn is the 0-based step index of schedule.py (paper step t = index + 1). Classifier-free
guidance is already inside eps_fn (guidance.guided), so every sampler makes one network call per step.
``callback(i, x)``, if given, sees the state after each step (i: index of the step just taken).
``clip_x0``: every step clips its predicted x_0 to the data's [-1, 1], as DDPM's and guided-diffusion's released
samplers do (clip_denoised; diffusers' clip_sample); false: the equations as printed.
"""

from typing import Callable

import torch

from ddpm_lightning.diffusion.guidance import EpsFn
from ddpm_lightning.diffusion.schedule import Schedule
from ddpm_lightning.errors import ConfigError

StepCallback = Callable[[int, torch.Tensor], None] | None


def clipped(x: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted x_0 clipped to [-1, 1], and the eps that predicts it from x_t (eq. 3 solved both ways)."""
    x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
    return x0, (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()


def timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """A decreasing subsequence tau_N > ... > tau_1 of the 0-based indices 0..T-1, one per network call.

    uniform: tau = round(T - k T/N) - 1, k = 0..N-1 (starts at T-1; diffusers' "trailing" spacing);
    quadratic: tau_k ~ (T - 1) (k / (N - 1))^2, k = 0..N-1 (DDIM's quadratic spacing over the full range, from
    T-1 down to 0, each index at least one above the one below it).
    """
    if not 1 <= steps <= T:
        raise ConfigError(f"sampler.steps={steps} must lie in 1..T={T}")
    if spacing == "uniform":
        return [round(T - k * T / steps) - 1 for k in range(steps)]
    if spacing == "quadratic":
        seq = [0]
        for k in range(1, steps):
            seq.append(max(round((T - 1) * (k / (steps - 1)) ** 2), seq[-1] + 1))
        if seq[-1] > T - 1:
            raise ConfigError(
                f"sampler.steps={steps} is too many for quadratic spacing over T={T}; use fewer steps or spacing=uniform"
            )
        return seq[::-1] if steps > 1 else [T - 1]
    raise ConfigError(f"sampler.spacing={spacing!r} is unknown; use uniform or quadratic")


@torch.no_grad()
def ancestral(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    variance: str = "beta",
    callback: StepCallback = None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """Algorithm 2 of the paper over all T steps.

    variance="beta" uses sigma_t^2 = beta_t (the paper's choice); variance="posterior" uses
    beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t. No noise is added at t = 1.
    """
    if variance not in ("beta", "posterior"):
        raise ConfigError(f"sampler.variance={variance!r} is unknown; use beta or posterior")
    sigma = (schedule.betas if variance == "beta" else schedule.posterior_variance).sqrt()
    coef_eps = schedule.betas / (1 - schedule.alpha_bar).sqrt()  # (1 - alpha_t) / sqrt(1 - alpha_bar_t)
    inv_sqrt_alpha = schedule.alphas.rsqrt()
    x = x_T
    t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in reversed(range(schedule.T)):
        eps = eps_fn(x, t.fill_(i))
        if clip_x0:  # eq. 7 with this eps is the mean of q(x_{t-1} | x_t, clipped x_0)
            eps = clipped(x, eps, schedule.alpha_bar[i])[1]
        x = inv_sqrt_alpha[i] * (x - coef_eps[i] * eps)  # mu_theta(x_t, t), eq. 7
        if i > 0:  # z ~ N(0, I) if t > 1, else z = 0 (Algorithm 2, line 3)
            x = x + sigma[i] * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if callback:
            callback(i, x)
    return x


@torch.no_grad()
def ddim(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    callback: StepCallback = None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a subsequence tau of the steps; eta = 0 is deterministic, eta = 1
    has the DDPM posterior variance. The step after tau_1 lands on x_0 (alpha_bar = 1)."""
    seq = timesteps(schedule.T, steps, spacing)
    ab = schedule.alpha_bar
    one = torch.ones((), device=ab.device)
    x = x_T
    t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for k, i in enumerate(seq):
        ab_t, ab_s = ab[i], (ab[seq[k + 1]] if k + 1 < len(seq) else one)
        eps = eps_fn(x, t.fill_(i))
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()  # predicted x_0
        if clip_x0:
            x0, eps = clipped(x, eps, ab_t)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()  # sigma_tau(eta), eq. 16
        x = ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps  # eq. 12
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if callback:
            callback(i, x)
    return x


@torch.no_grad()
def dpm_solver(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    steps: int = 20,
    spacing: str = "uniform",
    callback: StepCallback = None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data prediction, with alpha_t = sqrt(alpha_bar_t),
    sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t). The first step and the last one, into
    sigma = 0, are first order (DDIM); the others are the second-order multistep update."""
    seq = timesteps(schedule.T, steps, spacing)
    ab = schedule.alpha_bar
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = alpha.log() - sigma.log()
    x = x_T
    t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    x0_prev, h_prev = None, None
    for k, i in enumerate(seq):
        eps = eps_fn(x, t.fill_(i))
        x0 = (x - sigma[i] * eps) / alpha[i]  # data prediction
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if k + 1 == len(seq):  # into sigma = 0: x_0 is the data prediction itself
            x = x0
        else:
            j = seq[k + 1]
            h = lam[j] - lam[i]
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))  # D = (1 + 1/2r) m_0 - 1/2r m_1
            x = (sigma[j] / sigma[i]) * x - alpha[j] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback:
            callback(i, x)
    return x


SAMPLERS = {"ancestral": ancestral, "ddim": ddim, "dpm_solver": dpm_solver}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
