"""Samplers: an eps_fn(x, t) and the starting noise x_T in, images x_0 out.

``t`` passed to eps_fn is the 0-based step index of schedule.py (paper step t = index + 1).
"""

import torch

from ddpm_lightning.diffusion.guidance import EpsFn
from ddpm_lightning.diffusion.schedule import Schedule


@torch.no_grad()
def ancestral(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    variance: str = "beta",
) -> torch.Tensor:
    """Algorithm 2 of the paper over all T steps.

    variance="beta" uses sigma_t^2 = beta_t (the paper's choice); variance="posterior" uses
    beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t. No noise is added at t = 1.
    """
    sigma2 = {"beta": schedule.betas, "posterior": schedule.posterior_variance}[variance]
    coef_eps = schedule.betas / (1 - schedule.alpha_bar).sqrt()  # (1 - alpha_t) / sqrt(1 - alpha_bar_t)
    x = x_T
    t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in reversed(range(schedule.T)):
        eps = eps_fn(x, t.fill_(i))
        x = (x - coef_eps[i] * eps) / schedule.alphas[i].sqrt()  # mu_theta(x_t, t), eq. 7
        if i > 0:  # z ~ N(0, I) if t > 1, else z = 0
            x = x + sigma2[i].sqrt() * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x


SAMPLERS = {"ancestral": ancestral}
