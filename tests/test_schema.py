"""The settings' schema: every key typed and checked when the config is composed, sweeps checked value by value,
one line and exit 2 for every bad input, --help and the README's tables made from the schema."""

import re
import subprocess
import typing

import pytest
from conftest import ROOT

from ddpm_lightning import schema
from ddpm_lightning.cli import preflight

ENTRIES = {"config": "train.py", "evaluate": "evaluate.py", "sample": "sample.py", "report": "report.py"}


@pytest.fixture
def files(tmp_path):
    """A checkpoint-like file that must stay unchanged, a runs dir, a weights file; and the run dir that must stay absent."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a checkpoint")
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.pt").write_bytes(b"weights")
    return {
        "ckpt": ckpt,
        "runs": tmp_path / "runs",
        "weights": tmp_path / "weights.pt",
        "out": tmp_path / "out",
        "tmp": tmp_path,
    }


def required(entry: str, files) -> list[str]:
    return {
        "config": [],
        "evaluate": [f"ckpt={files['ckpt']}"],
        "sample": [f"ckpt={files['ckpt']}"],
        "report": [f"runs={files['runs']}"],
    }[entry]


def refused(entry: str, args: list[str], files, capsys) -> str:
    """preflight of ``entry`` with ``args``: exit code 2, one line on stderr, nothing written; the line."""
    run_dir = ["hydra.sweep.dir" if "-m" in args else "hydra.run.dir"]
    with pytest.raises(SystemExit) as e:
        preflight(entry, [*args, *required(entry, files), f"{run_dir[0]}={files['out']}"])
    err = capsys.readouterr().err
    assert e.value.code == 2, (args, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert not files["out"].exists() and files["ckpt"].read_bytes() == b"a checkpoint"
    return lines[0]


def wrong_value(tp) -> str | None:
    """A value of the wrong type for a schema type, or None for Any (checked by schema.check's rules instead)."""
    if tp is typing.Any:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        return wrong_value(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin in (list, typing.List):
        return "abc"
    return {int: "abc", float: "abc", bool: "maybe", str: "[1,2]"}.get(tp)


def typed_keys():
    for entry in ENTRIES:
        cfg = schema.compose(entry) if entry == "config" else None
        yield from (
            (entry, key, f.type) for key, f in schema.leaves(schema.ENTRY_POINTS[entry], cfg) if wrong_value(f.type)
        )


def test_every_typed_key_refuses_a_value_of_the_wrong_type(files, capsys):
    cases = list(typed_keys())
    assert len(cases) >= 80, len(cases)
    for entry, key, tp in cases:
        line = refused(entry, [f"{key}={wrong_value(tp)}"], files, capsys)
        assert key in line, (entry, key, line)


def test_unknown_keys_are_refused_in_every_entry_point(files, capsys):
    for entry in ENTRIES:
        assert "nope is not a setting" in refused(entry, ["+nope=1"], files, capsys)
    assert "trainer.foo is not a setting" in refused("config", ["trainer.foo=1"], files, capsys)
    assert "trainer.foo is not a setting" in refused("config", ["+trainer.foo=1"], files, capsys)


BAD = [  # (entry point, arguments, what the line says)
    ("config", ["guidance.w=abc"], "guidance.w=abc must be a number >= -1"),
    ("config", ["guidance.w=-2"], "guidance.w=-2 must be a number >= -1"),
    ("config", ["model=improved", "guidance.w=[0,x]"], "guidance.w=[0, 'x'] must be a number >= -1"),
    ("config", ["trainer.devices=0"], "trainer.devices=0 must be a whole number >= 1 or auto"),
    ("config", ["trainer.devices=1.5"], "trainer.devices=1.5 must be a whole number >= 1 or auto"),
    ("config", ["trainer.devices=many"], "trainer.devices=many must be a whole number >= 1 or auto"),
    ("config", ["trainer.precision=8-bit"], "trainer.precision=8-bit is not one of 32-true"),
    ("config", ["trainer.accelerator=quantum"], "trainer.accelerator=quantum is not one of auto, cpu"),
    ("config", ["trainer.max_epochs=0"], "trainer.max_epochs=0 must be >= 1"),
    (
        "config",
        ["recipe.grad_clip=1.0", "trainer.precision=16-mixed"],
        "gradient clipping at 1.0 with trainer.precision=16-mixed would clip the grad scaler's scaled gradients",
    ),
    ("config", ["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0 must be >= 1"),
    (
        "config",
        ["trainer.limit_val_batches=0"],
        "trainer.limit_val_batches=0 must be a fraction in (0, 1] or a whole count > 1",
    ),
    ("config", ["trainer.limit_val_batches=2.5"], "trainer.limit_val_batches=2.5 must be a fraction"),
    ("config", ["trainer.max_time=tomorrow"], "trainer.max_time=tomorrow must be DD:HH:MM:SS"),
    ("config", ["trainer.max_nonfinite=0"], "trainer.max_nonfinite=0 must be >= 1"),
    ("config", ["model.lr=-1"], "model.lr=-1.0 must be > 0; set model.lr to a value > 0"),
    ("config", ["model.lr=0"], "model.lr=0.0 must be > 0"),
    ("config", ["model.lr=inf"], "model.lr=inf must be a finite number"),
    ("config", ["model=improved", "guidance.w=nan"], "guidance.w=nan must be a finite number"),
    (
        "config",
        ["sampler.steps=10"],
        "sampler.steps is not a setting of this sampler (another sampler=... may have it)",
    ),
    ("config", ["seed=1e3"], "seed=1e3: Value '1000.0' of type 'float' could not be converted to Integer"),
    ("config", ["callbacks.ema.decay=1"], "callbacks.ema.decay=1.0 must be in (0, 1)"),
    ("config", ["callbacks.ema.decay=0"], "callbacks.ema.decay=0.0 must be in (0, 1)"),
    ("config", ["callbacks.fid.every_n_epochs=-1"], "callbacks.fid.every_n_epochs=-1 must be >= 0"),
    (
        "config",
        ["callbacks.fid.every_n_epochs=15"],
        "callbacks.fid.every_n_epochs=15 must be a multiple of trainer.check_val_every_n_epoch=10",
    ),
    ("config", ["callbacks.progress.refresh_rate=0"], "callbacks.progress.refresh_rate=0 must be >= 1"),
    ("config", ["callbacks.sample_grid.n_per_class=0"], "callbacks.sample_grid.n_per_class=0 must be >= 1"),
    ("config", ["guidance.p_uncond=1.5"], "guidance.p_uncond=1.5 must be in [0, 1]"),
    ("config", ["model=simple", "guidance.w=2"], "guidance (w=2, p_uncond=0.0) given to the unconditional model"),
    ("config", ["schedule.T=0"], "schedule.T=0 must be >= 1"),
    ("config", ["schedule.beta_T=1.5"], "schedule.beta_T=1.5 must be in (0, 1)"),
    (
        "config",
        ["schedule.beta_1=0.02", "schedule.beta_T=0.001"],
        "schedule.beta_T=0.001 < schedule.beta_1=0.02: betas must not decrease",
    ),
    (
        "config",
        ["schedule.kind=cosine"],
        "schedule.beta_1 is not a setting of schedule.kind=cosine; choose it with schedule=cosine",
    ),
    ("config", ["schedule=cosine", "schedule.kind=zigzag"], "schedule.kind=zigzag is not one of linear, cosine"),
    ("config", ["sampler=ddim", "sampler.steps=0"], "sampler.steps=0 must be >= 1"),
    ("config", ["sampler=ddim", "sampler.steps=600"], "sampler.steps=600 must be at most schedule.T=500"),
    ("config", ["sampler=ddim", "sampler.eta=2"], "sampler.eta=2.0 must be in [0, 1]"),
    ("config", ["sampler=ddim", "sampler.spacing=random"], "sampler.spacing=random is not one of uniform, quadratic"),
    ("config", ["sampler.variance=huge"], "sampler.variance=huge is not one of beta, posterior"),
    ("config", ["sampler=fancy"], "Could not find 'sampler/fancy'"),
    ("config", ["net.width=0"], "net.width=0 must be >= 1"),
    ("config", ["net.heads=3"], "net.heads=3 must divide net.width=64"),
    ("config", ["net.emb_dim=7"], "net.emb_dim=7 must be an even number >= 2"),
    (
        "config",
        ["data.classes=[car]"],
        "data.classes=['car'] must be a non-empty list of distinct CIFAR-10 classes; choose from airplane, automobile",
    ),
    ("config", ["data.classes=[]"], "data.classes=[] must be a non-empty list"),
    ("config", ["data.classes=[cat,cat]"], "data.classes=['cat', 'cat'] must be a non-empty list of distinct"),
    ("config", ["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    ("config", ["data.max_images=0"], "data.max_images=0 must be >= 2"),
    ("config", ["data.max_images=2", "data.batch_size=64"], "data.batch_size=64 is larger than the 2 training images"),
    ("config", ["metrics.num_samples=1"], "metrics.num_samples=1 must be >= 2"),
    ("config", ["metrics.bootstrap=5"], "metrics.bootstrap=5 must be 0 (no intervals) or >= 10 resamples"),
    ("config", ["metrics.kid_subset_size=1"], "metrics.kid_subset_size=1 must be >= 2"),
    ("config", ["metrics.reference_split=val"], "metrics.reference_split=val is not one of train, test"),
    (
        "config",
        ["metrics.inception_weights=/nonexistent.pth"],
        "metrics.inception_weights=/nonexistent.pth does not exist",
    ),
    ("config", ["paper.models=[fancy]"], "paper.models=fancy is not one of simple, improved"),
    ("config", ["paper.guidance_ws=[]"], "paper.guidance_ws=[] must be a non-empty list of weights >= -1"),
    ("config", ["paper.samples=0"], "paper.samples=0 must be >= 1"),
    ("config", ["logger.wandb.project= "], "logger.wandb.project"),
    ("config", ["seed=-1"], "seed=-1 must be >= 0"),
    (
        "config",
        ["-m", "model.lr=1e-3,-1"],
        "model.lr=-1.0 must be > 0; set model.lr to a value > 0 [in the sweep job model.lr=-1]",
    ),
    (
        "config",
        ["-m", "trainer.devices=1,0", "model=simple,improved"],
        "trainer.devices=0 must be a whole number >= 1 or auto",
    ),
    ("config", ["-m", "data=cars,five_class,nope"], "Could not find 'data/nope'"),
    ("evaluate", ["guidance.w=abc"], "guidance.w=abc must be a number >= -1"),
    (
        "evaluate",
        ["guidance.w=[1,2]"],
        "guidance.w=[1, 2] must be a number >= -1 (w = -1 is the unconditional model); for example guidance.w=2",
    ),
    ("evaluate", ["metrics.num_samples=0"], "metrics.num_samples=0 must be >= 2"),
    ("evaluate", ["device=gpu7"], "device=gpu7 must be auto, cpu, cuda, cuda:N or mps"),
    ("evaluate", ["ema_length=0.5"], "ema_length=0.5 must be in (0, 0.2887)"),
    ("sample", ["ema_length=0"], "ema_length=0.0 must be in (0, 0.2887)"),
    ("config", ["callbacks.posthoc_ema.sigma_rels=[0.05,0.05]"], "must be distinct lengths in (0, 0.2887)"),
    ("config", ["recipe.timestep_width=0"], "recipe.timestep_width=0.0 must be > 0"),
    ("config", ["recipe.timesteps=normal"], "recipe.timesteps=normal is not one of uniform, laplace"),
    ("config", ["speed.profile=tpu"], "speed.profile=tpu is not one of auto, gpu, cpu"),
    ("evaluate", ["sampler=ddim", "sampler.steps=0"], "sampler.steps=0 must be >= 1"),
    ("evaluate", ["-m", "guidance.w=0,1,bad"], "guidance.w=bad must be a number >= -1"),
    (
        "evaluate",
        ["images=README.md"],
        "evaluate.py scores a checkpoint or a set of images: pass ckpt=PATH, or images=",
    ),
    (
        "evaluate",
        ["metrics.reference_split=test"],
        "puts every test image in the reference and leaves none for the floor",
    ),
    (
        "config",
        ["metrics.reference_split=test"],
        "puts every test image in the reference and leaves none for the floor",
    ),
    (
        "config",
        ["data.max_images=1"],
        "data.max_images=1 must be >= 2 (or null: all); set data.max_images to 2 or more",
    ),
    (
        "evaluate",
        ["metrics.prc=true", "metrics.num_samples=3"],
        "metrics.prc=true needs metrics.num_samples >= 4, not 3",
    ),
    ("evaluate", ["sampler.steps=10"], "sampler.steps needs the sampler named: add sampler=ancestral|ddim|dpm_solver"),
    ("sample", ["n=0"], "n=0 must be >= 1"),
    ("sample", ["batch_size=0"], "batch_size=0 must be >= 1"),
    ("sample", ["strips.frames=1"], "strips.frames=1 must be >= 2"),
    ("sample", ["classes=[]"], "classes=[] must be a non-empty list"),
    ("sample", ["seed=-3"], "seed=-3 must be >= 0"),
    ("report", ["loss_from_epoch=-1"], "loss_from_epoch=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("entry, args, says", BAD, ids=[f"{e}:{' '.join(a)}" for e, a, _ in BAD])
def test_bad_values_are_one_line_exit_2_and_write_nothing(files, capsys, entry, args, says):
    assert says in refused(entry, args, files, capsys)


@pytest.mark.parametrize(
    "entry, args, says",
    [
        ("evaluate", ["ckpt=/nonexistent.ckpt"], "checkpoint ckpt=/nonexistent.ckpt does not exist"),
        ("sample", ["ckpt=/nonexistent.ckpt"], "checkpoint ckpt=/nonexistent.ckpt does not exist"),
        ("report", ["runs=/nonexistent"], "runs=/nonexistent is not a folder"),
        ("evaluate", ["images=/nonexistent.npz", "data=cars"], "images=/nonexistent.npz does not exist"),
        ("evaluate", [f"images={ROOT / 'README.md'}"], "needs the subset it is scored against: add data=cars|"),
        ("evaluate", [f"images={ROOT / 'README.md'}", "data=cars", "guidance.w=0"], "guidance.w is a setting of a"),
        ("evaluate", [], "evaluate.py scores a checkpoint or a set of images"),
    ],
)
def test_missing_files_are_refused_before_anything_runs(files, capsys, entry, args, says):
    with pytest.raises(SystemExit) as e:
        preflight(entry, [*args, f"hydra.run.dir={files['out']}"])
    assert e.value.code == 2 and says in capsys.readouterr().err and not files["out"].exists()


def test_the_bad_value_table_is_large_and_covers_every_entry_point():
    assert len(BAD) >= 40 and {e for e, _, _ in BAD} == set(ENTRIES) and sum("-m" in a for _, a, _ in BAD) >= 4


def test_a_sweep_with_a_bad_second_value_starts_no_job(python, tmp_path):
    p = subprocess.run(
        [
            python,
            str(ROOT / "train.py"),
            "-m",
            "experiment=smoke",
            "model.lr=1e-3,-1",
            f"hydra.sweep.dir={tmp_path / 's'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: model.lr=-1.0 must be > 0; set model.lr to a value > 0 [in the sweep job model.lr=-1]"
    ]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_help_lists_every_key_with_type_default_and_description(entry, capsys):
    with pytest.raises(SystemExit) as e:
        preflight(entry, ["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for key, f in schema.leaves(schema.ENTRY_POINTS[entry], schema.compose(entry)):
        line = next((line for line in lines if line.startswith(key + " ")), None)
        assert line is not None and f.metadata["help"] in line and schema._type_name(f.type) in line, (key, line)


def test_train_py_help_from_the_command_line(python):
    p = subprocess.run([python, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, timeout=300)
    assert (
        p.returncode == 0 and "model.lr" in p.stdout and "float" in p.stdout and "Adam's learning rate" in p.stdout
    ), p.stderr[-2000:]


def test_the_settings_tables_in_docs_are_the_schema():
    doc = (ROOT / "docs" / "settings.md").read_text()
    for entry, script in ENTRIES.items():
        table = schema.settings_table(entry)
        assert table in doc, (
            f"docs/settings.md's table of {script} differs from the schema; run .venv/bin/python scripts/settings_tables.py"
        )
    assert len(re.findall(r"^\| `", doc, flags=re.M)) >= 100
    assert "docs/settings.md" in (ROOT / "README.md").read_text()


@pytest.mark.slow  # 16 s; startup()'s one line is also met by test_bad_inputs and test_files in the default suite
def test_a_library_error_while_building_is_one_line_and_hydra_full_error_shows_the_traceback(python, tmp_path):
    from conftest import make_cifar

    root = make_cifar(tmp_path / "cifar")
    cmd = [
        python,
        str(ROOT / "train.py"),
        "experiment=smoke",
        f"data.root={root}",
        "data.batch_size=4",
        "logger=csv",
        "trainer.accelerator=gpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: building the run failed: MisconfigurationException:")
    assert "(check trainer.accelerator)" in p.stderr and not (tmp_path / "run" / "checkpoints").exists()
    import os

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "MisconfigurationException" in p.stderr
