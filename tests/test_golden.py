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
    "five_class_cpu": ROOT / "docs" / "results" / "five_class_cpu" / "paper_recipe" / "final.ckpt",
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


def test_a_run_from_before_the_redesign_resumes_and_its_final_checkpoint_samples_in_sample_py(python, tmp_path):
    """The improved smoke checkpoint (one epoch, written by the old code) trains on for a second epoch through train.py's
    ckpt_path, and five_class_cpu's final.ckpt draws through sample.py."""
    import subprocess

    from conftest import make_cifar

    root = make_cifar(tmp_path / "cifar", n_train=8, n_test=4)  # the data the checkpoint was trained on
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "model=improved", f"data.root={root}", "data.classes=[automobile,cat]", "data.max_images=null",
            "data.batch_size=8", "net.attention=[4]", "net.width=4", "net.emb_dim=16", "net.heads=2", "logger=csv",
            "trainer.max_epochs=2", f"ckpt_path={CHECKPOINTS['improved_smoke']}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    p = subprocess.run([python, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    old = torch.load(CHECKPOINTS["improved_smoke"], map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * old["global_step"]
    assert resumed["hyper_parameters"]["guidance"] == {"p_uncond": 0.1, "w": 1.0}  # written in the new layout
    out = tmp_path / "samples"
    p = subprocess.run([python, str(ROOT / "sample.py"), f"ckpt={CHECKPOINTS['five_class_cpu']}", "n=5", f"out={out}",
                        "sampler=ddim", "sampler.steps=2"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0 and (out / "grid.png").is_file(), p.stderr[-3000:]
