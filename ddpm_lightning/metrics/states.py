"""The metrics as torchmetrics states, kept in image order so that any split over ranks gives one process's numbers."""

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ddpm_lightning.metrics.stats import (
    fid_of_resamples,
    inception_score,
    interval,
    kid,
    kid_of_resamples,
    resample_counts,
)


class InImageOrder(Metric):
    """Per-image values gathered over ranks (a cat state) with each image's index, to be put back in image order."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("values", [], dist_reduce_fx="cat")
        self.add_state("index", [], dist_reduce_fx="cat")

    def add(self, values: torch.Tensor, index: torch.Tensor) -> None:
        self.values.append(values)
        self.index.append(index)

    def in_order(self) -> torch.Tensor:
        return dim_zero_cat(self.values)[dim_zero_cat(self.index).argsort()]


class FID(InImageOrder):
    """FID (paper eq. 11) against the reference statistics, from float64 sums of the pool3 features and of their outer
    products, all-reduced over ranks; with ``resamples`` > 0 also the features in image order, for the 95% interval."""

    def __init__(self, reference: dict, resamples: int = 0, seed: int = 0, dim: int = 2048):
        super().__init__()
        self.reference = {
            "mu": np.asarray(reference["mu"], dtype=np.float64),
            "sigma": np.asarray(reference["sigma"], dtype=np.float64),
        }
        self.resamples, self.seed = resamples, seed
        self.add_state("feature_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pool: torch.Tensor, index: torch.Tensor) -> None:
        x = pool.double()
        self.feature_sum += x.sum(0)
        self.outer_sum += x.T @ x
        self.count += len(x)
        if self.resamples:
            self.add(pool, index)

    def compute(self) -> dict:
        n = self.count
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)  # the sample covariance, as np.cov
        value = fid_statistics_to_metric(
            {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()}, self.reference, verbose=False
        )
        out = {"fid": value["frechet_inception_distance"]}
        if self.resamples:
            features = self.in_order()
            counts = resample_counts(len(features), self.resamples, self.seed)
            out["fid_ci95"] = interval(fid_of_resamples(features, counts, self.reference), out["fid"])
        return out


class InceptionScore(InImageOrder):
    """IS (paper eq. 12) of the gathered logits, in image order, with torch-fidelity's splits and shuffle."""

    def __init__(self, splits: int = 10):
        super().__init__()
        self.splits = splits

    def update(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        self.add(logits, index)

    def compute(self) -> dict:
        mean, std = inception_score(self.in_order(), self.splits)
        return {"is_mean": mean, "is_std": std}


class PoolFeatures(InImageOrder):
    """The pool3 features of the images in image order, against the reference features."""

    def __init__(self, reference_features: torch.Tensor):
        super().__init__()
        self.reference_features = reference_features

    def update(self, pool: torch.Tensor, index: torch.Tensor) -> None:
        self.add(pool, index)

    def both(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The features in image order and the reference features, on the same device."""
        features = self.in_order()
        return features, self.reference_features.to(features.device)


class KID(PoolFeatures):
    """KID (Binkowski et al. 2018) against the reference features: unbiased at any N; the subset size is at most N.
    With ``resamples`` > 0 also its 95% bootstrap interval."""

    def __init__(
        self,
        reference_features: torch.Tensor,
        subsets: int = 100,
        subset_size: int = 1000,
        resamples: int = 0,
        seed: int = 0,
    ):
        super().__init__(reference_features)
        self.subsets, self.subset_size, self.resamples, self.seed = subsets, subset_size, resamples, seed

    def compute(self) -> dict:
        features, reference = self.both()
        mean, std = kid(features, reference, self.subsets, min(self.subset_size, len(features), len(reference)))
        out = {"kid_mean": mean, "kid_std": std}
        if self.resamples:
            counts = resample_counts(len(features), self.resamples, self.seed)
            out["kid_ci95"] = interval(kid_of_resamples(features, counts, reference), mean)
        return out


class PrecisionRecall(PoolFeatures):
    """Improved precision and recall (Kynkaanniemi et al. 2019) against the reference features, torch-fidelity's prc
    (3rd-nearest-neighbour balls): the fidelity/diversity split that guidance trades."""

    def compute(self) -> dict:
        out = prc_features_to_metric(
            *self.both(), prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False
        )
        return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}
