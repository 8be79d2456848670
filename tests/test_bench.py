"""Every benchmark still runs: --help, and a tiny CPU run that prints its JSON (slow suite)."""

import json
import subprocess

import pytest
from conftest import ROOT, make_cifar

BENCH = ROOT / "bench"
TINY = {  # each benchmark at the smallest size that runs all of its cases
    "train_throughput.py": ["--width", "4", "--batch", "8", "--steps", "2", "--warmup", "1"],
    "sample_throughput.py": ["--width", "4", "--batch", "4", "--steps", "2", "--repeats", "1"],
    "fid_throughput.py": ["--n", "4", "--batch", "4"],
    "eval_throughput.py": ["--n", "8", "--batch", "4", "--width", "4", "--steps", "2"],
    "real_training.py": ["--width", "4", "--batch", "8", "--epochs", "0.5"],
    "speed_equivalence.py": ["--steps", "2", "--width", "4", "--batch", "4"],
    "sampler_accuracy.py": ["--n", "200", "--T", "50"],
    "sampler_overhead.py": ["--repeats", "1", "--batch", "2"],
    "step_cost.py": ["--batch", "2", "--steps", "1", "--rounds", "1", "--wide", "8", "--wide-batch", "2"],
    "width_cost.py": ["--batch", "2", "--steps", "1", "--rounds", "1"],
    "memorization_cost.py": ["--n", "8", "--train", "50", "--inception-images", "4", "--rounds", "1"],
}


def test_every_benchmark_has_a_tiny_run():
    assert sorted(TINY) == sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_a_benchmark_runs_tiny_and_reports(python, tmp_path, script):
    args = TINY[script]
    if script == "real_training.py":
        args = [*args, "--data", str(make_cifar(tmp_path / "cifar", n_train=40))]
    help_ = subprocess.run([python, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--out" in help_.stdout, help_.stderr[-2000:]
    out = tmp_path / "result.json"
    p = subprocess.run(
        [python, str(BENCH / script), *args, "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=BENCH
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == script.removesuffix(".py") and "device" in result
