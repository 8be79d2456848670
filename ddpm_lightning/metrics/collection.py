"""Every metric of an evaluation as one torchmetrics collection, and its numbers as flat dicts."""

from torchmetrics import MetricCollection

from ddpm_lightning.metrics.detector import Inception, is_unavailable
from ddpm_lightning.metrics.memorization import Memorization
from ddpm_lightning.metrics.probe import ClassAgreement
from ddpm_lightning.metrics.states import FID, KID, InceptionScore, PrecisionRecall


def settings_of(m) -> dict:
    """What the numbers depend on beyond N and the reference, from the metrics.* settings."""
    return {k: m[k] for k in ("kid_subsets", "kid_subset_size", "bootstrap", "seed", "prc")}


def metric_collection(detector: Inception, reference: dict, num_images: int, settings: dict) -> MetricCollection:
    """FID, KID, IS (when the detector and N allow), precision/recall (``settings['prc']``), class agreement (when the
    reference has a class probe) and memorization (when it has the training images) on the detector's device.
    ``settings``: kid_subsets, kid_subset_size, bootstrap (resamples; 0: no intervals), seed, prc."""
    b, seed = settings["bootstrap"], settings["seed"]
    metrics = {
        "fid": FID(reference, b, seed),
        "kid": KID(reference["features"], settings["kid_subsets"], settings["kid_subset_size"], b, seed),
    }
    if not is_unavailable(detector, num_images):
        metrics["is"] = InceptionScore()
    if settings["prc"]:
        metrics["prc"] = PrecisionRecall(reference["features"])
    if reference.get("probe") is not None:
        metrics["class_acc"] = ClassAgreement(reference["probe"], b, seed)
    if reference.get("training_set") is not None:
        metrics["memorized"] = Memorization(reference["training_set"], b, seed)
    device = next(detector.parameters()).device
    return MetricCollection(metrics, compute_groups=False).to(
        "cpu" if device.type == "mps" else device
    )  # mps has no float64


def scores_of(collection: MetricCollection, detector: Inception, num_images: int) -> dict:
    """The collection's numbers as one flat dict (is_mean/is_std None, with is_unavailable saying why, when IS is not given)."""
    return {
        "is_mean": None,
        "is_std": None,
        **collection.compute(),
        "is_unavailable": is_unavailable(detector, num_images),
    }


def loggable(scores: dict) -> dict:
    """The numbers of a scores dict by log name: intervals [low, high] as <name>_low and <name>_high; no None or text."""
    out = {}
    for name, value in scores.items():
        if isinstance(value, list):
            out[f"{name}_low"], out[f"{name}_high"] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
