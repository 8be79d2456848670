"""Algorithm 1 as a small callable: timestep draw, noise, q_sample, the (weighted) noise-prediction MSE."""

from typing import Callable

import torch
import torch.nn.functional as F

from ddpm_lightning.diffusion.guidance import drop_labels
from ddpm_lightning.diffusion.schedule import Schedule

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class DiffusionLoss:
    """E_{t, x_0, eps} w_t ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, c)||^2.

    ``weighting``: "none" is the paper's w_t = 1 (eq. 14); "min_snr" is Min-SNR-gamma (schedule.loss_weights).
    ``p_uncond``: the probability of replacing a label by ``null_class`` (classifier-free guidance's training); labels
    are None for the unconditional model. ``memory_format`` lays out x_t for the net (channels_last on a GPU).
    """

    def __init__(
        self,
        schedule: Schedule,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        p_uncond: float = 0.0,
        null_class: int | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.schedule, self.weighting, self.snr_gamma = schedule, weighting, snr_gamma
        self.p_uncond, self.null_class, self.memory_format = p_uncond, null_class, memory_format
        schedule.loss_weights(weighting, snr_gamma)  # an unknown weighting fails here, before training

    def draw_t(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """t ~ Uniform({1..T}) (Algorithm 1, line 3), as the 0-based index."""
        return torch.randint(0, self.schedule.T, (n,), device=device, generator=generator)

    def __call__(
        self, net: Net, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        sched = self.schedule
        t = self.draw_t(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)  # Algorithm 1, line 4
        x_t = sched.q_sample(x0, t, eps).contiguous(memory_format=self.memory_format)  # eq. 4
        if y is not None and self.null_class is not None:
            y = drop_labels(y, self.p_uncond, self.null_class, generator)
        eps_theta = net(x_t, t, y).float()
        if self.weighting == "none":
            return F.mse_loss(eps_theta, eps)  # eq. 14
        w_t = sched.loss_weights(self.weighting, self.snr_gamma)[t]  # on the schedule's device: no host data
        return (w_t * (eps_theta - eps).square().flatten(1).mean(1)).mean()
