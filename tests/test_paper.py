"""make paper end to end at smoke size (generated data, a random detector), its rerun, the report, the notebook and
the W&B dashboard spec against what the runs really logged."""

import json
import os
import subprocess

import pytest
from conftest import ROOT, make_cifar, wandb_run


def paper(python, root, detector, cache, out, *extra):
    args = [
        "experiment=paper_smoke",
        f"data.root={root}",
        f"metrics.inception_weights={detector}",
        f"metrics.cache_dir={cache}",
        f"paper.dir={out}",
        "paper.models=[improved]",
        "paper.data=[cars]",
        "paper.guidance_ws=[0,1]",
        "metrics.num_samples=10",
        *extra,
    ]
    return subprocess.run(
        [python, str(ROOT / "paper.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, python, detector_file):
    """The pipeline, run twice: the first run's dir and the second run's output."""
    tmp = tmp_path_factory.mktemp("paper")
    root = make_cifar(tmp / "cifar")
    first = paper(python, root, detector_file, tmp / "cache", tmp / "runs")
    assert first.returncode == 0, first.stderr[-3000:]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*") if p.suffix in (".ckpt", ".json", ".pt")}
    second = paper(python, root, detector_file, tmp / "cache", tmp / "runs")
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp / "runs", stamps, second


@pytest.mark.slow  # the make-paper pipeline twice: 104 s of setup; the report's functions are tested below
def test_all_three_stages_write_their_results(paper_run):
    runs, _, _ = paper_run
    assert json.loads((runs / "train" / "improved_cars" / "done.json").read_text())["max_epochs"] == 2
    assert (runs / "samples" / "improved_cars" / "grid.png").is_file() and (
        runs / "samples" / "improved_cars" / "reverse_diffusion.png"
    ).is_file()
    sweep = [json.loads(p.read_text()) for p in sorted((runs / "eval" / "improved_cars").glob("*/results.json"))]
    assert [r["w"] for r in sweep] == [0.0, 1.0] and {r["seed"] for r in sweep} == {1}  # scored with paper.eval_seed
    floor = json.loads((runs / "eval" / "floor_cars" / "real" / "results.json").read_text())
    assert floor["sampler"] == "real test images" and floor["num_samples"] == 10
    report = runs / "report"
    expected = [
        "fig01_forward_diffusion.png",
        "fig07_reverse_improved_cars.png",
        "fig09_fid_over_epochs.png",
        "fig10_is_over_epochs.png",
        "fig11_fid_vs_w.png",
        "fig12_is_vs_w.png",
        "fig13_loss.png",
        "fig14_loss_from_epoch_1.png",
        "samples_improved_cars.png",
        "results.md",
        "results.json",
    ]
    assert all((report / f).is_file() for f in expected), sorted(p.name for p in report.iterdir())
    table = (report / "results.md").read_text()
    assert "| improved | cars |" in table and "Guidance sweep, improved_cars" in table and "Wall time" in table
    beyond = [
        "kid_mean_over_epochs.png",
        "memorized_over_epochs.png",
        "kid_mean_vs_w.png",
        "memorized_vs_w.png",
    ]  # one class: no probe
    assert all((report / f).is_file() for f in beyond) and not (report / "class_acc_over_epochs.png").exists()
    assert (
        len(list(report.glob("nearest_improved_cars_w*.png"))) == 2
    )  # each w's samples beside their nearest training images
    assert "| memorized | " in table and "| KID x1e3 | " in table
    summary = json.loads((report / "results.json").read_text())["summary"]
    improved = next(r for r in summary["rows"] if r["name"] == "improved_cars")
    assert improved["first_epochs"] == 1 and improved["last_epochs"] == 2 and improved["best_w"] in (0.0, 1.0)
    assert improved["first_step"] >= 1 and improved["last_step"] == 2 * improved["first_step"]  # steps, 1-based
    pair = summary["noise"]["pairs"]["improved_cars"]  # the final model at its trained w (1), scored with two seeds
    assert pair["training"] == improved["last_fid"] and pair["again"] == sweep[1]["fid"] and summary["noise"]["sd"] > 0


@pytest.mark.slow  # the make-paper pipeline twice: 104 s of setup; the report's functions are tested below
def test_a_second_run_repeats_no_work(paper_run):
    runs, stamps, second = paper_run
    changed = [str(p) for p, t in stamps.items() if p.stat().st_mtime_ns != t and "report" not in p.parts]
    assert not changed, changed  # no checkpoint, evaluation or feature file was written again
    log = [json.loads(line) for line in (runs / "paper_log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log] == 2 * [
        "train",
        "eval improved_cars",
        "floor cars",
        "samples improved_cars",
        "report",
    ]
    assert (
        all(e["returncode"] == 0 for e in log) and [e["skipped"] for e in log].count(True) == 1
    )  # the second samples stage
    assert log[5]["seconds"] < log[0]["seconds"]
    assert "nothing to do" in (runs / "train" / "improved_cars" / "train.log").read_text()


@pytest.mark.parametrize(
    "bad, says",
    [
        ("model=improved", "paper.models=[simple,improved]"),
        pytest.param("paper.models=[fancy]", "paper.models=fancy", marks=pytest.mark.slow),
        pytest.param("paper.data=[]", "paper.data=[]", marks=pytest.mark.slow),  # 8 s each: test_schema has the rest
        pytest.param("paper.guidance_ws=[a,1]", "paper.guidance_ws=", marks=pytest.mark.slow),
        pytest.param("paper.samples=0", "paper.samples=0", marks=pytest.mark.slow),
        pytest.param("paper.nope=1", "paper.nope", marks=pytest.mark.slow),
    ],
)
def test_bad_paper_settings_are_one_line_before_anything_runs(python, tmp_path, bad, says):
    p = subprocess.run(
        [python, str(ROOT / "paper.py"), bad, f"paper.dir={tmp_path / 'x'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and says in p.stderr, (
        p.stderr
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the make-paper pipeline twice: 104 s of setup; the report's functions are tested below
def test_notebook_draws_the_same_figures(paper_run):
    import nbclient
    import nbformat

    runs, _, _ = paper_run
    nb = nbformat.read(ROOT / "notebooks" / "paper_figures.ipynb", as_version=4)
    os.environ["PAPER_RUNS"] = str(runs)
    try:
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
        ).execute()
    finally:
        del os.environ["PAPER_RUNS"]
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 6 + 3  # Fig. 9-14, the sample grid and the two strips


@pytest.mark.slow  # the make-paper pipeline twice: 104 s of setup; the report's functions are tested below
def test_wandb_runs_log_what_the_dashboard_plots(paper_run):
    from ddpm_lightning.dashboard import paper_report, paper_workspace, spec

    runs, _, _ = paper_run
    train = wandb_run(runs / "train" / "improved_cars")
    assert train["job_type"] == "train" and train["group"] == "runs"
    assert {"name": "val/*", "step_metric": "epoch", "min": False, "last": False} in train["metrics"]
    assert {"name": "val/fid*", "step_metric": "epoch", "min": True, "last": True} in train[
        "metrics"
    ]  # best and last FID
    sweep = wandb_run(runs / "eval" / "improved_cars" / "w0")
    assert (
        sweep["job_type"] == "eval"
        and sweep["config"]["guidance_w"] == 0.0
        and sweep["config"]["train_run"] == "improved_cars"
    )
    assert "samples" in {k.split("/")[0] for k in sweep["logged"]}  # the wandb.Table of image, class and w

    report = json.dumps(spec(paper_report("me", "ddpm-lightning", "runs")))
    workspace = json.dumps(spec(paper_workspace("me", "ddpm-lightning", "runs")))
    for text in (report, workspace):
        for metric in ("val/fid", "val/is_mean", "train/loss_epoch"):
            assert f'"metrics": ["{metric}"]' in text and metric in train["logged"], metric
        assert '"xAxis": "epoch"' in text  # Fig. 9, 10, 13, 14 against the epoch
        assert '"xAxis": "config:guidance_w.value", "yAxis": "summary:fid"' in text  # Fig. 11: summary FID against w
    assert (
        '"name": "jobType"}, "op": "=", "value": "train"' in report
        and '"name": "group"}, "op": "=", "value": "runs"' in report
    )
    assert (
        '"name": "jobType"}, "op": "=", "value": "eval"' in report and "train_run" in report
    )  # sweeps grouped per model
    results = json.loads((runs / "eval" / "improved_cars" / "w1" / "results.json").read_text())
    assert {"fid", "is_mean", "w"} <= set(results)


@pytest.mark.slow  # the make-paper pipeline twice: 104 s of setup; the report's functions are tested below
def test_publishing_without_a_login_fails_in_one_line(python, paper_run, tmp_path):
    runs, _, _ = paper_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "HOME": str(tmp_path),
        "WANDB_MODE": "offline",
    }
    p = subprocess.run(
        [python, str(ROOT / "report.py"), f"runs={runs}", f"out={tmp_path / 'r'}", "publish=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "wandb login" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "results.md").exists()


def test_make_paper_takes_the_slurm_launcher_for_every_multirun():
    from ddpm_lightning.paper import plan

    _, stages = plan(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "hydra.launcher.partition=gpu"])
    commands = {name: command for name, command in stages}
    train = commands["train"]
    assert "-m" in train and {
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
    } <= set(train)
    for name, command in commands.items():
        if name.startswith(("eval", "floor")):  # one-GPU evaluation jobs on the same partition
            assert {"-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"} <= set(
                command
            ) and "trainer.devices=4" not in command


def test_the_samples_stage_draws_with_the_sampler_the_run_scores_with():
    from ddpm_lightning.paper import plan

    _, stages = plan(["experiment=five_class_cpu"])
    samples = dict(stages)["samples improved_five_class"]
    assert {"sampler=ddim", "sampler.steps=50", "sampler.eta=1.0", "sampler.spacing=quadratic"} <= set(samples)
    _, stages = plan([])
    assert {"sampler=ancestral", "sampler.variance=beta"} <= set(dict(stages)["samples improved_cars"])


def test_the_report_draws_one_grid_per_class_and_the_class_agreement_of_a_sweep(tmp_path):
    import numpy as np

    from ddpm_lightning import report

    images = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images, labels=np.arange(10) % 2, class_names=np.array(["cat", "ship"]))
    written = report.class_grids(tmp_path / "samples.npz", tmp_path, "improved_x")
    assert [p.name for p in written] == ["samples_improved_x_cat.png", "samples_improved_x_ship.png"]
    rows = [
        {
            "w": w,
            "fid": 50.0 - w,
            "is_mean": None,
            "num_samples": 10,
            "sampler": "ddim",
            "steps": 3,
            "seed": 1,
            "class_acc": 0.5 + w / 10,
            "class_acc_ci95": [0.4 + w / 10, 0.6 + w / 10],
            "memorized": 0.0,
        }
        for w in (0.0, 1.0)
    ]
    run = {
        "model": "improved",
        "classes": ["cat", "ship"],
        "evals": [],
        "epoch_loss": [],
        "guidance_w": 1.0,
        "num_samples": 10,
    }
    results = {
        "train": {"improved_x": run},
        "sweeps": {"improved_x": rows},
        "floors": {"cat+ship": {"fid": 10.0, "class_acc": 0.9, "num_samples": 10}},
        "log": [],
        "runs": str(tmp_path),
    }
    table = report.table(results)
    assert (
        "| class agreement | 0.500 [0.400, 0.600] | 0.600 [0.500, 0.700] |" in table
        and "| memorized | 0.000 | 0.000 |" in table
    )
    fig = report.fig_metric_vs_w(results, "class_acc")
    assert (
        fig.axes[0].get_ylabel() == "class agreement (linear probe)" and len(fig.axes[0].lines) >= 2
    )  # the sweep and the floor
