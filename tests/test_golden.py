"""Checkpoints written before the redesign load and sample the images they sampled then (tests/golden/README.md)."""

from pathlib import Path

import pytest
import torch

from ddpm_lightning.module import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = torch.load(ROOT / "tests" / "golden" / "images.pt", weights_only=True)
CHECKPOINTS = {
    "simple_smoke": ROOT / "tests" / "golden" / "simple_smoke.ckpt",
    "improved_smoke": ROOT / "tests" / "golden" / "improved_smoke.ckpt",
    "five_class_cpu": ROOT / "docs" / "results" / "five_class_cpu" / "final.ckpt",
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_a_checkpoint_from_before_the_redesign_samples_its_golden_images(name):
    module = load_checkpoint(str(CHECKPOINTS[name]), "cpu")
    conditional = module.hparams.conditional
    labels = torch.arange(len(module.hparams.class_names)) if conditional else None
    images = module.sample(
        n=4,
        labels=labels,
        w=GOLDEN["w"] if conditional else None,
        sampler=dict(GOLDEN["sampler"]),
        generator=torch.Generator().manual_seed(GOLDEN["seed"]),
    )
    golden = GOLDEN["images"][name]
    assert images.dtype == torch.uint8 and images.shape == golden.shape
    diff = (images.int() - golden.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (
        f"{int((diff > 0).sum())} values differ, up to {int(diff.max())}"
    )
