"""Resume after SIGKILL and SIGTERM, atomic checkpoints, non-finite losses, bad input, safe loading, determinism."""

import csv
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, make_cifar

from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.errors import ConfigError, NonFiniteLoss
from ddpm_lightning.module import load_checkpoint
from ddpm_lightning.testing import tiny_module


def train_cmd(python, root, run_dir, *extra, net=None):
    """train.py on a tiny subset with every lever on; ``net`` overrides (default TINY_NET; () keeps the config's net)."""
    return [
        python,
        str(ROOT / "train.py"),
        "experiment=smoke",
        "model=improved",
        f"data.root={root}",
        "data.classes=[automobile,cat]",
        "data.max_images=null",
        "data.batch_size=4",
        "trainer.check_val_every_n_epoch=2",
        "trainer.log_every_n_steps=1",  # every step a row: a stop anywhere is on the logging grid
        "logger=csv",
        *(TINY_NET if net is None else net),
        *LEVERS,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


# the smallest net that has every part (attention, class embedding): resume is about the loop, not the width
TINY_NET = ["net.width=4", "net.emb_dim=16", "net.heads=2", "net.attention=[4]"]
# every training lever on (recipe=fast's learning rate and log-SNR timestep density, Min-SNR weights, warm-up and cosine
# decay, clipping, dropout, AdamW, immiscible noise, the rescaled schedule, post-hoc EMA snapshots): resume is bit-exact
LEVERS = [
    "recipe=fast",
    "recipe.loss_weighting=min_snr",
    "recipe.lr_decay=cosine",
    "recipe.grad_clip=1.0",
    "recipe.warmup_steps=30",
    "recipe.dropout=0.1",
    "recipe.weight_decay=0.01",
    "recipe.betas=[0.9,0.99]",
    "recipe.immiscible=true",
    "schedule.rescale=true",
    "callbacks.posthoc_ema.every_n_steps=20",
]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), ("optimizer", i, k)
    posthoc = [k for k in a["callbacks"] if k.startswith("PostHocEMA")]  # the power-function EMAs, where kept
    assert posthoc == [k for k in b["callbacks"] if k.startswith("PostHocEMA")]
    for k in posthoc:
        ea, eb = a["callbacks"][k], b["callbacks"][k]
        assert ea["t"] == eb["t"] and all(map(torch.equal, sum(ea["averages"], []), sum(eb["averages"], [])))


