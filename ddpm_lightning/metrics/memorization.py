"""Memorization: each image's nearest and second-nearest training images in pixel space, mirrors counted."""

import torch

from ddpm_lightning.metrics.states import InImageOrder
from ddpm_lightning.metrics.stats import fraction_and_interval


@torch.no_grad()
def nearest_training_images(
    images: torch.Tensor, train_images: torch.Tensor, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
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
