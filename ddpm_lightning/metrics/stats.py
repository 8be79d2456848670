"""FID, KID and IS arithmetic (torch-fidelity's functions where they fit) and their intervals: the bootstrap for
FID and KID, and the fraction of hits with its interval."""

import numpy as np
import torch
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_features_to_metric


def statistics(pool: torch.Tensor) -> dict:
    """mu and sigma of the pool3 features, as torch-fidelity computes them."""
    return fid_features_to_statistics(pool)


def fid(pool: torch.Tensor, reference: dict) -> float:
    """Frechet distance (paper eq. 11) between the features' Gaussian and the reference statistics."""
    return fid_statistics_to_metric(statistics(pool), reference, verbose=False)["frechet_inception_distance"]


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (paper eq. 12) over ``splits`` splits: mean and standard deviation."""
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, KID's kernel (Binkowski et al. 2018, torch-fidelity's defaults)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased MMD^2 estimate between two equal-sized sets of features (torch-fidelity's mmd2, "unbiased")."""
    m = len(x)
    k_xx, k_yy, k_xy = (polynomial_kernel(a, b).double() for a, b in ((x, x), (y, y), (x, y)))
    return (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (
        m * (m - 1)
    ) - 2 * k_xy.sum() / m**2


def kid(
    features: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """Kernel Inception Distance: the mean and standard deviation of the unbiased MMD^2 over ``subsets`` random
    subsets of ``subset_size`` from each set, drawn as torch-fidelity draws them (kid_features_to_metric)."""
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = features[torch.from_numpy(rng.choice(len(features), subset_size, replace=False))]
        y = reference[torch.from_numpy(rng.choice(len(reference), subset_size, replace=False))]
        mmds.append(mmd2_unbiased(x, y))
    mmds = torch.stack(mmds)
    return mmds.mean().item(), mmds.std(correction=0).item()


def resample_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """How often each of n items is drawn in each of ``resamples`` bootstrap resamples of size n: (resamples, n)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (resamples, n), generator=g)
    return torch.zeros(resamples, n).scatter_add_(1, draws, torch.ones(resamples, n))


def fid_of_resamples(features: torch.Tensor, counts: torch.Tensor, reference: dict) -> torch.Tensor:
    """FID (eq. 11) of each resample (a row of ``counts``) of the features, without a matrix square root per resample:
    tr sqrt(S1 S2) is the sum of sqrt of the eigenvalues of a symmetric matrix with the same nonzero spectrum, n x n
    (D^1/2 Xc S2 Xc^T D^1/2 / (n-1), centred features Xc, D = counts) when n <= d, else d x d (S2^1/2 S1 S2^1/2).
    Float64 for n <= d; float32 for n > d, where each resample is a d x d problem (the spread is what is wanted)."""
    n, d = features.shape
    dtype = torch.float64 if n <= d else torch.float32
    f, c = features.to(dtype), counts.to(features.device, dtype)
    mu2 = torch.as_tensor(reference["mu"], device=f.device, dtype=dtype)
    s2 = torch.as_tensor(reference["sigma"], device=f.device, dtype=dtype)
    mu = c @ f / n  # (B, d) resampled means
    tr_s1 = (c @ (f * f).sum(1) - n * (mu * mu).sum(1)) / (n - 1)
    if n <= d:
        f_s2 = f @ s2
        gram = f_s2 @ f.T  # f_i S2 f_j
        u = mu @ f_s2.T  # (B, n): mu_b S2 f_i
        v = (mu @ s2 * mu).sum(1)  # mu_b S2 mu_b
    else:
        evals, evecs = torch.linalg.eigh(s2)
        s2_half = evecs @ evals.clamp(min=0).sqrt().diag() @ evecs.T
    traces = []
    chunk = max(1, 2**26 // n**2) if n <= d else 1
    for lo in range(0, len(c), chunk):
        cb, mb = c[lo : lo + chunk], mu[lo : lo + chunk]
        if n <= d:
            ub, vb = u[lo : lo + chunk], v[lo : lo + chunk]
            centred = gram - ub[:, :, None] - ub[:, None, :] + vb[:, None, None]  # (f_i - mu_b) S2 (f_j - mu_b)
            root = cb.sqrt()
            matrix = root[:, :, None] * centred * root[:, None, :] / (n - 1)
        else:
            s1 = ((f.T * cb[0]) @ f - n * torch.outer(mb[0], mb[0]))[None] / (n - 1)
            matrix = s2_half @ s1 @ s2_half
        traces.append(torch.linalg.eigvalsh(matrix).clamp(min=0).sqrt().sum(1))
    return ((mu - mu2) ** 2).sum(1) + tr_s1 + s2.trace() - 2 * torch.cat(traces)


def kid_of_resamples(
    features: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """The parts of the unbiased MMD^2 against the reference that change with each resample of the features:
    sum over pairs of positions i != j of k(x_i, x_j) / (n (n-1)) - 2 mean_i mean_y k(x_i, y)."""
    n = len(features)
    c = counts.to(features.device, torch.float64)
    pairs = torch.zeros(len(c), dtype=torch.float64, device=features.device)
    to_reference = torch.zeros(n, dtype=torch.float64, device=features.device)
    for lo in range(0, n, chunk):
        k = polynomial_kernel(features[lo : lo + chunk], features).double()
        pairs += ((c[:, lo : lo + chunk] @ k) * c).sum(1) - c[:, lo : lo + chunk] @ k.diagonal(lo)
        to_reference[lo : lo + chunk] = sum(
            polynomial_kernel(features[lo : lo + chunk], y).double().sum(1) for y in reference.split(chunk)
        )
    return pairs / (n * (n - 1)) - 2 * (c @ to_reference) / (n * len(reference))


def interval(resampled: torch.Tensor, value: float) -> list[float]:
    """The 95% bootstrap interval of ``value``: the 2.5% and 97.5% quantiles of the resampled values, shifted so that
    their median falls on the full-sample value (resampling with replacement repeats images, which raises FID and
    KID by a bias of its own; the interval gives the spread at this N, not the distance to N = infinity)."""
    low, median, high = torch.quantile(
        resampled.double().cpu(), torch.tensor([0.025, 0.5, 0.975], dtype=torch.float64)
    ).tolist()
    return [value + low - median, value + high - median]


def proportion_interval(hits: int, n: int, confidence: float = 0.95) -> list[float]:
    """The exact (Clopper-Pearson) interval of a proportion of ``hits`` in ``n``: at least ``confidence`` coverage for
    every true proportion, 0 and 1 included (0 hits in 200 give [0, 0.018], not the bootstrap's [0, 0])."""
    from scipy.stats import binomtest

    ci = binomtest(int(hits), int(n)).proportion_ci(confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def fraction_and_interval(hits: torch.Tensor, with_interval: bool) -> tuple[float, list[float] | None]:
    """The fraction of 0/1 ``hits`` and, when asked, its exact 95% interval."""
    k, n = int(hits.sum().item()), len(hits)
    return k / n, proportion_interval(k, n) if with_interval else None
