"""evaluate.py and the FID callback end to end, with a random detector and generated data."""

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, make_cifar

from ddpm_lightning.data import load_subset


def run(python, script, *args):
    return subprocess.run([python, str(ROOT / script), *args], capture_output=True, text=True, timeout=600)


def eval_args(smoke_run, detector_file, tmp_path):
    run_dir, root = smoke_run
    return [
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"metrics.inception_weights={detector_file}",
        f"data.root={root}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "metrics.num_samples=10",
        "sampler=ddim",
        "sampler.steps=3",
    ]


def test_evaluate_py_writes_results_and_logs_to_wandb(python, smoke_run, detector_file, tmp_path):
    p = run(
        python,
        "evaluate.py",
        *eval_args(smoke_run, detector_file, tmp_path),
        "guidance.w=2",
        f"hydra.run.dir={tmp_path / 'e'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["model"] == "improved" and results["w"] == 2.0 and results["num_samples"] == 10
    assert (
        results["fid"] > 0 and results["is_mean"] >= 1 - 1e-9 and results["is_unavailable"] is None
    )  # IS >= 1, up to rounding
    assert results["fid_ci95"][0] < results["fid"] < results["fid_ci95"][1]
    assert results["kid_ci95"][0] < results["kid_mean"] < results["kid_ci95"][1] and results["kid_std"] >= 0
    assert results["fid_floor"] > 0 and results["kid_floor"] is not None
    assert (
        0 <= results["class_acc"] <= 1
        and results["class_acc_ci95"][0] <= results["class_acc"] <= results["class_acc_ci95"][1]
    )
    assert (
        0 <= results["class_acc_floor"] <= 1
        and 0 <= results["memorized"] <= 1
        and results["memorized_floor"] is not None
    )
    assert (tmp_path / "e" / "nearest.png").stat().st_size > 500  # the samples beside their nearest training images
    row = next(csv.DictReader(open(tmp_path / "e" / "results.csv")))
    assert float(row["fid"]) == pytest.approx(results["fid"]) and float(row["kid_mean"]) == pytest.approx(
        results["kid_mean"]
    )
    assert "FID" in p.stderr + p.stdout and "real-data floor" in p.stderr + p.stdout
    assert list((tmp_path / "e" / "wandb").glob("offline-run-*"))


def test_evaluate_py_flags_training_images_shifted_by_a_pixel_and_not_test_images(python, detector_file, tmp_path):
    """Any model's images as an .npz: training images moved down by one pixel are copies; real test images are not,
    and 0 copies of N still gets an interval whose upper end is above 0."""
    root = make_cifar(tmp_path / "cifar", n_train=60, n_test=20, labels=(1, 3), natural=True)
    folder, classes = root / "cifar-10-batches-py", ["automobile", "cat"]
    train, test = (load_subset(folder, classes, split)[0] for split in ("train", "test"))
    shifted = torch.cat([train[..., :1, :], train[..., :-1, :]], -2)[::6]  # down by one pixel, the top row repeated
    for name, images in (("shifted", shifted), ("test", test[:10])):
        np.savez(tmp_path / f"{name}.npz", images.permute(0, 2, 3, 1).numpy())
    sweep = tmp_path / "sweep"
    p = run(
        python,
        "evaluate.py",
        "-m",
        f"images={tmp_path / 'shifted.npz'},{tmp_path / 'test.npz'}",
        "data=cars",
        "data.classes=[automobile,cat]",
        f"data.root={root}",
        f"metrics.inception_weights={detector_file}",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "metrics.reference_images=10",  # FID's reference: small; memorization compares with all 120 training images
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["images"]: r for r in (json.loads(q.read_text()) for q in sweep.glob("*/results.json"))}
    copies, real = rows[str(tmp_path / "shifted.npz")], rows[str(tmp_path / "test.npz")]
    assert copies["memorized"] >= 0.9 and copies["num_samples"] == 20
    assert real["memorized"] <= 0.05 and real["memorized_ci95"][1] > 0 and real["num_samples"] == 10


@pytest.mark.slow  # 19 s; the floor itself is in every evaluation of the default suite (fid_floor, kid_floor)
def test_evaluate_py_scores_real_images_as_the_floor(python, smoke_run, detector_file, tmp_path):
    p = run(
        python,
        "evaluate.py",
        *eval_args(smoke_run, detector_file, tmp_path),
        "real=true",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["sampler"] == "real test images" and results["num_samples"] == 10
    assert results["fid"] == results["fid_floor"] and results["kid_mean"] == results["kid_floor"]
    assert results["fid_ci95"][0] < results["fid"] < results["fid_ci95"][1]


def test_guidance_sweep_gives_one_result_per_w_and_the_summary(python, smoke_run, detector_file, tmp_path):
    sweep = tmp_path / "sweep"
    p = run(
        python,
        "evaluate.py",
        "-m",
        *eval_args(smoke_run, detector_file, tmp_path),
        "guidance.w=0,2",
        "metrics.prc=true",
        f"hydra.sweep.dir={sweep}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(sweep.glob("*/results.json"))) == 2
    assert len({r.name for r in sweep.glob("*/wandb/offline-run-*")}) == 2
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith(
        "| w | sampler | steps | N | FID [95% CI] | KID x1e3 [95% CI] | floor FID / KID x1e3 | IS | precision | recall | "
        "class agreement [95% CI] (real) | memorized [95% CI] (real) |"
    )
    assert table[2].startswith("| 0.0 | ddim | 3 | 10 |") and table[3].startswith("| 2.0 | ddim | 3 | 10 |")
    assert table[2].count("[") == 4 and table[1].count("---") == table[0].count(
        " |"
    )  # FID, KID, class agreement, memorized
    assert (sweep / "fid_is_vs_w.png").stat().st_size > 1000


@pytest.mark.slow  # 41 s; the default suite keeps FID during training (test_trainer_settings, test_cluster)
def test_training_logs_fid_and_is_for_each_guidance_weight(python, cifar_root, detector_file, tmp_path):
    run_dir = tmp_path / "run"
    p = run(
        python,
        "train.py",
        "experiment=smoke",
        "model=improved",
        f"data.root={cifar_root}",
        "data.classes=[automobile,cat]",
        "data.max_images=null",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.fid.every_n_epochs=2",
        f"metrics.inception_weights={detector_file}",
        "metrics.num_samples=10",
        f"metrics.cache_dir={tmp_path / 'cache'}",
        "guidance.w=[0,2]",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {
        "val/fid_w0.0",
        "val/fid_w2.0",
        "val/is_mean_w0.0",
        "val/is_std_w2.0",
        "val/kid_mean_w0.0",
        "val/kid_std_w2.0",
        "val/fid_ci95_low_w0.0",
        "val/fid_ci95_high_w2.0",
        "val/kid_ci95_low_w2.0",
        "val/fid_floor_w0.0",
        "val/kid_floor_w2.0",
        "val/class_acc_w0.0",
        "val/class_acc_ci95_low_w2.0",
        "val/class_acc_floor_w2.0",
        "val/memorized_w0.0",
        "val/memorized_floor_w2.0",
        "val/nn_ratio_median_w2.0",
    } <= logged
    assert (run_dir / "samples" / "fid_epoch_0001_w2.0.png").is_file()


@pytest.mark.slow  # 9 s; test_schema refuses a missing metrics.inception_weights in process
def test_missing_detector_weights_fail_at_start_up(python, cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    p = run(
        python,
        "train.py",
        "experiment=smoke",
        f"data.root={cifar_root}",
        "data.batch_size=8",
        "callbacks.fid.every_n_epochs=10",
        "metrics.inception_weights=/nonexistent/inception.pth",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 2
    assert (
        p.stderr.strip().splitlines()[-1]
        == "error: metrics.inception_weights=/nonexistent/inception.pth does not exist; point it at an FID Inception state dict"
    )
    assert not (run_dir / "checkpoints").exists()
