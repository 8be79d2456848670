"""run(cfg): images from a checkpoint as a PNG grid, single PNGs and an .npz; optionally the paper's strips."""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid

from ddpm_lightning import files
from ddpm_lightning.data import ensure_cifar10, load_subset, to_unit_range
from ddpm_lightning.diffusion.generate import to_uint8
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.files import atomic_write, save_png
from ddpm_lightning.module import DiffusionModule, load_checkpoint

log = logging.getLogger(__name__)


def class_labels(module: DiffusionModule, classes: list[str] | None, n: int) -> torch.Tensor | None:
    """Labels cycling through the named classes (default: all of the checkpoint's), or None if unconditional."""
    names = module.hparams.class_names
    if not module.hparams.conditional:
        if classes:
            raise ConfigError(
                "classes= was given, but this checkpoint is the unconditional model (model=simple); drop classes="
            )
        return None
    classes = list(classes or names)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ConfigError(f"classes {unknown} are not in this checkpoint's subset; choose from {', '.join(names)}")
    return torch.tensor([names.index(classes[i % len(classes)]) for i in range(n)])


def save_npz(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays), "the samples' npz")


def evenly(n: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of 0..n-1, first and last included."""
    return [round(k * (n - 1) / (count - 1)) for k in range(count)]


def strip(frames: list[torch.Tensor], count: int) -> torch.Tensor:
    """``count`` evenly spaced frames of a sequence of (1, 3, H, W) states, as one row."""
    return make_grid(to_uint8(torch.cat([frames[i] for i in evenly(len(frames), count)])), nrow=count, padding=2)


def run(cfg: DictConfig) -> None:
    module = load_checkpoint(cfg.ckpt, cfg.device, cfg.ema_length, **cfg.speed)
    labels = class_labels(module, cfg.classes, cfg.n)
    out = files.writable_dir(cfg.out or HydraConfig.get().runtime.output_dir)
    for folder in (out, out / "images"):  # temp files of a sampling killed while writing there
        files.remove_leftovers(folder)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    w = cfg.guidance.w if module.hparams.conditional else None
    generator = torch.Generator(module.device).manual_seed(cfg.seed)
    images = module.sample(n=cfg.n, labels=labels, w=w, sampler=sampler, generator=generator, batch_size=cfg.batch_size)
    save_png(make_grid(images, nrow=math.ceil(math.sqrt(cfg.n)), padding=2), out / "grid.png")
    for i, image in enumerate(images):
        save_png(image, out / "images" / f"{i:05d}.png")
    names = module.hparams.class_names
    save_npz(  # OpenAI's convention (arr_0: uint8 NHWC), which evaluate.py images=PATH scores
        out / "samples.npz",
        arr_0=images.permute(0, 2, 3, 1).cpu().numpy(),
        labels=np.array([] if labels is None else labels.numpy()),
        class_names=np.array(names),
    )
    log.info(f"{cfg.n} images with {sampler['name']} to {out} (grid.png, images/, samples.npz)")
    if cfg.strips.reverse:
        frames = []
        generator = torch.Generator(module.device).manual_seed(cfg.seed)
        first = None if labels is None else labels[:1]
        module.sample(
            n=1, labels=first, w=w, sampler=sampler, generator=generator, callback=lambda i, x: frames.append(x.clone())
        )
        save_png(strip(frames, cfg.strips.frames), out / "reverse_diffusion.png")
    if cfg.strips.forward:
        folder = ensure_cifar10(cfg.data.root, download=False)
        x0 = to_unit_range(load_subset(folder, names, "test")[0][:1]).to(module.device)
        sched = module.sched
        eps = torch.randn(
            x0.shape, device=module.device, generator=torch.Generator(module.device).manual_seed(cfg.seed)
        )
        steps = [i - 1 for i in evenly(sched.T + 1, cfg.strips.frames)]  # -1 is x_0 itself, then 0-based t indices
        frames = [x0 if i < 0 else sched.q_sample(x0, torch.tensor([i], device=module.device), eps) for i in steps]
        save_png(strip(frames, cfg.strips.frames), out / "forward_diffusion.png")
