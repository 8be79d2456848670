"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3 and
appendix C): training keeps power-function EMAs of the weights at a few lengths and saves them now and then; after
training, the EMA of any other length is a least-squares combination of those snapshots. Lengths are sigma_rel, the
standard deviation of the averaging profile over the time it averages (EDM2's 0.05 and 0.10). Time t counts
optimizer updates from 1."""

import numpy as np
import torch


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile p(tau) ~ tau^gamma with that relative std: the largest real
    root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2 = 0 (eq. 126)."""
    s = sigma_rel**-2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))  (eq. 123)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(gamma: float, t: int) -> float:
    """The decay of update t (1, 2, ...): theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with
    beta_t = (1 - 1/t)^(gamma + 1)  (eq. 127): the first update copies the weights."""
    return (1 - 1 / t) ** (gamma + 1)


def profile_dot(t_a, gamma_a, t_b, gamma_b):
    """The inner product of two power-function profiles, one ending at time t_a with exponent gamma_a, the other at
    t_b with gamma_b, p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]  (eq. 151, Algorithm 3); arrays
    broadcast."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(steps, sigma_rels, step: int, sigma_rel: float) -> np.ndarray:
    """x minimising || sum_i x_i p_i - p_target ||^2 over the snapshots' profiles p_i (``steps[i]``,
    ``sigma_rels[i]``), for the profile of length ``sigma_rel`` ending at ``step``: the normal equations A x = b
    (Algorithm 3), normalised to sum to 1 as EDM2 does."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.array([sigma_rel_to_gamma(s) for s in sigma_rels])
    A = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, np.float64(step), sigma_rel_to_gamma(sigma_rel))
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()


class PowerEMA:
    """Power-function EMAs of a list of tensors at the lengths ``sigma_rels``, updated on their device (a Python
    scalar per update: no host read)."""

    def __init__(self, params: list[torch.Tensor], sigma_rels: list[float]):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        self.averages = [[p.detach().clone() for p in params] for _ in sigma_rels]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], t: int) -> None:
        current = [p.detach() for p in params]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, current, 1 - power_beta(gamma, t))  # eq. 127


def reconstruct(snapshots: list[dict], step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    """The weights of the EMA of length ``sigma_rel`` at ``step``, from snapshots {"step", "sigma_rels", "weights": one
    state dict per length} taken at or before it (Algorithm 3)."""
    steps, lengths, states = [], [], []
    for snap in snapshots:
        for s, state in zip(snap["sigma_rels"], snap["weights"], strict=True):
            steps.append(snap["step"]), lengths.append(s), states.append(state)
    x = posthoc_coefficients(steps, lengths, step, sigma_rel)
    return {
        k: sum(float(c) * s[k].double() for c, s in zip(x, states, strict=True)).to(states[0][k].dtype)
        for k in states[0]
    }
