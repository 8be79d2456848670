import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(
    root: Path,
    n_train: int = 20,
    n_test: int = 10,
    labels: tuple = tuple(range(10)),
    seed: int = 0,
    natural: bool = False,
) -> Path:
    """A tiny CIFAR-10 copy in the official python format; each class is an easily learned picture:
    a flat colour of its own with a little noise (``natural``: half that colour, half a smooth random field of
    natural_images, so that every image differs from every other). n_train/n_test are per class, train split over 5
    batches."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, size=(10, 3))

    def batch(n_per_class):
        y = np.array([c for _ in range(n_per_class) for c in labels])
        x = colours[y][:, :, None] + rng.integers(-8, 9, size=(len(y), 3, 1024))
        if natural:
            fields = natural_images(len(y), seed=int(rng.integers(1 << 30))).numpy().reshape(len(y), 3, 1024)
            x = colours[y][:, :, None] // 2 + fields // 2
        return np.clip(x, 0, 255).astype(np.uint8).reshape(len(y), 3072), y.tolist()

    x, y = batch(n_train)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {
                    "batch_label": f"training batch {i} of 5",
                    "data": x[part],
                    "labels": [y[j] for j in part],
                    "filenames": [f"{j}.png" for j in part],
                },
                f,
            )
    x, y = batch(n_test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": x, "labels": y, "filenames": []}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    return make_cifar(tmp_path / "cifar")


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, python):
    """A finished smoke run of the improved model on a generated two-class dataset (shared by tests that need a
    checkpoint): its run dir and data root."""
    import subprocess

    tmp = tmp_path_factory.mktemp("smoke")
    root = make_cifar(tmp / "cifar")
    run_dir = tmp / "run"
    p = subprocess.run(
        [
            python,
            str(ROOT / "train.py"),
            "experiment=smoke",
            "model=improved",
            f"data.root={root}",
            "data.classes=[automobile,cat]",
            "data.max_images=null",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir, root


def random_detector_state(seed: int = 0, classifier: bool = True) -> dict:
    from ddpm_lightning.testing import random_inception_state

    return random_inception_state(seed, classifier)


@pytest.fixture(scope="session")
def detector_file(tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("detector") / "random_inception.pth"
    torch.save(random_detector_state(), path)
    return path


def natural_images(n: int, seed: int = 0):
    """Smooth random colour fields (upsampled noise): images with some structure, as uint8 (n, 3, 32, 32)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def wandb_records(path: Path):
    """The records of an offline W&B run file (run-*.wandb: a 7-byte header, then LevelDB log blocks of 32 KiB,
    each record a checksum, a length, a type (1 full, 2 first, 3 middle, 4 last) and a protobuf chunk)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts = Path(path).read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(run_dir: Path) -> dict:
    """What an offline W&B run under run_dir recorded: job type, group, name, config, define_metric calls, logged keys."""
    import json

    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    out = {"config": {}, "metrics": [], "logged": set()}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(job_type=r.run.job_type, group=r.run.run_group, name=r.run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "metric":
            m = r.metric
            out["metrics"].append(
                {
                    "name": m.name or m.glob_name,
                    "step_metric": m.step_metric,
                    "min": m.summary.min,
                    "last": m.summary.last,
                }
            )
        elif kind == "history":
            out["logged"] |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    return out
