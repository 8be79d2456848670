"""train.py end to end, as a subprocess, on a generated dataset that is easy to learn."""

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_cifar
from PIL import Image


def train(python, *overrides, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(ROOT / "train.py"), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def smoke_args(root, run_dir, *extra):
    return [
        "experiment=smoke",
        f"data.root={root}",
        "data.classes=[automobile,cat]",
        "data.max_images=null",
        "data.batch_size=8",
        "trainer.max_epochs=6",
        "trainer.check_val_every_n_epoch=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def epoch_losses(metrics: Path) -> list[float]:
    rows = list(csv.DictReader(open(metrics)))
    return [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]


@pytest.mark.parametrize("model", [pytest.param("simple", marks=pytest.mark.slow), "improved"])  # 12 s each
def test_smoke_run(python, cifar_root, tmp_path, model):
    run_dir = tmp_path / "run"
    p = train(python, *smoke_args(cifar_root, run_dir, f"model={model}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    losses = epoch_losses(run_dir / "csv" / "metrics.csv")
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "epoch_0001.png",
        "epoch_0003.png",
        "epoch_0005.png",
    ]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["conditional"] == (model == "improved")
    assert ckpt["hyper_parameters"]["class_names"] == ["automobile", "cat"]
    assert "current_model_state" in ckpt  # EMA weights in state_dict, the raw weights beside them


def test_multirun_gives_each_job_its_own_run_dir_and_wandb_run(python, cifar_root, tmp_path):
    sweep = tmp_path / "sweep"
    p = train(
        python,
        "-m",
        *smoke_args(
            cifar_root,
            tmp_path / "unused",
            "model=improved",
            "trainer.max_epochs=2",
            f"hydra.sweep.dir={sweep}",
            "guidance.w=0,2",
        ),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning: this sweep trains one model per value of guidance.w" in p.stderr and "evaluate.py -m" in p.stderr
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and (d / "checkpoints").is_dir())
    assert len(jobs) == 2 and "guidance.w=0," in jobs[0].name and "guidance.w=2," in jobs[1].name
    run_ids = {r.name for d in jobs for r in (d / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 2
    for d in jobs:
        assert (d / "checkpoints" / "last.ckpt").is_file() and (d / "csv" / "metrics.csv").is_file()


@pytest.mark.slow  # 15 s; the SLURM tests run two-rank DDP in the default suite
def test_ddp_with_two_cpu_processes(python, cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    p = train(
        python,
        *smoke_args(
            cifar_root,
            run_dir,
            "model=improved",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=2",
        ),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 40 images, 8 per rank and step, 2 ranks: 2 steps an epoch
    assert ckpt["global_step"] == 4
    assert len(epoch_losses(run_dir / "csv" / "metrics.csv")) == 2  # logged once, from rank 0
    assert len(list((run_dir / "samples").glob("*.png"))) == 1


def test_notebook_runs_on_a_smoke_checkpoint(python, cifar_root, tmp_path):
    """The code cells of notebooks/explore.ipynb, run in order against a fresh smoke run."""
    import json
    import re

    run_dir = tmp_path / "run"
    assert (
        train(
            python, *smoke_args(cifar_root, run_dir, "model=improved", "trainer.max_epochs=1", "logger=csv")
        ).returncode
        == 0
    )
    cells = json.load(open(ROOT / "notebooks" / "explore.ipynb"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    shown = []
    env = {"__name__": "__main__"}
    settings = {"CKPT": str(run_dir / "checkpoints" / "last.ckpt"), "DATA_ROOT": str(cifar_root)}
    for name, value in settings.items():  # the notebook's two settings, whatever their quotes
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.M)
        assert n == 1, f"the notebook sets {name} once"
    exec(code.replace("from IPython.display import display\n", ""), {**env, "display": shown.append})
    assert len(shown) == 2 and shown[0].size == (2 * (2 + 8 * 34), 2 * (2 + 2 * 34))


@pytest.mark.slow  # 14 s; the paper's U-Net is built and stepped in test_unet and test_golden
def test_fast_dev_run_of_the_paper_config_draws_a_small_grid(python, tmp_path):
    """The paper's Model 2 (full U-Net) with trainer.fast_dev_run: one step, one validation batch, a one-image-per-class
    two-step grid (not 40 images of 500 steps), no FID, no done.json."""
    root = make_cifar(tmp_path / "cifar", n_train=15, n_test=2)
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    p = train(
        python,
        "model=improved",
        "data=five_class",
        f"data.root={root}",
        "trainer.fast_dev_run=true",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    seconds = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    grid = Image.open(run_dir / "samples" / "epoch_0000.png")
    assert grid.size == (34 + 2, 5 * 34 + 2)  # five rows (classes) of one 32-pixel image, 2-pixel padding
    assert not (run_dir / "done.json").exists()
    print(f"fast_dev_run of model=improved data=five_class: {seconds:.1f} s")


@pytest.mark.slow  # 19 s
def test_start_up_says_how_long_training_takes_and_names_the_cpu_presets(python, cifar_root, tmp_path):
    p = train(
        python,
        *smoke_args(
            cifar_root,
            tmp_path / "run",
            "trainer.max_epochs=100000",
            "+trainer.max_time=00:00:00:10",
            "trainer.check_val_every_n_epoch=1000",
            "logger=csv",
        ),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(line for line in (p.stdout + p.stderr).splitlines() if "s per optimizer step" in line)
    assert "steps left take about" in line and "experiment=smoke" in line and "experiment=paper_cpu" in line, line
    assert not (tmp_path / "run" / "done.json").exists()  # stopped by max_time, not finished


@pytest.mark.slow  # the default suite covers the skip through tests/test_paper.py's rerun
def test_a_finished_run_dir_is_not_trained_again(python, cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    args = smoke_args(cifar_root, run_dir, "trainer.max_epochs=1", "logger=csv")
    assert train(python, *args).returncode == 0
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    p = train(python, *args)
    assert p.returncode == 0 and "nothing to do" in p.stdout + p.stderr
    assert ckpt.stat().st_mtime_ns == before
    p = train(python, *smoke_args(cifar_root, run_dir, "trainer.max_epochs=2", "logger=csv"))  # more epochs: trains on
    assert p.returncode == 0 and ckpt.stat().st_mtime_ns != before
    assert (
        epoch_losses(run_dir / "csv" / "metrics.csv")[-1] > 0
        and json.loads((run_dir / "done.json").read_text())["max_epochs"] == 2
    )
