"""Memorization: for each image, its nearest and second-nearest training images under a distance that a copy
survives, and the fraction of images much nearer to one training image than to any other (d1 / d2 below a threshold).

The distance (``copy_distance``) compares images as a person would call them copies at 32x32: each image standardised
per channel (brightness, contrast and colour casts do not count), blurred with a Gaussian of sd 1 pixel (noise,
blur and JPEG artefacts count less), then the smallest l2 distance over shifts of up to 2 pixels either way, the
mirror image, and a zoom of 32/28 (a crop scaled back up), on the central 28 x 28 pixels. A coarse search at 8 x 8
first keeps the 64 nearest candidates (with shifts and mirrors), and only those are compared in full. Calibrated on
copies and on real test images (docs/results/memorization/): the threshold and its measured rates are there.
"""

import torch
import torch.nn.functional as F

from ddpm_lightning.metrics.states import InImageOrder
from ddpm_lightning.metrics.stats import fraction_and_interval

SHIFT = 2  # pixels of translation either way
SIGMA = 1.0  # the blur both sides get, in pixels
CANDIDATES = 64  # kept by the coarse search
THRESHOLD = 0.7  # d1 / d2 below this: a copy (docs/results/memorization/README.md)


def comparable(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, each channel of each image at zero mean and unit spread, blurred (sd SIGMA)."""
    x = images.float() / 255
    x = (x - x.mean((-2, -1), keepdim=True)) / (x.std((-2, -1), keepdim=True) + 0.05)
    k = torch.exp(-(torch.arange(-2, 3, dtype=x.dtype, device=x.device) ** 2) / (2 * SIGMA**2))
    k = (k[:, None] * k[None]) / k.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)


def coarse(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 4).flatten(1)


class TrainingSet:
    """The training images (uint8, kept as ``images``) prepared once for ``nearest``: comparable, their mirrors, and
    their 8 x 8 versions, on ``device``."""

    def __init__(self, train_images: torch.Tensor, device: torch.device | str = "cpu", chunk: int = 4096):
        self.images = train_images
        self.x = torch.cat([comparable(t.to(device)) for t in train_images.split(chunk)])
        self.low = torch.stack([coarse(self.x), coarse(self.x.flip(-1))])  # (2, N, 192)

    def candidates(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` training images nearest to each query at 8 x 8, over shifts of 0 and SHIFT and the mirrors."""
        best = None
        for dy in (-SHIFT, 0, SHIFT):
            for dx in (-SHIFT, 0, SHIFT):
                low = coarse(torch.roll(q, (dy, dx), (-2, -1)))
                d = torch.minimum(torch.cdist(low, self.low[0]), torch.cdist(low, self.low[1]))
                best = d if best is None else torch.minimum(best, d)
        return best.topk(min(k, self.x.shape[0]), dim=1, largest=False).indices

    @torch.no_grad()
    def nearest(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per uint8 image: the copy distances to its nearest and second-nearest training images, (N, 2), and their
        indices, (N, 2)."""
        if len(images) == 0:  # a rank that made no images in this evaluation
            return torch.zeros(0, 2, device=self.x.device), torch.zeros(0, 2, dtype=torch.long, device=self.x.device)
        q = comparable(images.to(self.x.device))
        cand = self.candidates(q, CANDIDATES)
        side = q.shape[-1] - 2 * SHIFT
        views = [q[..., SHIFT:-SHIFT, SHIFT:-SHIFT], F.interpolate(q, size=side, mode="bilinear", antialias=True)]
        ones = torch.ones(1, 3, side, side, device=q.device)
        dists, picks = [], []
        for i in range(len(q)):
            c = self.x[cand[i]]
            c = torch.cat([c, c.flip(-1)])
            window_sq = F.conv2d(c.square(), ones)  # |window|^2 at every shift
            best = None
            for view in views:
                v = view[i : i + 1]
                d2 = (window_sq + v.square().sum() - 2 * F.conv2d(c, v)).flatten(1).amin(1)  # every shift at once
                best = d2 if best is None else torch.minimum(best, d2)
            d, j = best.view(2, -1).amin(0).clamp(min=0).topk(2, largest=False)
            dists.append(d.sqrt() / side)
            picks.append(cand[i][j])
        return torch.stack(dists), torch.stack(picks)


def nearest_training_images(images: torch.Tensor, train_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per uint8 image, the copy distances to its nearest and second-nearest training image, (N, 2), and their
    indices, (N, 2)."""
    return TrainingSet(train_images, images.device).nearest(images)


class Memorization(InImageOrder):
    """The fraction of images that copy a training image, d1 / d2 < THRESHOLD under copy distances (the ratio test of
    Yoon et al. 2023 and Gu et al. 2025, on a distance that survives shifts, mirrors, zoom, colour changes, noise and
    blur), with its exact 95% interval (metrics.bootstrap > 0), and the median d1 / d2."""

    def __init__(self, training_set: TrainingSet, resamples: int = 0, seed: int = 0):
        super().__init__()
        self.training_set, self.resamples = training_set, resamples

    def update(self, images: torch.Tensor, index: torch.Tensor) -> None:
        d, _ = self.training_set.nearest(images)
        self.add(d[:, 0] / d[:, 1].clamp(min=1e-12), index)

    def compute(self) -> dict:
        ratio = self.in_order()
        value, ci = fraction_and_interval(ratio < THRESHOLD, bool(self.resamples))
        return {"memorized": value, "nn_ratio_median": ratio.median().item()} | ({"memorized_ci95": ci} if ci else {})
