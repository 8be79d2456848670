"""lightning.Trainer's own arguments as trainer.* settings: each is typed or refused in one line, and the ones that
touch this project's machinery (steps, accumulation, mid-epoch validation, clipping) work with it."""

import inspect
import json
import signal
import subprocess

import lightning as L
import pytest
import torch
from conftest import ROOT
from test_schema import files, refused  # noqa: F401 (the fixture)
from test_train import train

from ddpm_lightning import schema

TINY = ["net.width=4", "net.emb_dim=16", "net.heads=2", "net.attention=[4]", "logger=csv"]


def tiny_args(root, run_dir, *extra):
    return [
        "experiment=smoke",
        f"data.root={root}",
        "data.classes=[automobile,cat]",
        "data.max_images=null",
        "data.batch_size=4",
        *TINY,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_every_trainer_argument_is_a_setting_or_refused_with_a_reason():
    arguments = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    settings = {key.removeprefix("trainer.") for key, _ in schema.leaves(schema.TrainerConfig, None, "trainer.")}
    assert arguments - set(schema.TRAINER_REFUSED) <= settings
    assert set(schema.TRAINER_REFUSED) <= arguments  # no reason kept for an argument Lightning dropped
    assert settings - arguments == set(schema.OURS)
    cfg = schema.compose(
        "config",
        [
            "trainer.detect_anomaly=true",
            "trainer.profiler=simple",
            "trainer.num_sanity_val_steps=0",
            "trainer.overfit_batches=2",
            "trainer.limit_train_batches=0.5",
        ],
    )
    schema.check(cfg, "config")
    assert (
        cfg.trainer.detect_anomaly is True
        and cfg.trainer.profiler == "simple"
        and cfg.trainer.limit_train_batches == 0.5
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.logger=false",
            "error: trainer.logger is an argument of lightning.Trainer that is not a setting here: train.py builds "
            "the loggers: choose them with logger=wandb or logger=csv",
        ),
        ("trainer.accumulate_grad_batches=0", "error: trainer.accumulate_grad_batches=0 must be >= 1"),
        ("trainer.detect_anomaly=maybe", "error: trainer.detect_anomaly=maybe"),
        ("trainer.limit_train_batches=1.5", "error: trainer.limit_train_batches=1.5 must be a fraction in (0, 1]"),
    ],
)
def test_bad_trainer_settings_are_one_line(override, message, files, capsys):  # noqa: F811
    assert refused("config", [override], files, capsys).startswith(message)


def test_recipe_grad_clip_and_trainer_gradient_clip_val_are_one_setting(tmp_path):
    with pytest.raises(schema.ConfigError, match="are the same setting with two values; give one of them"):
        schema.check(schema.compose("config", ["recipe.grad_clip=1.0", "trainer.gradient_clip_val=2.0"]), "config")
    from ddpm_lightning import train as train_module

    seen = {}

    class Stop(Exception):
        pass

    def trainer(**kwargs):
        seen.update(kwargs)
        raise Stop

    cfg = schema.compose("config", ["experiment=smoke", "trainer.gradient_clip_val=0.5", "logger=csv"])
    assert cfg.recipe.grad_clip is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module.L, "Trainer", trainer)
        mp.setattr(
            train_module,
            "CIFARDataModule",
            lambda **kw: type("D", (), {"setup": lambda s, stage: None, "classes": ["cat"]})(),
        )
        with pytest.raises(schema.ConfigError, match="Stop"):  # the Trainer was reached, with its arguments
            train_module.fit(cfg, tmp_path, 0.0)
    assert seen["gradient_clip_val"] == 0.5 and seen["gradient_clip_algorithm"] == "norm"


def test_max_steps_limit_train_batches_and_accumulation_in_a_smoke_run(python, cifar_root, tmp_path):
    """trainer.max_steps=30 stops at optimizer step 30, with 5 batches an epoch and 2 batches per update: 12 epochs
    (the last one cut short), one EMA update per optimizer step, done.json with the steps; a rerun has nothing to do."""
    run_dir = tmp_path / "run"
    args = tiny_args(
        cifar_root,
        run_dir,
        "trainer.max_steps=30",
        "trainer.limit_train_batches=5",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_epochs=100",
        "trainer.check_val_every_n_epoch=5",
    )
    p = train(python, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    done = json.loads((run_dir / "done.json").read_text())
    assert ckpt["global_step"] == done["global_step"] == 30 and done["max_steps"] == 30
    assert int(ckpt["averaging_state"]["n_averaged"]) == 30  # one EMA update per optimizer step
    out = p.stdout + p.stderr
    left = int(out.split(" steps left")[0].rsplit("the ", 1)[1])  # the ETA counts optimizer steps up to max_steps
    assert "s per optimizer step" in out and 20 <= left <= 25, out[-2000:]
    again = train(python, *args)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


def test_validation_within_epochs_draws_a_grid_per_validation_and_fid_once_an_epoch(python, cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    p = train(
        python,
        *tiny_args(
            cifar_root,
            run_dir,
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "trainer.val_check_interval=2",
            "trainer.limit_train_batches=4",
            "trainer.num_sanity_val_steps=0",
            "trainer.detect_anomaly=true",
            "trainer.profiler=simple",
        ),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    grids = sorted(q.name for q in (run_dir / "samples").glob("*.png"))
    assert grids == [
        "epoch_0000.png",
        "epoch_0000_step_0000002.png",
        "epoch_0001.png",
        "epoch_0001_step_0000006.png",
    ], grids


@pytest.mark.slow  # 35 s; the default suite keeps the bit-exact resumes of test_reliability (every lever on)
def test_a_run_with_limit_train_batches_and_accumulation_resumes_bit_exact(python, cifar_root, tmp_path):
    """SIGTERM during step 7 of a run with 5 batches an epoch and 2 batches an update (mid-epoch, mid-update), then a
    resume: the weights, the EMA, Adam's state and the log are the uninterrupted run's."""
    from test_reliability import assert_same_training_state, csv_rows, load, signal_at_step

    extra = [
        "trainer.max_epochs=6",
        "trainer.limit_train_batches=5",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "data.flip=true",
        "recipe.dropout=0.1",
    ]
    p = train(python, *tiny_args(cifar_root, tmp_path / "reference", *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "run"
    cmd = [python, str(ROOT / "train.py"), *tiny_args(cifar_root, run_dir, *extra)]
    p = subprocess.run(signal_at_step(python, 7, cmd), capture_output=True, text=True, timeout=600)
    assert p.returncode == 128 + signal.SIGTERM, (p.stdout + p.stderr)[-3000:]
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8
    p = train(python, *tiny_args(cifar_root, run_dir, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training_state(
        load(run_dir / "checkpoints" / "last.ckpt"), load(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    )
    assert csv_rows(run_dir) == csv_rows(tmp_path / "reference")
