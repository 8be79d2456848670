"""The FID Inception detector (torch-fidelity's), its weights and identity, and feature extraction in batches."""

import hashlib
import tempfile
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from ddpm_lightning.errors import ConfigError

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
        self.is_unavailable = (
            None
            if self.has_classifier
            else (
                f"Inception Score unavailable: the detector weights {source} have no classifier layer (fc.*); "
                "FID is computed, IS is not. Use weights with the classifier (torch-fidelity's) for IS"
            )
        )

    def load_state_dict(self, state_dict, strict=True, assign=False):
        given, self._state_dict = self._state_dict, None
        hint = "set metrics.inception_weights=PATH to an FID Inception state dict"
        try:
            missing, unexpected = super().load_state_dict(given, strict=False)
        except RuntimeError as e:  # wrong shapes
            raise ConfigError(
                f"Inception weights do not fit torch-fidelity's layout ({str(e).splitlines()[-1].strip()[:160]}); {hint}"
            ) from None
        missing = [k for k in missing if not (k.startswith("fc.") and not self.has_classifier)]
        if missing or unexpected:
            raise ConfigError(
                f"Inception weights do not fit torch-fidelity's layout (missing {missing[:3]}, unexpected {unexpected[:3]}); {hint}"
            )
        return missing, unexpected


def load_inception(weights: str | None) -> Inception:
    """The detector from ``metrics.inception_weights`` (a file in torch-fidelity's layout), or torch-fidelity's
    download when unset. Unavailable weights fail here, with one line naming the setting."""
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(
                URL_INCEPTION_V3, map_location="cpu", progress=False, weights_only=True
            )
        except Exception as e:
            raise ConfigError(
                f"the FID Inception weights could not be downloaded ({type(e).__name__}); "
                "set metrics.inception_weights=PATH to a local copy in torch-fidelity's layout"
            ) from None
        return Inception(state, URL_INCEPTION_V3)
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(
            f"metrics.inception_weights={weights} does not exist; point it at an FID Inception state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"cannot load metrics.inception_weights={weights} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "it must be a plain state dict"
        ) from None
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
def extract(
    detector: Inception, images: torch.Tensor, batch_size: int = 250, progress: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def is_unavailable(detector: Inception, num_images: int, splits: int = 10) -> str | None:
    """Why the Inception Score cannot be given for these images with this detector, or None if it can."""
    if detector.is_unavailable:
        return detector.is_unavailable
    if num_images < splits:
        return f"Inception Score unavailable: {num_images} images are fewer than its {splits} splits; use metrics.num_samples >= {splits}"
    return None
