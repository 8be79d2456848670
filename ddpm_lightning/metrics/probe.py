"""Class agreement: a linear probe on the reference's pool3 features, cached with them, and its metric."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ddpm_lightning import files
from ddpm_lightning.metrics.states import InImageOrder
from ddpm_lightning.metrics.stats import fraction_and_interval

log = logging.getLogger(__name__)


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2s=(1e-4, 1e-3, 1e-2, 1e-1), seed: int = 0
) -> dict:
    """A linear probe: multinomial logistic regression on standardised pool3 features (full-batch L-BFGS), its L2
    strength chosen by the accuracy on a held-out fifth, then refitted on all the images. Deterministic."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z, y = (x - mean) / std, labels.long()
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    held, kept = order[: len(z) // 5], order[len(z) // 5 :]

    def fit(rows: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [weight, bias], max_iter=200, tolerance_grad=1e-9, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z[rows] @ weight + bias, y[rows]) + l2 * (weight * weight).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return weight.detach(), bias.detach()

    def accuracy(weight, bias, rows) -> float:
        return ((z[rows] @ weight + bias).argmax(1) == y[rows]).double().mean().item()

    held_acc = {l2: accuracy(*fit(kept, l2), held) for l2 in l2s}
    l2 = max(l2s, key=lambda k: (held_acc[k], k))  # the strongest regularisation among the best
    weight, bias = fit(torch.arange(len(z)), l2)
    return {
        "mean": mean.float(),
        "std": std.float(),
        "weight": weight.float(),
        "bias": bias.float(),
        "l2": l2,
        "held_out_acc": held_acc[l2],
        "train_acc": accuracy(weight, bias, torch.arange(len(z))),
    }


def probe_classes(probe: dict, pool: torch.Tensor) -> torch.Tensor:
    """The class the probe gives each image's pool3 features."""
    p = {k: v.to(pool.device) for k, v in probe.items() if isinstance(v, torch.Tensor)}
    return (((pool.float() - p["mean"]) / p["std"]) @ p["weight"] + p["bias"]).argmax(1)


def class_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str, cache_dir: str | Path
) -> dict:
    """The linear probe of a reference's features, cached beside its statistics under the same key (``name``)."""
    path = Path(cache_dir) / f"probe_{name}.pt"
    digest = hashlib.sha1(labels.numpy().astype(np.int64).tobytes()).hexdigest()

    def read(p):
        cached = torch.load(p, map_location="cpu", weights_only=True)
        if cached["labels_sha1"] != digest or cached["weight"].shape != (features.shape[1], num_classes):
            raise ValueError("a probe of other labels or classes")
        return cached

    cached = files.load_or_none(path, read, "the class-probe cache")
    if cached is not None:
        return cached
    log.info(f"fitting the class probe (logistic regression) on {len(features)} reference features -> {path}")
    probe = {**fit_probe(features, labels, num_classes), "labels_sha1": digest}
    log.info(
        f"class probe: held-out accuracy {probe['held_out_acc']:.3f} (L2 {probe['l2']:g}), training accuracy {probe['train_acc']:.3f}"
    )
    files.save_torch(probe, path, "the class probe (cache)")
    return probe


class ClassAgreement(InImageOrder):
    """How often the linear probe recognises a generated image as the class it was asked for (class_acc), with its
    exact 95% interval (metrics.bootstrap > 0): the offline measure of class identity, which guidance should raise."""

    def __init__(self, probe: dict, resamples: int = 0, seed: int = 0):
        super().__init__()
        self.probe, self.resamples, self.seed = probe, resamples, seed

    def update(self, pool: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        self.add((probe_classes(self.probe, pool) == labels.to(pool.device)).float(), index)

    def compute(self) -> dict:
        value, ci = fraction_and_interval(self.in_order(), bool(self.resamples))
        return {"class_acc": value} | ({"class_acc_ci95": ci} if ci else {})
