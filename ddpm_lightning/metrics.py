"""How a model is evaluated: generation -> torch-fidelity's FID Inception -> FID, IS, KID (and precision/recall) as
torchmetrics Metrics, with bootstrap intervals and the real-data floor; reference statistics cached on disk.

No Lightning here: ``evaluate`` is the one path that the FID callback and evaluate.py both call. The numbers equal
torch_fidelity.calculate_metrics on the same images (its own functions where they fit, and its resize); the metric
states sync over ranks the torchmetrics way: FID as float64 sums, the rest as gathered feature tensors.
"""

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from ddpm_lightning import files
from ddpm_lightning.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)
FEATURES = ["2048", "logits_unbiased"]  # pool3 features for FID, logits for IS


class Inception(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception-v3, given a state dict that we loaded with weights_only=True.

    torch-fidelity loads weight files itself with weights_only=False; here it is handed an empty dict from a file
    we wrote, and load_state_dict puts in the weights we loaded safely. A state dict without the classifier
    (fc.*) gives FID but no Inception Score: ``is_unavailable`` then says why.
    """

    def __init__(self, state_dict: dict, source: str):
        self.has_classifier = "fc.weight" in state_dict and "fc.bias" in state_dict
        self._state_dict = state_dict
        with tempfile.TemporaryDirectory() as tmp:
            empty = Path(tmp) / "empty.pt"
            torch.save({}, empty)
            super().__init__("inception-v3-compat", FEATURES, feature_extractor_weights_path=str(empty))
        self.to(memory_format=torch.channels_last)  # the same arithmetic, 1.5x faster on the CPU (bench/eval_paths.py)
        self.source = source
        self.is_unavailable = None if self.has_classifier else (
            f"Inception Score unavailable: the detector weights {source} have no classifier layer (fc.*); "
            "FID is computed, IS is not. Use weights with the classifier (torch-fidelity's) for IS")

    def load_state_dict(self, state_dict, strict=True, assign=False):
        given, self._state_dict = self._state_dict, None
        hint = "set metrics.inception_weights=PATH to an FID Inception state dict"
        try:
            missing, unexpected = super().load_state_dict(given, strict=False)
        except RuntimeError as e:  # wrong shapes
            raise ConfigError(f"Inception weights do not fit torch-fidelity's layout ({str(e).splitlines()[-1].strip()[:160]}); {hint}") from None
        missing = [k for k in missing if not (k.startswith("fc.") and not self.has_classifier)]
        if missing or unexpected:
            raise ConfigError(f"Inception weights do not fit torch-fidelity's layout (missing {missing[:3]}, unexpected {unexpected[:3]}); {hint}")
        return missing, unexpected


def random_inception_state(seed: int = 0, classifier: bool = True) -> dict:
    """A randomly initialised FID Inception state dict in torch-fidelity's layout (He-normal convolutions, so that
    features keep their scale): for tests and throughput benchmarks, which must not need the real weights."""
    from unittest import mock

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        arch = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in arch.state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        elif name == "fc.weight":
            value = torch.randn(value.shape, generator=g) * 0.05
        if classifier or not name.startswith("fc."):
            state[name] = value
    return state


def load_inception(weights: str | None) -> Inception:
    """The detector from ``metrics.inception_weights`` (a file in torch-fidelity's layout), or torch-fidelity's
    download when unset. Unavailable weights fail here, with one line naming the setting."""
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False, weights_only=True)
        except Exception as e:
            raise ConfigError(f"the FID Inception weights could not be downloaded ({type(e).__name__}); "
                              "set metrics.inception_weights=PATH to a local copy in torch-fidelity's layout") from None
        return Inception(state, URL_INCEPTION_V3)
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"metrics.inception_weights={weights} does not exist; point it at an FID Inception state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot load metrics.inception_weights={weights} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "it must be a plain state dict") from None
    return Inception(state, str(path))


def detector_id(weights: str | None) -> str:
    """What identifies the detector in the cache key: the weight file's sha256, or torch-fidelity's URL."""
    if weights is None:
        return URL_INCEPTION_V3
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



@torch.no_grad()
def extract(detector: Inception, images: torch.Tensor, batch_size: int = 250, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features (N, 2048) and unbiased logits (N, 1008) of uint8 images, to CPU; with ``progress`` (a
    description) a progress bar with the time left, for long work such as reference statistics."""
    device = next(detector.parameters()).device
    pools, logits = [], []
    with progress_bar(progress, len(images)) as advance:
        for batch in images.split(batch_size):
            pool, logit = detector(batch.to(device))
            pools.append(pool.cpu())
            logits.append(logit.cpu())
            advance(len(batch))
    return torch.cat(pools), torch.cat(logits)


class progress_bar:
    """A rich progress bar with elapsed time and ETA for ``total`` items, or nothing when ``description`` is None."""

    def __init__(self, description: str | None, total: int):
        self.description, self.total, self.bar = description, total, None

    def __enter__(self):
        if self.description is None:
            return lambda n: None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def statistics(pool: torch.Tensor) -> dict:
    """mu and sigma of the pool3 features, as torch-fidelity computes them."""
    return fid_features_to_statistics(pool)


def fid(pool: torch.Tensor, reference: dict) -> float:
    """Frechet distance (paper eq. 11) between the features' Gaussian and the reference statistics."""
    return fid_statistics_to_metric(statistics(pool), reference, verbose=False)["frechet_inception_distance"]


def is_unavailable(detector: Inception, num_images: int, splits: int = 10) -> str | None:
    """Why the Inception Score cannot be given for these images with this detector, or None if it can."""
    if detector.is_unavailable:
        return detector.is_unavailable
    if num_images < splits:
        return f"Inception Score unavailable: {num_images} images are fewer than its {splits} splits; use metrics.num_samples >= {splits}"
    return None


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
    return (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def kid(features: torch.Tensor, reference: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
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
    mu = c @ f / n                                                         # (B, d) resampled means
    tr_s1 = (c @ (f * f).sum(1) - n * (mu * mu).sum(1)) / (n - 1)
    if n <= d:
        f_s2 = f @ s2
        gram = f_s2 @ f.T                                                  # f_i S2 f_j
        u = mu @ f_s2.T                                                    # (B, n): mu_b S2 f_i
        v = (mu @ s2 * mu).sum(1)                                          # mu_b S2 mu_b
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


def kid_of_resamples(features: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The parts of the unbiased MMD^2 against the reference that change with each resample of the features:
    sum over pairs of positions i != j of k(x_i, x_j) / (n (n-1)) - 2 mean_i mean_y k(x_i, y)."""
    n = len(features)
    c = counts.to(features.device, torch.float64)
    pairs = torch.zeros(len(c), dtype=torch.float64, device=features.device)
    to_reference = torch.zeros(n, dtype=torch.float64, device=features.device)
    for lo in range(0, n, chunk):
        k = polynomial_kernel(features[lo : lo + chunk], features).double()
        pairs += ((c[:, lo : lo + chunk] @ k) * c).sum(1) - c[:, lo : lo + chunk] @ k.diagonal(lo)
        to_reference[lo : lo + chunk] = sum(polynomial_kernel(features[lo : lo + chunk], y).double().sum(1) for y in reference.split(chunk))
    return pairs / (n * (n - 1)) - 2 * (c @ to_reference) / (n * len(reference))


def interval(resampled: torch.Tensor, value: float) -> list[float]:
    """The 95% bootstrap interval of ``value``: the 2.5% and 97.5% quantiles of the resampled values, shifted so that
    their median falls on the full-sample value (resampling with replacement repeats images, which raises FID and
    KID by a bias of its own; the interval gives the spread at this N, not the distance to N = infinity)."""
    low, median, high = torch.quantile(resampled.double().cpu(), torch.tensor([0.025, 0.5, 0.975], dtype=torch.float64)).tolist()
    return [value + low - median, value + high - median]


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
        self.reference = {"mu": np.asarray(reference["mu"], dtype=np.float64), "sigma": np.asarray(reference["sigma"], dtype=np.float64)}
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
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)       # the sample covariance, as np.cov
        value = fid_statistics_to_metric({"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()}, self.reference, verbose=False)
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

    def __init__(self, reference_features: torch.Tensor, subsets: int = 100, subset_size: int = 1000, resamples: int = 0, seed: int = 0):
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
        out = prc_features_to_metric(*self.both(), prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
        return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2s=(1e-4, 1e-3, 1e-2, 1e-1), seed: int = 0) -> dict:
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
        opt = torch.optim.LBFGS([weight, bias], max_iter=200, tolerance_grad=1e-9, history_size=20, line_search_fn="strong_wolfe")

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
    return {"mean": mean.float(), "std": std.float(), "weight": weight.float(), "bias": bias.float(), "l2": l2,
            "held_out_acc": held_acc[l2], "train_acc": accuracy(weight, bias, torch.arange(len(z)))}


def probe_classes(probe: dict, pool: torch.Tensor) -> torch.Tensor:
    """The class the probe gives each image's pool3 features."""
    p = {k: v.to(pool.device) for k, v in probe.items() if isinstance(v, torch.Tensor)}
    return (((pool.float() - p["mean"]) / p["std"]) @ p["weight"] + p["bias"]).argmax(1)


def class_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str, cache_dir: str | Path) -> dict:
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
    log.info(f"class probe: held-out accuracy {probe['held_out_acc']:.3f} (L2 {probe['l2']:g}), training accuracy {probe['train_acc']:.3f}")
    files.save_torch(probe, path, "the class probe (cache)")
    return probe


def fraction_and_interval(hits: torch.Tensor, resamples: int, seed: int) -> tuple[float, list[float] | None]:
    """The fraction of 0/1 ``hits`` and its 95% bootstrap interval (None without resamples)."""
    value = hits.double().mean().item()
    if not resamples:
        return value, None
    counts = resample_counts(len(hits), resamples, seed).to(hits.device, torch.float64)
    return value, interval(counts @ hits.double() / len(hits), value)


class ClassAgreement(InImageOrder):
    """How often the linear probe recognises a generated image as the class it was asked for (class_acc), with its
    95% bootstrap interval: the offline measure of class identity, which guidance should raise."""

    def __init__(self, probe: dict, resamples: int = 0, seed: int = 0):
        super().__init__()
        self.probe, self.resamples, self.seed = probe, resamples, seed

    def update(self, pool: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> None:
        self.add((probe_classes(self.probe, pool) == labels.to(pool.device)).float(), index)

    def compute(self) -> dict:
        value, ci = fraction_and_interval(self.in_order(), self.resamples, self.seed)
        return {"class_acc": value} | ({"class_acc_ci95": ci} if ci else {})


@torch.no_grad()
def nearest_training_images(images: torch.Tensor, train_images: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per uint8 image, the l2 pixel distances (pixels in [0, 1]) to its nearest and second-nearest training image,
    (N, 2), and their indices, (N, 2). A training image's distance is the smaller of it and its mirror image
    (training flips them), so a copy of a flipped image is as near as a copy of the image."""
    x = images.flatten(1).float() / 255
    xx = (x * x).sum(1, keepdim=True)
    best_d, best_i = [], []
    for lo in range(0, len(train_images), chunk):
        part = train_images[lo : lo + chunk].to(x.device)
        d2 = []
        for t in (part, part.flip(-1)):
            t = t.flatten(1).float() / 255
            d2.append((xx + (t * t).sum(1)[None] - 2 * x @ t.T).clamp(min=0))
        d, i = torch.minimum(*d2).topk(min(2, len(part)), dim=1, largest=False)
        best_d.append(d)
        best_i.append(i + lo)
    d, i = torch.cat(best_d, 1), torch.cat(best_i, 1)
    d, pick = d.topk(2, dim=1, largest=False)
    return d.sqrt(), i.gather(1, pick)


class Memorization(InImageOrder):
    """The fraction of generated images that copy a training image: d1 / d2 < 1/3, d1 and d2 the l2 pixel distances
    to the nearest and second-nearest training image (Yoon et al. 2023; Gu et al. 2025), with its 95% bootstrap
    interval and the median d1 / d2."""

    threshold = 1 / 3

    def __init__(self, train_images: torch.Tensor, resamples: int = 0, seed: int = 0):
        super().__init__()
        self.train_images, self.resamples, self.seed = train_images, resamples, seed

    def update(self, images: torch.Tensor, index: torch.Tensor) -> None:
        d, _ = nearest_training_images(images, self.train_images)
        self.add(d[:, 0] / d[:, 1].clamp(min=1e-12), index)

    def compute(self) -> dict:
        ratio = self.in_order()
        value, ci = fraction_and_interval((ratio < self.threshold).float(), self.resamples, self.seed)
        return {"memorized": value, "nn_ratio_median": ratio.median().item()} | ({"memorized_ci95": ci} if ci else {})


def settings_of(m) -> dict:
    """What the numbers depend on beyond N and the reference, from the metrics.* settings."""
    return {k: m[k] for k in ("kid_subsets", "kid_subset_size", "bootstrap", "seed", "prc")}


def metric_collection(detector: Inception, reference: dict, num_images: int, settings: dict) -> MetricCollection:
    """FID, KID, IS (when the detector and N allow), precision/recall (``settings['prc']``), class agreement (when the
    reference has a class probe) and memorization (when it has the training images) on the detector's device.
    ``settings``: kid_subsets, kid_subset_size, bootstrap (resamples; 0: no intervals), seed, prc."""
    b, seed = settings["bootstrap"], settings["seed"]
    metrics = {"fid": FID(reference, b, seed),
               "kid": KID(reference["features"], settings["kid_subsets"], settings["kid_subset_size"], b, seed)}
    if not is_unavailable(detector, num_images):
        metrics["is"] = InceptionScore()
    if settings["prc"]:
        metrics["prc"] = PrecisionRecall(reference["features"])
    if reference.get("probe") is not None:
        metrics["class_acc"] = ClassAgreement(reference["probe"], b, seed)
    if reference.get("train_images") is not None:
        metrics["memorized"] = Memorization(reference["train_images"], b, seed)
    device = next(detector.parameters()).device
    return MetricCollection(metrics, compute_groups=False).to("cpu" if device.type == "mps" else device)  # mps has no float64


def scores_of(collection: MetricCollection, detector: Inception, num_images: int) -> dict:
    """The collection's numbers as one flat dict (is_mean/is_std None, with is_unavailable saying why, when IS is not given)."""
    return {"is_mean": None, "is_std": None, **collection.compute(), "is_unavailable": is_unavailable(detector, num_images)}


def loggable(scores: dict) -> dict:
    """The numbers of a scores dict by log name: intervals [low, high] as <name>_low and <name>_high; no None or text."""
    out = {}
    for name, value in scores.items():
        if isinstance(value, list):
            out[f"{name}_low"], out[f"{name}_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def reference_statistics(detector: Inception, images: torch.Tensor, key: dict, cache_dir: str | Path,
                         batch_size: int = 250) -> dict:
    """FID statistics of real images and their pool3 features (for KID and precision/recall), cached under a hash of
    ``key`` (classes, split, number of images, detector) plus the images' own digest, so a later run or evaluation
    loads them instead of recomputing; computing them shows a progress bar with the time left."""
    key = {**key, "num_images": len(images), "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest()}
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid_stats_{name}.pt"
    cached = files.load_or_none(path, lambda p: cached_statistics(torch.load(p, map_location="cpu", weights_only=True)), "the reference-statistics cache")
    if cached is not None:
        return {**cached, "name": name}
    log.info(f"computing reference Inception statistics of {len(images)} images ({key['classes']}, {key['split']}) -> {path}")
    features = extract(detector, images, batch_size, progress=f"reference statistics, {len(images)} real images")[0]
    stats = statistics(features)
    files.save_torch({"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"]), "features": features,
                      "key": json.dumps(key)}, path, "the reference statistics (cache)")
    return {**stats, "features": features, "name": name}


def cached_statistics(cached: dict) -> dict:
    """The statistics of a cache file, checked: the mean, covariance and features of the right shapes, all finite."""
    mu, sigma, features = cached["mu"], cached["sigma"], cached["features"]
    d = mu.shape[0]
    if sigma.shape != (d, d) or features.ndim != 2 or features.shape[1] != d or not all(bool(torch.isfinite(x).all()) for x in (mu, sigma, features)):
        raise ValueError(f"shapes {tuple(mu.shape)}, {tuple(sigma.shape)}, {tuple(features.shape)} or values are not those of FID statistics")
    return {"mu": mu.numpy(), "sigma": sigma.numpy(), "features": features}


def detector_and_reference(weights: str | None, classes: list[str], images: torch.Tensor, split: str, limit: int | None,
                           cache_dir: str | Path, batch_size: int, device, labels: torch.Tensor | None = None,
                           train_images: torch.Tensor | None = None) -> tuple[Inception, dict]:
    """What every evaluation needs, checked before any work: the detector (on ``device``) and the reference statistics
    of the first ``limit`` (or all) real images of the subset's ``split``, from the cache when it has them; with the
    images' ``labels`` and more than one class, the class probe on their features (cached with them); with
    ``train_images`` (what the model trained on), what memorization is measured against."""
    detector = load_inception(weights).to(device)
    images = images[:limit] if limit else images
    key = dict(classes=list(classes), split=split, detector=detector_id(weights))
    reference = reference_statistics(detector, images, key, cache_dir, batch_size)
    if labels is not None and len(classes) > 1:
        labels = labels[:limit] if limit else labels
        reference["probe"] = class_probe(reference["features"], labels, len(classes), reference["name"], cache_dir)
    if train_images is not None:
        reference["train_images"] = train_images
        reference["train_images_sha1"] = hashlib.sha1(train_images.numpy().tobytes()).hexdigest()
    return detector, reference


def score_real(detector: Inception, reference: dict, images: torch.Tensor, settings: dict, batch_size: int,
               progress: str | None = None, labels: torch.Tensor | None = None) -> dict:
    """The metrics of real images (with their ``labels`` for the class agreement) against the reference, through the
    same collection as generated ones."""
    if labels is None:
        reference = {**reference, "probe": None}
    collection = metric_collection(detector, reference, len(images), settings)
    device = next(detector.parameters()).device
    with progress_bar(progress, len(images)) as advance:
        for lo in range(0, len(images), batch_size):
            batch = images[lo : lo + batch_size].to(device)
            pool, logits = detector(batch)
            collection.update(pool=pool, logits=logits, index=torch.arange(lo, lo + len(pool), device=device), images=batch,
                              labels=None if labels is None else labels[lo : lo + batch_size].to(device))
            advance(len(pool))
    return scores_of(collection, detector, len(images))


@torch.no_grad()
def floor(detector: Inception, reference: dict, test_images: torch.Tensor, num_samples: int, settings: dict, cache_dir: str | Path,
          batch_size: int, test_labels: torch.Tensor | None = None) -> dict:
    """What a perfect model scores at this N: the metrics of the first N real held-out (test) images of the subset
    against the same reference (the class agreement with their ``test_labels``; memorization against the same training
    images), cached per (reference, probe, training images, test images, N, detector, settings). With fewer test
    images than N it says so and uses them all."""
    if len(test_images) < num_samples:
        log.warning(f"the floor: the test split has {len(test_images)} images of the subset, fewer than metrics.num_samples="
                    f"{num_samples}; the floor is computed at N={len(test_images)} and is higher than at N={num_samples}")
    images = test_images[:num_samples]
    labels = None if test_labels is None or reference.get("probe") is None else test_labels[:num_samples]
    key = {"reference": reference["name"], "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest(),
           "settings": settings_of(settings), "probe": None if labels is None else reference["probe"]["labels_sha1"],
           "train_images": reference.get("train_images_sha1")}
    path = Path(cache_dir) / f"floor_{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    wanted = {"fid", "kid_mean", "num_samples"} | ({"class_acc"} if labels is not None else set()) | ({"memorized"} if key["train_images"] else set())
    cached = files.load_or_none(path, lambda p: dict(json.loads(p.read_text())["scores"]), "the real-data floor cache")
    if cached is not None and wanted <= set(cached):
        return cached
    log.info(f"computing the real-data floor: {len(images)} real test images against the reference -> {path}")
    scores = {**score_real(detector, reference, images, settings, batch_size, progress=f"real-data floor, {len(images)} test images",
                           labels=labels), "num_samples": len(images)}
    files.write_json(path, {"key": key, "scores": scores}, "the real-data floor (cache)")
    return scores


def even_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels drawn evenly over the subset: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def evaluate(module, detector: Inception, reference: dict, num_samples: int, w: float | None, settings: dict, batch_size: int,
             sampler: dict | None = None, progress=None) -> tuple[dict, torch.Tensor]:
    """The one evaluation path: ``num_samples`` images from the module (evenly drawn classes, guidance weight w,
    the given or the module's sampler), their Inception features, and the metric collection's numbers; also the
    first 64 images (a preview). Split over the ranks of torch.distributed when it is running.

    The images come in chunks of ``batch_size``; chunk k is generated with its own seed (settings['seed'], k), so a
    chunk's images do not depend on which rank makes it; rank r makes chunks r, r + world, ..., and the metric
    states sync over ranks, so every rank gets the numbers one process would. When the module's sampling is stopped
    (a preemption signal), every rank raises Interrupted at the same point, before the metrics sync."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(detector.parameters()).device
    labels = even_labels(num_samples, len(module.hparams.class_names)).to(module.device) if module.hparams.conditional else None
    collection = metric_collection(detector, reference if labels is not None else {**reference, "probe": None}, num_samples, settings)
    chunks = math.ceil(num_samples / batch_size)
    preview, stopped = [], False
    for done, k in enumerate(range(rank, chunks, world), 1):
        start, size = k * batch_size, min(batch_size, num_samples - k * batch_size)
        g = torch.Generator(module.device).manual_seed(settings["seed"] * 1_000_003 + k)
        y = None if labels is None else labels[start : start + size]
        try:
            images = module.sample(n=size, labels=y, w=w, sampler=sampler, generator=g, batch_size=size)
        except Interrupted:
            stopped = True
            break
        pool, logits = detector(images.to(device))
        collection.update(pool=pool, logits=logits, index=torch.arange(start, start + size, device=device), images=images.to(device),
                          labels=None if y is None else y.to(device))
        if start < 64:
            preview.append((torch.arange(start, start + size, device=images.device)[: 64 - start], images[: 64 - start]))
        if progress:
            progress(min(done * world, chunks), chunks)
    if world > 1:  # every rank takes part in this before the metrics sync, so a rank that stopped early meets the others here
        flag = torch.tensor([float(stopped)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopped = bool(flag.item())
    if stopped:
        raise Interrupted("a preemption signal arrived during the evaluation")
    if rank >= chunks:  # more ranks than chunks: this one made none, and adds empty states of the right shapes to the sync
        side = module.hparams.image_size
        collection.update(pool=torch.zeros(0, 2048, device=device), logits=torch.zeros(0, 1008, device=device),
                          index=torch.zeros(0, dtype=torch.long, device=device), labels=torch.zeros(0, dtype=torch.long, device=device),
                          images=torch.zeros(0, 3, side, side, dtype=torch.uint8, device=device))
    index = torch.cat([i for i, _ in preview]) if preview else torch.zeros(0, dtype=torch.long, device=module.device)
    images = torch.cat([x for _, x in preview]) if preview else torch.zeros(0, 3, *[module.hparams.image_size] * 2, dtype=torch.uint8, device=module.device)
    if world > 1:  # the first 64 images may come from several ranks
        index, images = torch.cat(gather_all_tensors(index)), torch.cat(gather_all_tensors(images))
    return scores_of(collection, detector, num_samples), images[index.argsort()]
