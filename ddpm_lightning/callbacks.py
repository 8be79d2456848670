"""Callbacks that generate images during training. They run at the end of validation, where Lightning's
WeightAveraging callback has swapped the EMA weights in, so they must come before it in the callback list."""

import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torchvision.utils import make_grid


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (3, H, W) image as PNG through a temporary file, so no half-written file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def sample_grid(module, n_per_class: int, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """A grid of samples with fixed noise: one row per class for the conditional model, else n images."""
    g = torch.Generator(module.device).manual_seed(seed)
    if module.hparams.conditional:
        names = module.hparams.class_names
        labels = torch.arange(len(names), device=module.device).repeat_interleave(n_per_class)
        images, nrow = module.sample(labels=labels, generator=g), n_per_class
        caption = f"rows: {', '.join(names)}; w={module.hparams.guidance_w}"
    else:
        images, nrow = module.sample(n=n, generator=g), math.ceil(math.sqrt(n))
        caption = ", ".join(module.hparams.class_names)
    return make_grid(images, nrow=nrow, padding=2), caption


class SampleGrid(L.Callback):
    """At each validation (every ``trainer.check_val_every_n_epoch`` epochs), with the EMA weights: a grid of
    samples to ``<run dir>/samples/epoch_XXXX.png`` and, as an image, to W&B."""

    def __init__(self, n_per_class: int = 8, n: int = 64, seed: int = 0):
        self.n_per_class, self.n, self.seed = n_per_class, n, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        grid, caption = sample_grid(pl_module, self.n_per_class, self.n, self.seed)
        save_png(grid, Path(trainer.default_root_dir) / "samples" / f"epoch_{trainer.current_epoch:04d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid.permute(1, 2, 0).cpu().numpy()], step=trainer.global_step, caption=[caption])