def wait_for(predicate, timeout=300):
    start = time.time()
    while not predicate():
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, python):
    """An uninterrupted run: 4 epochs of 50 steps."""
    tmp = tmp_path_factory.mktemp("reliability")
    root = make_cifar(tmp / "cifar", n_train=100)
    p = subprocess.run(
        train_cmd(python, root, tmp / "reference", "trainer.max_epochs=4"), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return root, load(tmp / "reference" / "checkpoints" / "last.ckpt"), csv_rows(tmp / "reference")


def epoch_of(path: Path) -> int:
    try:
        return load(path)["epoch"] if path.is_file() else -1
    except Exception:
        return -1


@pytest.mark.slow  # 33 s; the default suite kills and resumes bit-exact with every lever on in test_gpu_rehearsal
def test_sigkill_then_resume_equals_the_uninterrupted_run(python, reference_run, tmp_path):
    root, reference, rows = reference_run
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        train_cmd(python, root, run_dir, "trainer.max_epochs=4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: epoch_of(last) >= 0 or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(last)["global_step"]
    assert killed_at % 50 == 0 and killed_at < 200  # an epoch-boundary checkpoint, before the end
    p = subprocess.run(
        train_cmd(python, root, run_dir, "trainer.max_epochs=4"), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {last}" in p.stdout + p.stderr
    assert_same_training_state(load(last), reference)
    assert any(k.startswith("PostHocEMA") for k in reference["callbacks"])  # LEVERS keep them: compared above
    assert (
        csv_rows(run_dir) == rows
    )  # the log too: the rows before the kill kept, none twice (Lightning's CSVLogger deleted them)


SIGNAL_AT_STEP = """import os, runpy, signal, sys
from ddpm_lightning.module import DiffusionModule
step, train = DiffusionModule.training_step, int(sys.argv.pop(1))
def training_step(self, batch, batch_idx):  # the signal arrives during step `train`, as a scheduler's would
    if self.global_step == train:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, batch, batch_idx)
DiffusionModule.training_step = training_step
sys.argv[0] = {train_py!r}
runpy.run_path({train_py!r}, run_name="__main__")
"""


def signal_at_step(python, step: int, cmd: list[str]) -> list[str]:
    """train.py's command, with SIGTERM sent to the process during training step ``step`` (a known point, no sleep)."""
    return [python, "-c", SIGNAL_AT_STEP.format(train_py=str(ROOT / "train.py")), str(step), *cmd[2:]]


def test_sigterm_saves_mid_epoch_and_resume_neither_repeats_nor_skips(python, reference_run, tmp_path):
    root, reference, rows = reference_run
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    p = subprocess.run(
        signal_at_step(python, 70, train_cmd(python, root, run_dir, "trainer.max_epochs=4")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]  # saved and stopped, not "completed"
    assert "SIGTERM after step 71 (epoch 1)" in out and "; not requeued (SIGTERM: scancel" in out
    assert load(last)["global_step"] == 71  # mid-epoch: 50 steps an epoch
    p = subprocess.run(  # resumed, and stopped again at the last step of an epoch
        signal_at_step(python, 149, train_cmd(python, root, run_dir, "trainer.max_epochs=4")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 128 + signal.SIGTERM and "SIGTERM after step 150 (epoch 2)" in p.stdout + p.stderr
    assert load(last)["global_step"] == 150  # its epoch's mean-loss row comes when the resumed run ends the epoch
    p = subprocess.run(
        train_cmd(python, root, run_dir, "trainer.max_epochs=4", "ckpt_path=last"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training_state(load(last), reference)  # 200 steps in all, each batch and noise draw exactly once
    assert csv_rows(run_dir) == rows


@pytest.mark.slow  # Lightning's atomic checkpoint writes; the default suite keeps the SIGKILL/SIGTERM resume tests
def test_checkpoints_survive_kills_while_being_written(python, tmp_path):
    """Lightning's checkpoint writer (used by the trainer) is killed at random moments while it writes; what is left
    at last.ckpt always loads and is a whole checkpoint."""
    path = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\nfrom lightning.pytorch.plugins.io import TorchCheckpointIO\nio = TorchCheckpointIO()\ni = 0\n"
        "print('ready', flush=True)\n"
        "while True:\n    io.save_checkpoint({'step': i, 'w': torch.full((4_000_000,), float(i))}, sys.argv[1]); i += 1\n"
    )
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(8):
        proc = subprocess.Popen([python, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(0.1 + 0.6 * torch.rand((), generator=g).item())
        proc.kill()
        proc.wait()
        if path.is_file():
            ckpt = load(path)
            assert (ckpt["w"] == ckpt["step"]).all()
            seen.add(ckpt["step"])
    assert seen and not list(tmp_path.glob("*.tmp*"))


class NaNAfter:
    """A module's loss that turns NaN from a given step on."""

    nan_from = 7

    def __init__(self, module):
        self.module, self.loss = module, module.loss

    def __call__(self, *args):
        loss = self.loss(*args)
        return loss * float("nan") if self.module.global_step >= self.nan_from else loss


class Snapshot(L.Callback):
    """The weights, the optimizer state and the EMA (its weights and count) after the last good update; after the EMA
    callback in the list, so that its update of that step is in."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == NaNAfter.nan_from:
            self.good = state_of(trainer, pl_module)


def state_of(trainer, pl_module) -> dict:
    ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")._average_model
    opt = trainer.optimizers[0].state_dict()["state"]
    return {
        "net": {k: v.clone() for k, v in pl_module.net.state_dict().items()},
        "optimizer": {(i, k): v.clone() for i, st in opt.items() for k, v in st.items()},
        "ema": [p.detach().clone() for p in ema.parameters()],
        "ema_count": ema.n_averaged.clone(),
    }


def test_non_finite_losses_skip_updates_and_stop_the_run(cifar_root, tmp_path):
    """NaN losses from step 7 on: the updates of steps 7 and 8 are skipped, and step 9's third NaN in a row stops the
    run. Weights, Adam's moments and step counts, and the EMA's weights and count stay those after step 6; gradient
    clipping (which turns the NaN gradients into NaN, not into a finite step) does not change that."""
    from ddpm_lightning.callbacks import EMA, last_checkpoint

    torch.manual_seed(0)
    m = tiny_module(True, max_nonfinite=3, nonfinite_check_every=1)
    m.loss = NaNAfter(m)
    snap, ema = Snapshot(), EMA(0.9)
    ckpt = last_checkpoint(tmp_path / "checkpoints")
    trainer = L.Trainer(
        max_epochs=10,
        logger=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[ema, snap, ckpt],
        gradient_clip_val=1.0,
    )
    with pytest.raises(
        NonFiniteLoss, match=r"training stopped at step 9 \(epoch 1\): the loss was not finite for 3 consecutive steps"
    ):
        trainer.fit(m, datamodule=CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=8))
    now, good = state_of(trainer, m), snap.good
    assert all(torch.equal(now["net"][k], good["net"][k]) for k in good["net"])  # no update after the NaNs began
    assert now["optimizer"].keys() == good["optimizer"].keys()
    assert all(
        torch.equal(now["optimizer"][k], good["optimizer"][k]) for k in good["optimizer"]
    )  # moments and step counts
    assert all(torch.equal(a, b) for a, b in zip(now["ema"], good["ema"], strict=True))  # the EMA made no update either
    assert int(now["ema_count"]) == int(good["ema_count"]) == 7
    saved = load(tmp_path / "checkpoints" / "last.ckpt")  # the epoch-0 checkpoint is intact
    assert saved["global_step"] == 5 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.fixture(scope="module")
def simple_run(tmp_path_factory, python):
    tmp = tmp_path_factory.mktemp("simple")
    root = make_cifar(tmp / "cifar")
    run_dir = tmp / "run"
    cmd = train_cmd(python, root, run_dir, "model=simple", "trainer.max_epochs=1")
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    return root, run_dir


def bad_input_cases(root, run_dir, corrupt_root):
    """Bad inputs that reach train.py's run (the schema's checks are tested in process in test_schema.py): the data,
    the checkpoints, a library's error while the run is built, the output dir; and one of the schema's, end to end."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return [
        (["trainer.foo=1"], "trainer.foo is not a setting; drop it"),
        (["trainer.accelerator=gpu"], "building the run failed: MisconfigurationException:"),
        (["data.batch_size=100000"], "data.batch_size=100000 is larger than the 40 training images"),
        (
            ["data.root=/nonexistent", "data.download=false"],
            "CIFAR-10 not found at /nonexistent/cifar-10-batches-py and data.download=false",
        ),
        ([f"data.root={corrupt_root}"], "cannot read CIFAR-10 file"),
        (["ckpt_path=/nonexistent.ckpt"], "checkpoint ckpt_path=/nonexistent.ckpt does not exist"),
        ([f"ckpt_path={ckpt}"], f"checkpoint {ckpt} has conditional=False, this run conditional=True"),
        ([f"hydra.run.dir={run_dir}"], f"checkpoint {ckpt} has conditional=False, this run conditional=True"),
        (["hydra.run.dir=/proc/forbidden"], "output dir /proc/forbidden is not writable"),
        ([f"hydra.run.dir={corrupt_root / 'run'}"], f"{corrupt_root / 'run' / 'checkpoints'} is a file where the"),
    ]


@pytest.mark.slow  # 57 s of subprocesses; test_schema, test_sample and test_files keep one-line errors in the default suite
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(python, simple_run, tmp_path):
    root, run_dir = simple_run
    corrupt = make_cifar(tmp_path / "corrupt")
    (corrupt / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage")
    (corrupt / "run").mkdir()
    (corrupt / "run" / "checkpoints").write_text("a file where the checkpoints go")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    for args, message in bad_input_cases(root, run_dir, corrupt):
        default_dir = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path / 'out'}"]
        cmd = [*train_cmd(python, root, tmp_path / "out", "trainer.max_epochs=1")[:-1], *default_dir, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and lines and lines[-1].startswith("error: ") and message in lines[-1], (
            args,
            p.stderr[-2000:],
        )
        assert not (tmp_path / "out" / "checkpoints").exists(), args
    assert ckpt.read_bytes() == before


class RunsOnUnpickling:
    """An object whose unpickling runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoints_with_pickled_callables_are_refused(tmp_path):
    """A checkpoint that is valid in every respect (it loads without its payload) but carries a pickled callable:
    loading it runs nothing (no marker) and fails in one line."""
    import lightning

    m = tiny_module()
    valid = {
        "state_dict": m.state_dict(),
        "hyper_parameters": dict(m.hparams),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(valid, tmp_path / "valid.ckpt")
    assert torch.equal(load_checkpoint(str(tmp_path / "valid.ckpt"), device="cpu").net.outc.weight, m.net.outc.weight)
    marker = tmp_path / "payload_ran"
    torch.save({**valid, "payload": RunsOnUnpickling(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="cannot load checkpoint .*evil.ckpt"):
        load_checkpoint(str(tmp_path / "evil.ckpt"), device="cpu")
    assert not marker.exists()  # the payload never ran


def calls_of(source: str, name: str) -> list[str]:
    """The full text of every call ``name(...)`` in the source, parentheses balanced."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        calls.append(source[match.start() : end + 1])
    return calls


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for path in [
        *ROOT.joinpath("ddpm_lightning").rglob("*.py"),
        *ROOT.glob("*.py"),
        *ROOT.joinpath("bench").glob("*.py"),
    ]:
        for name in ("torch.load", "load_from_checkpoint", "load_state_dict_from_url"):
            calls += [(path.name, call) for call in calls_of(path.read_text(), name)]
    assert len(calls) >= 5 and all("weights_only=True" in call for _, call in calls), calls


@pytest.mark.slow  # the default suite keeps the bit-exact resume tests (training) and sample.py's same-seed test (sampling)
def test_same_seed_same_losses_and_samples(python, tmp_path):
    root = make_cifar(tmp_path / "cifar")
    outs = []
    for name in ("a", "b"):
        p = subprocess.run(
            train_cmd(python, root, tmp_path / name, "trainer.max_epochs=2"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        losses = [r.split(",")[3] for r in (tmp_path / name / "csv" / "metrics.csv").read_text().splitlines()[1:]]
        outs.append((losses, (tmp_path / name / "samples" / "epoch_0001.png").read_bytes()))
    assert outs[0] == outs[1] and any(outs[0][0])
