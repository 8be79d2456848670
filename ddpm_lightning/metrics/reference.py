"""The reference statistics (cached on disk), the detector with them, and the real-data floor."""

import hashlib
import json
import logging
from pathlib import Path

import torch

from ddpm_lightning import files
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.metrics.collection import metric_collection, scores_of, settings_of
from ddpm_lightning.metrics.detector import (
    Inception,
    detector_id,
    extract,
    load_inception,
    progress_bar,
)
from ddpm_lightning.metrics.memorization import TrainingSet
from ddpm_lightning.metrics.probe import class_probe
from ddpm_lightning.metrics.stats import statistics

log = logging.getLogger(__name__)


def reference_statistics(
    detector: Inception, images: torch.Tensor, key: dict, cache_dir: str | Path, batch_size: int = 250
) -> dict:
    """FID statistics of real images and their pool3 features (for KID and precision/recall), cached under a hash of
    ``key`` (classes, split, number of images, detector) plus the images' own digest, so a later run or evaluation
    loads them instead of recomputing; computing them shows a progress bar with the time left."""
    key = {**key, "num_images": len(images), "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest()}
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid_stats_{name}.pt"
    cached = files.load_or_none(
        path,
        lambda p: cached_statistics(torch.load(p, map_location="cpu", weights_only=True)),
        "the reference-statistics cache",
    )
    if cached is not None:
        return {**cached, "name": name}
    log.info(
        f"computing reference Inception statistics of {len(images)} images ({key['classes']}, {key['split']}) -> {path}"
    )
    features = extract(detector, images, batch_size, progress=f"reference statistics, {len(images)} real images")[0]
    stats = statistics(features)
    files.save_torch(
        {
            "mu": torch.from_numpy(stats["mu"]),
            "sigma": torch.from_numpy(stats["sigma"]),
            "features": features,
            "key": json.dumps(key),
        },
        path,
        "the reference statistics (cache)",
    )
    return {**stats, "features": features, "name": name}


def cached_statistics(cached: dict) -> dict:
    """The statistics of a cache file, checked: the mean, covariance and features of the right shapes, all finite."""
    mu, sigma, features = cached["mu"], cached["sigma"], cached["features"]
    d = mu.shape[0]
    if (
        sigma.shape != (d, d)
        or features.ndim != 2
        or features.shape[1] != d
        or not all(bool(torch.isfinite(x).all()) for x in (mu, sigma, features))
    ):
        raise ValueError(
            f"shapes {tuple(mu.shape)}, {tuple(sigma.shape)}, {tuple(features.shape)} or values are not those of FID statistics"
        )
    return {"mu": mu.numpy(), "sigma": sigma.numpy(), "features": features}


def detector_and_reference(
    weights: str | None,
    classes: list[str],
    images: torch.Tensor,
    split: str,
    limit: int | None,
    cache_dir: str | Path,
    batch_size: int,
    device,
    labels: torch.Tensor | None = None,
    train_images: torch.Tensor | None = None,
) -> tuple[Inception, dict]:
    """What every evaluation needs, checked before any work: the detector (on ``device``) and the reference statistics
    of the first ``limit`` (or all) real images of the subset's ``split``, from the cache when it has them; with the
    images' ``labels`` and more than one class, the class probe on their features (cached with them); with
    ``train_images`` (what the model trained on), the TrainingSet that memorization is measured against, prepared
    once. The reference keeps its ``split`` and size, so that the floor is scored on other images (``floor``)."""
    detector = load_inception(weights).to(device)
    images = images[:limit] if limit else images
    key = dict(classes=list(classes), split=split, detector=detector_id(weights))
    reference = {**reference_statistics(detector, images, key, cache_dir, batch_size), "split": split}
    reference["num_images"] = len(images)
    if labels is not None and len(classes) > 1:
        labels = labels[:limit] if limit else labels
        reference["probe"] = class_probe(reference["features"], labels, len(classes), reference["name"], cache_dir)
    if train_images is not None:
        reference["training_set"] = TrainingSet(train_images, device)
        reference["train_images_sha1"] = hashlib.sha1(train_images.numpy().tobytes()).hexdigest()
    return detector, reference


def score_real(
    detector: Inception,
    reference: dict,
    images: torch.Tensor,
    settings: dict,
    batch_size: int,
    progress: str | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
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
            collection.update(
                pool=pool,
                logits=logits,
                index=torch.arange(lo, lo + len(pool), device=device),
                images=batch,
                labels=None if labels is None else labels[lo : lo + batch_size].to(device),
            )
            advance(len(pool))
    return scores_of(collection, detector, len(images))


@torch.no_grad()
def floor(
    detector: Inception,
    reference: dict,
    test_images: torch.Tensor,
    num_samples: int,
    settings: dict,
    cache_dir: str | Path,
    batch_size: int,
    test_labels: torch.Tensor | None = None,
) -> dict:
    """What a perfect model scores at this N: the metrics of N real held-out (test) images of the subset against the
    same reference (the class agreement with their ``test_labels``; memorization against the same training images),
    cached per (reference, probe, training images, test images, N, detector, settings). The images are ones the
    reference (and the probe fitted on it) did not see: the first N of the test split, or, when the reference is made
    of the first test images, the N after them. With fewer such images than N it says so and uses them all."""
    if reference.get("split") == "test":
        seen = reference["num_images"]
        test_images = test_images[seen:]
        test_labels = None if test_labels is None else test_labels[seen:]
        if not len(test_images):
            raise ConfigError(
                f"the floor has no test images of its own: the reference holds all {seen} of the subset's test images "
                "(metrics.reference_split=test); set metrics.reference_images below that, or metrics.reference_split=train"
            )
    if len(test_images) < num_samples:
        log.warning(
            f"the floor: the test split has {len(test_images)} images of the subset that the reference did not see, "
            f"fewer than metrics.num_samples={num_samples}; the floor is computed at N={len(test_images)} and is higher than at N={num_samples}"
        )
    images = test_images[:num_samples]
    labels = None if test_labels is None or reference.get("probe") is None else test_labels[:num_samples]
    key = {
        "reference": reference["name"],
        "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest(),
        "settings": settings_of(settings),
        "probe": None if labels is None else reference["probe"]["labels_sha1"],
        "train_images": reference.get("train_images_sha1"),
    }
    path = Path(cache_dir) / f"floor_{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    wanted = (
        {"fid", "kid_mean", "num_samples"}
        | ({"class_acc"} if labels is not None else set())
        | ({"memorized"} if key["train_images"] else set())
    )
    cached = files.load_or_none(path, lambda p: dict(json.loads(p.read_text())["scores"]), "the real-data floor cache")
    if cached is not None and wanted <= set(cached):
        return cached
    log.info(f"computing the real-data floor: {len(images)} real test images against the reference -> {path}")
    scores = {
        **score_real(
            detector,
            reference,
            images,
            settings,
            batch_size,
            progress=f"real-data floor, {len(images)} test images",
            labels=labels,
        ),
        "num_samples": len(images),
    }
    files.write_json(path, {"key": key, "scores": scores}, "the real-data floor (cache)")
    return scores
