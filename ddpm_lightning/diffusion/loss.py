"""Algorithm 1 as a small callable: timestep draw, noise, q_sample, the (weighted) noise-prediction MSE."""

from typing import Callable

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ddpm_lightning.diffusion.guidance import drop_labels
from ddpm_lightning.diffusion.schedule import Schedule

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class DiffusionLoss:
    """E_{t, x_0, eps} w_t ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, c)||^2.

    ``weighting``: "none" is the paper's w_t = 1 (eq. 14); "min_snr" is Min-SNR-gamma (schedule.loss_weights).
    ``timesteps``: the draw of t, "uniform" (Algorithm 1) or "laplace" over log-SNR around ``timestep_center`` with
    scale ``timestep_width`` (schedule.timestep_probs). ``immiscible``: each image gets the batch's noise that a linear
    assignment gives it (Li et al. 2024). ``p_uncond``: the probability of replacing a label by ``null_class``
    (classifier-free guidance's training); labels are None for the unconditional model. ``memory_format`` lays out
    x_t for the net (channels_last on a GPU).
    """

    def __init__(
        self,
        schedule: Schedule,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        p_uncond: float = 0.0,
        null_class: int | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        timesteps: str = "uniform",
        timestep_center: float = 0.0,
        timestep_width: float = 2.0,
        immiscible: bool = False,
    ):
        self.schedule, self.weighting, self.snr_gamma = schedule, weighting, snr_gamma
        self.p_uncond, self.null_class, self.memory_format = p_uncond, null_class, memory_format
        schedule.loss_weights(weighting, snr_gamma)  # an unknown weighting fails here, before training
        self.immiscible = immiscible
        self.p_t = (
            None if timesteps == "uniform" else schedule.timestep_probs(timesteps, timestep_center, timestep_width)
        )

    def draw_t(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """t ~ Uniform({1..T}) (Algorithm 1, line 3), or t ~ p(t) of the log-SNR density, as the 0-based index."""
        if self.p_t is None:
            return torch.randint(0, self.schedule.T, (n,), device=device, generator=generator)
        if self.p_t.device != device:
            self.p_t = self.p_t.to(device)
        return torch.multinomial(self.p_t, n, replacement=True, generator=generator)

    def __call__(
        self, net: Net, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sched = self.schedule
        t = self.draw_t(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)  # Algorithm 1, line 4
        if self.immiscible:
            eps = eps[assign_noise(x0, eps)]
        x_t = sched.q_sample(x0, t, eps).contiguous(memory_format=self.memory_format)  # eq. 4
        if y is not None and self.null_class is not None:
            y = drop_labels(y, self.p_uncond, self.null_class, generator)
        eps_theta = net(x_t, t, y).float()
        if self.weighting == "none":
            return F.mse_loss(eps_theta, eps)  # eq. 14
        w_t = sched.loss_weights(self.weighting, self.snr_gamma)[t]  # on the schedule's device: no host data
        return (w_t * (eps_theta - eps).square().flatten(1).mean(1)).mean()


def assign_noise(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Immiscible diffusion (Li et al. 2024): the permutation of the noise that minimises sum_i ||x0_i - eps_pi(i)||
    over the batch, by a linear assignment on the host (the one host read of such a step). The noise stays N(0, I)
    per image; only which image gets which draw changes."""
    cost = torch.cdist(x0.flatten(1).float(), eps.flatten(1).float())
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.from_numpy(cols).to(x0.device)
