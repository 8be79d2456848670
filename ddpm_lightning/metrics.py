"""FID and Inception Score with torch-fidelity's FID Inception network; reference statistics cached on disk.

No Lightning here. The numbers come from torch-fidelity's own functions (fid_features_to_statistics,
fid_statistics_to_metric, isc_features_to_metric), so they equal torch_fidelity.calculate_metrics on the same
images; what this module adds is safe weight loading, batching on any device, a cache and the split over ranks.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from ddpm_lightning.errors import ConfigError

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
def extract(detector: Inception, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool3 features (N, 2048) and unbiased logits (N, 1008) of uint8 images, on the detector's device, to CPU."""
    device = next(detector.parameters()).device
    pools, logits = [], []
    for batch in images.split(batch_size):
        pool, logit = detector(batch.to(device))
        pools.append(pool.cpu())
        logits.append(logit.cpu())
    return torch.cat(pools), torch.cat(logits)


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
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def reference_statistics(detector: Inception, images: torch.Tensor, key: dict, cache_dir: str | Path,
                         batch_size: int = 250) -> dict:
    """FID statistics of real images (and their pool3 features, for metrics that need them), cached under a hash of
    ``key`` (classes, split, number of images, detector) plus the images' own digest, so a later run or evaluation
    loads them instead of recomputing."""
    key = {**key, "num_images": len(images), "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest()}
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid_stats_{name}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return {"mu": cached["mu"].numpy(), "sigma": cached["sigma"].numpy(), "features": cached.get("features")}
    log.info(f"computing reference Inception statistics of {len(images)} images ({key['classes']}, {key['split']}) -> {path}")
    features = extract(detector, images, batch_size)[0]
    stats = statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"]), "features": features,
                "key": json.dumps(key)}, tmp)
    os.replace(tmp, path)
    return {**stats, "features": features}


def detector_and_reference(num_samples: int, weights: str | None, classes: list[str], images: torch.Tensor, split: str,
                           limit: int | None, cache_dir: str | Path, batch_size: int, device) -> tuple[Inception, dict]:
    """What every FID needs, checked before any work: the detector (on ``device``) and the reference statistics of
    the first ``limit`` (or all) real images of the subset's ``split``, from the cache when it has them."""
    if num_samples < 2:
        raise ConfigError(f"metrics.num_samples={num_samples} must be at least 2 (FID needs a covariance)")
    detector = load_inception(weights).to(device)
    images = images[:limit] if limit else images
    key = dict(classes=list(classes), split=split, detector=detector_id(weights))
    return detector, reference_statistics(detector, images, key, cache_dir, batch_size)


def even_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels drawn evenly over the subset: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def generated_features(generate, detector: Inception, n: int, seed: int, batch_size: int, progress=None):
    """Features of n generated images, split over the ranks of torch.distributed when it is running.

    The images come in chunks of ``batch_size``; chunk k is generated by ``generate(start, size, generator)`` with
    its own seed (seed, k), so a chunk's images do not depend on which rank makes it, and every rank ends with the
    same features as one process would. Rank r makes chunks r, r + world, ...; the features are gathered to all.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(detector.parameters()).device
    chunks = math.ceil(n / batch_size)
    mine = {}
    for k in range(rank, chunks, world):
        start, size = k * batch_size, min(batch_size, n - k * batch_size)
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + k)
        images = generate(start, size, g)
        mine[k] = (*extract(detector, images, batch_size), images[: 64 - start].cpu() if start < 64 else None)
        if progress:
            progress(len(mine) * world, chunks)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    parts = [mine[k] for k in range(chunks)]
    pool, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    preview = torch.cat([p[2] for p in parts if p[2] is not None])
    return pool, logits, preview
