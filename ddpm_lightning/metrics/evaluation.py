"""The one evaluation loop that the FID callback and evaluate.py both call: images in chunks, split over ranks."""

import math

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from ddpm_lightning.errors import Interrupted
from ddpm_lightning.metrics.collection import metric_collection, scores_of
from ddpm_lightning.metrics.detector import Inception


def even_labels(n: int, num_classes: int) -> torch.Tensor:
    """Class labels drawn evenly over the subset: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def evaluate(
    module,
    detector: Inception,
    reference: dict,
    num_samples: int,
    w: float | None,
    settings: dict,
    batch_size: int,
    sampler: dict | None = None,
    progress=None,
) -> tuple[dict, torch.Tensor]:
    """The one evaluation path: ``num_samples`` images from the module (evenly drawn classes, guidance weight w,
    the given or the module's sampler), their Inception features, and the metric collection's numbers; also the
    first 64 images (a preview). Split over the ranks of torch.distributed when it is running.

    The images come in chunks of ``batch_size``; chunk k is generated with its own seed (settings['seed'], k), so a
    chunk's images do not depend on which rank makes it; rank r makes chunks r, r + world, ..., and the metric
    states sync over ranks, so every rank gets the numbers one process would. When the module's sampling is stopped
    (a preemption signal), every rank raises Interrupted at the same point, before the metrics sync."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(detector.parameters()).device
    labels = (
        even_labels(num_samples, len(module.hparams.class_names)).to(module.device)
        if module.hparams.conditional
        else None
    )
    collection = metric_collection(
        detector, reference if labels is not None else {**reference, "probe": None}, num_samples, settings
    )
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
        collection.update(
            pool=pool,
            logits=logits,
            index=torch.arange(start, start + size, device=device),
            images=images.to(device),
            labels=None if y is None else y.to(device),
        )
        if start < 64:
            preview.append(
                (torch.arange(start, start + size, device=images.device)[: 64 - start], images[: 64 - start])
            )
        if progress:
            progress(min(done * world, chunks), chunks)
    if (
        world > 1
    ):  # every rank takes part in this before the metrics sync, so a rank that stopped early meets the others here
        flag = torch.tensor([float(stopped)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopped = bool(flag.item())
    if stopped:
        raise Interrupted("a preemption signal arrived during the evaluation")
    if (
        rank >= chunks
    ):  # more ranks than chunks: this one made none, and adds empty states of the right shapes to the sync
        side = module.hparams.image_size
        collection.update(
            pool=torch.zeros(0, 2048, device=device),
            logits=torch.zeros(0, 1008, device=device),
            index=torch.zeros(0, dtype=torch.long, device=device),
            labels=torch.zeros(0, dtype=torch.long, device=device),
            images=torch.zeros(0, 3, side, side, dtype=torch.uint8, device=device),
        )
    index = torch.cat([i for i, _ in preview]) if preview else torch.zeros(0, dtype=torch.long, device=module.device)
    images = (
        torch.cat([x for _, x in preview])
        if preview
        else torch.zeros(0, 3, *[module.hparams.image_size] * 2, dtype=torch.uint8, device=module.device)
    )
    if world > 1:  # the first 64 images may come from several ranks
        index, images = torch.cat(gather_all_tensors(index)), torch.cat(gather_all_tensors(images))
    return scores_of(collection, detector, num_samples), images[index.argsort()]
