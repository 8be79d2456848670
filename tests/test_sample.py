"""sample.py end to end on a smoke checkpoint, and the samplers' shared properties."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_guidance import FakeNet
from test_samplers import MEAN, STD, exact_eps

from ddpm_lightning.diffusion.guidance import guided
from ddpm_lightning.diffusion.samplers import ddim, dpm_solver, timesteps
from ddpm_lightning.diffusion.schedule import build_schedule
from ddpm_lightning.errors import ConfigError


def sample(python, *args):
    return subprocess.run([python, str(ROOT / "sample.py"), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 10, 50, 500])
def test_timesteps_are_a_decreasing_subsequence_from_T(spacing, steps):
    seq = timesteps(500, steps, spacing)
    assert len(seq) == steps and seq[0] == 499 and all(a > b >= 0 for a, b in zip(seq, seq[1:], strict=False))
    if spacing == "quadratic" and steps > 1:
        assert seq[-1] == 0


def test_bad_sampler_settings():
    with pytest.raises(ConfigError, match="sampler.steps=0 must lie in 1..T=500"):
        timesteps(500, 0)
    with pytest.raises(ConfigError, match="sampler.spacing='log'"):
        timesteps(500, 10, "log")


@pytest.mark.parametrize(
    "sampler, kw", [(ddim, dict(steps=50)), (ddim, dict(steps=100, eta=1.0)), (dpm_solver, dict(steps=20))]
)
def test_fast_samplers_reproduce_a_gaussian_with_its_exact_predictor(sampler, kw):
    """Quadratic spacing ends at t = 1; uniform (trailing) spacing jumps from t = T/N to x_0 in one step, which
    shrinks a narrow distribution (std 0.05 comes out as 0.03 with DDIM at 50 steps): see bench/README.md."""
    s = build_schedule("linear", T=500)
    g = torch.Generator().manual_seed(0)
    x = sampler(exact_eps(s), s, torch.randn(40_000, 3, generator=g), g, spacing="quadratic", **kw)
    assert torch.allclose(x.mean(0), MEAN, atol=0.015)
    assert torch.allclose(x.std(0), STD, rtol=0.1)


@pytest.mark.parametrize("sampler, steps", [(ddim, 25), (dpm_solver, 12)])
def test_one_guided_forward_of_2B_per_step(sampler, steps):
    net = FakeNet()
    sampler(
        guided(net, torch.tensor([0, 1, 2]), 2.0, net.null_class),
        build_schedule("linear", T=100),
        torch.zeros(3, 2),
        steps=steps,
    )
    assert net.calls == [6] * steps


def test_sample_py_writes_grid_pngs_npz_and_strips(python, smoke_run, tmp_path):
    run_dir, root = smoke_run
    ckpt = f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"
    args = [ckpt, "n=6", "classes=[cat]", "sampler=ddim", "sampler.steps=10", "guidance.w=2", "seed=3"]
    p = sample(
        python,
        *args,
        f"out={tmp_path / 'a'}",
        "strips.reverse=true",
        "strips.forward=true",
        f"data.root={root}",
        "strips.frames=5",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    a = tmp_path / "a"
    npz = np.load(a / "samples.npz")
    assert npz["arr_0"].shape == (6, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [1] * 6 and npz["class_names"].tolist() == ["automobile", "cat"]
    assert sorted(f.name for f in (a / "images").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(a / "images" / "00004.png")), npz["arr_0"][4])
    assert Image.open(a / "reverse_diffusion.png").size == (2 + 5 * 34, 36)
    assert Image.open(a / "forward_diffusion.png").size == (2 + 5 * 34, 36)
    assert Image.open(a / "grid.png").size == (2 + 3 * 34, 2 + 2 * 34)
    assert sample(python, *args, f"out={tmp_path / 'b'}").returncode == 0
    assert np.array_equal(np.load(tmp_path / "b" / "samples.npz")["arr_0"], npz["arr_0"])  # same seed, same images


def test_sample_py_npz_and_png_folder_are_scored_by_evaluate_py_as_any_images(
    python, smoke_run, detector_file, tmp_path
):
    """The round trip: sample.py's samples.npz (with labels) and its images/ folder (without) go into one
    evaluate.py -m images=... sweep, which writes a checkpoint evaluation's results.json for each, and the summary."""
    run_dir, root = smoke_run
    ckpt = f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"
    assert sample(python, ckpt, "n=6", "classes=[cat]", "sampler.steps=3", f"out={tmp_path / 'a'}").returncode == 0
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [python, str(ROOT / "evaluate.py"), "-m", f"images={tmp_path / 'a' / 'samples.npz'},{tmp_path / 'a' / 'images'}",
         "data=cars", "data.classes=[automobile,cat]", f"data.root={root}", f"metrics.inception_weights={detector_file}",
         f"metrics.cache_dir={tmp_path / 'cache'}", "logger=csv", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {Path(r["images"]).name: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    labelled, folder = rows["samples.npz"], rows["images"]
    for r in (labelled, folder):
        assert {"fid_ci95", "kid_ci95", "kid_floor", "memorized_floor", "nn_ratio_median", "key"} <= set(r)
        assert r["model"] == "images" and r["num_samples"] == 6 and r["fid"] > 0
        assert r["fid_floor"] > 0 and 0 <= r["memorized"] <= 1 and r["memorized_ci95"][1] > 0
    assert labelled["fid"] == pytest.approx(folder["fid"], rel=1e-5)  # the same pixels, through PNG and npz
    assert 0 <= labelled["class_acc"] <= 1 and folder.get("class_acc") is None  # labels: only the npz has them
    assert "| None |" in (sweep / "summary.md").read_text() and (sweep / "summary.csv").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["classes=[horse]"],
            "error: classes ['horse'] are not in this checkpoint's subset; choose from automobile, cat",
        ),
        pytest.param(  # 8 s: test_schema checks the ranges in process
            ["sampler.steps=0"],
            "error: sampler.steps=0 must be >= 1; set sampler.steps to a value >= 1",
            marks=pytest.mark.slow,
        ),
        pytest.param(  # T is the checkpoint's: checked when it is loaded (8 s: slow)
            ["sampler.steps=600"],
            "error: sampler.steps=600 must lie in 1..T=500",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_sample_py_bad_input(python, smoke_run, tmp_path, args, message):
    run_dir, _ = smoke_run
    p = sample(python, f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "n=2", f"out={tmp_path / 'o'}", *args)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == message


def test_a_checkpoint_samples_with_the_speed_settings_of_this_machine(smoke_run):
    """evaluate.py and sample.py pass conf/speed/: they replace the settings the checkpoint was trained with."""
    from ddpm_lightning.module import load_checkpoint

    path = str(smoke_run[0] / "checkpoints" / "last.ckpt")
    plain = load_checkpoint(path, "cpu", compile=False, channels_last=False, bf16_sampling=False)
    fast = load_checkpoint(path, "cpu", compile=False, channels_last=True, bf16_sampling=True)
    assert not plain.hparams.speed["bf16_sampling"] and fast.hparams.speed["bf16_sampling"]
    assert fast.net.outc.weight.is_contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1])
    a, b = (m.sample(labels=labels, generator=torch.Generator().manual_seed(0)) for m in (plain, fast))
    assert a.shape == b.shape and not torch.equal(a, b)  # bf16 autocast did run
    assert (
        a.float() - b.float()
    ).abs().mean() < 2  # and the same images but for rounding (0.34 levels of 255 measured)
