"""Variance schedules and the closed forms of the forward process.

Indexing. The paper counts diffusion steps t = 1..T. The code stores every per-step tensor with a
0-based index i = t - 1, so ``betas[i]`` is beta_{i+1} and ``alpha_bar[i]`` is alpha_bar_{i+1}; the
network receives the same 0-based index i (as diffusers' schedulers do). Hence ``alpha_bar[0] =
alpha_1 = 1 - beta_1`` and ``alpha_bar[T - 1] = alpha_bar_T``; the data x_0 has no index.
"""

import math

import torch

from ddpm_lightning.errors import ConfigError


def linear_betas(T: int, beta_1: float = 1e-4, beta_T: float = 0.02, rescale: bool = False) -> torch.Tensor:
    """The paper's linear variance schedule beta_1..beta_T (section IV), in float64. ``rescale``: both ends times
    1000 / T, so that any T ends where DDPM's 1,000 steps end (Nichol & Dhariwal 2021's scaled linear schedule)."""
    scale = 1000 / T if rescale else 1.0
    return torch.linspace(beta_1 * scale, beta_T * scale, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(t + 1) / f(t), max_beta) for t in range(T)], dtype=torch.float64)


class Schedule:
    """beta_t and everything derived from it, as float32 tensors on one device.

    Not an ``nn.Module`` on purpose: it is rebuilt from the config, never checkpointed and never
    averaged into the EMA weights.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.T = betas.numel()
        alphas = 1 - betas  # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alphas, 0)  # alpha_bar_t = prod_{s<=t} alpha_s
        one = torch.ones(1, dtype=torch.float64)
        alpha_bar_prev = torch.cat([one, alpha_bar[:-1]])  # alpha_bar_{t-1}, alpha_bar_0 = 1
        self._f64 = dict(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            # beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t  (Ho et al. eq. 7)
            posterior_variance=(1 - alpha_bar_prev) / (1 - alpha_bar) * betas,
            snr=alpha_bar / (1 - alpha_bar),  # SNR_t = alpha_bar_t / (1 - alpha_bar_t)  (Kingma et al. 2021)
        )
        self.to("cpu")

    def to(self, device, dtype: torch.dtype = torch.float32) -> "Schedule":
        for name, value in self._f64.items():
            setattr(self, name, value.to(device=device, dtype=dtype))
        self.device = torch.device(device)
        return self

    @property
    def prior_gap(self) -> float:
        """sqrt(alpha_bar_T): the mean of q(x_T | x_0) per unit of x_0, which N(0, I) assumes is 0."""
        return math.sqrt(self._f64["alpha_bar"][-1].item())

    @property
    def prior_kl(self) -> float:
        """KL(q(x_T | x_0) || N(0, 1)) per dimension for |x_0| = 1: -log(1 - alpha_bar_T) / 2, in nats."""
        return -0.5 * math.log1p(-self._f64["alpha_bar"][-1].item())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (eq. 2-3); t is the 0-based index."""
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss_weights(self, weighting: str, gamma: float = 5.0) -> torch.Tensor:
        """w_t of the noise-prediction loss, per 0-based step: "none" is the paper's w_t = 1 (Algorithm 1);
        "min_snr" is Min-SNR-gamma for eps-prediction, w_t = min(SNR_t, gamma) / SNR_t  (Hang et al. 2023, eq. 10)."""
        if weighting == "none":
            return torch.ones_like(self.snr)
        if weighting == "min_snr":
            return self.snr.clamp(max=gamma) / self.snr
        raise ConfigError(f"recipe.loss_weighting={weighting!r} is unknown; use none or min_snr")

    def timestep_probs(self, density: str, center: float = 0.0, width: float = 1.0) -> torch.Tensor:
        """p(t) of the training's timestep draw, per 0-based step: "uniform" as the paper (Algorithm 1, line 3), or
        "laplace": a Laplace density over log-SNR, p(lambda) = exp(-|lambda - center| / width) / (2 width) (Hang et
        al. 2024), carried to the discrete steps by the log-SNR interval each step covers."""
        if density == "uniform":
            return torch.full_like(self.snr, 1 / self.T)
        lam = self._f64["snr"].log()  # lambda_t = log SNR_t, falling in t
        edges = torch.cat(
            [lam[:1] + (lam[0] - lam[1]) / 2, (lam[1:] + lam[:-1]) / 2, lam[-1:] - (lam[-2] - lam[-1]) / 2]
        )
        cdf = lambda x: torch.where(
            x < center, 0.5 * ((x - center) / width).exp(), 1 - 0.5 * (-(x - center) / width).exp()
        )  # noqa: E731
        p = cdf(edges[:-1]) - cdf(edges[1:])  # the Laplace mass of each step's log-SNR interval
        return (p / p.sum()).to(self.snr)

    def q_step(self, x_prev: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """One step of the forward chain, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps  (eq. 1)."""
        return (1 - self.betas[t]).sqrt() * x_prev + self.betas[t].sqrt() * eps


def build_schedule(kind: str, T: int, beta_1: float = 1e-4, beta_T: float = 0.02, rescale: bool = False) -> Schedule:
    """The schedule named by ``schedule.kind``: ``linear`` as the paper (``rescale``: its betas times 1000 / T), or
    ``cosine`` (the settings are checked where the config is composed, schema.check)."""
    return Schedule(linear_betas(T, beta_1, beta_T, rescale) if kind == "linear" else cosine_betas(T))
