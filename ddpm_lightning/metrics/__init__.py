"""How a model is evaluated: generation -> torch-fidelity's FID Inception -> FID, IS, KID (and precision/recall,
class agreement, memorization) as torchmetrics Metrics, with intervals and the real-data floor; reference statistics
cached on disk. No Lightning here. One module per concern; this package keeps the names callers use."""

from ddpm_lightning.metrics.collection import (
    loggable,
    metric_collection,
    scores_of,
    settings_of,
)
from ddpm_lightning.metrics.detector import (
    FEATURES,
    Inception,
    detector_id,
    extract,
    is_unavailable,
    load_inception,
    progress_bar,
)
from ddpm_lightning.metrics.evaluation import evaluate, even_labels
from ddpm_lightning.metrics.memorization import Memorization, TrainingSet, nearest_training_images
from ddpm_lightning.metrics.probe import (
    ClassAgreement,
    class_probe,
    fit_probe,
    probe_classes,
)
from ddpm_lightning.metrics.reference import (
    cached_statistics,
    detector_and_reference,
    floor,
    reference_statistics,
    score_real,
)
from ddpm_lightning.metrics.states import (
    FID,
    KID,
    InceptionScore,
    InImageOrder,
    PoolFeatures,
    PrecisionRecall,
)
from ddpm_lightning.metrics.stats import (
    fid,
    fid_of_resamples,
    fraction_and_interval,
    inception_score,
    interval,
    kid,
    kid_of_resamples,
    mmd2_unbiased,
    polynomial_kernel,
    proportion_interval,
    resample_counts,
    statistics,
)

__all__ = [
    "FEATURES",
    "Inception",
    "load_inception",
    "detector_id",
    "extract",
    "progress_bar",
    "is_unavailable",
    "statistics",
    "fid",
    "inception_score",
    "polynomial_kernel",
    "mmd2_unbiased",
    "kid",
    "resample_counts",
    "fid_of_resamples",
    "kid_of_resamples",
    "interval",
    "fraction_and_interval",
    "proportion_interval",
    "InImageOrder",
    "FID",
    "InceptionScore",
    "PoolFeatures",
    "KID",
    "PrecisionRecall",
    "fit_probe",
    "probe_classes",
    "class_probe",
    "ClassAgreement",
    "nearest_training_images",
    "TrainingSet",
    "Memorization",
    "settings_of",
    "metric_collection",
    "scores_of",
    "loggable",
    "reference_statistics",
    "cached_statistics",
    "detector_and_reference",
    "score_real",
    "floor",
    "even_labels",
    "evaluate",
]
