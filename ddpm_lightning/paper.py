"""The paper's experiment as a pipeline of the entry points: the trainings, the guidance sweeps, samples and
strips, then the report. Every stage is a Hydra multirun of train.py or evaluate.py, so any launcher takes its jobs
(``hydra/launcher=...`` and ``hydra.launcher.*`` go to every multirun), and every job skips itself when its run dir
holds its result (train.py: done.json; evaluate.py: results.json of the same checkpoint and settings): a rerun
resumes what was interrupted and repeats nothing that is done.

    <paper.dir>/train/<model>_<data>/           the four trainings (FID/IS every callbacks.fid.every_n_epochs)
    <paper.dir>/eval/<model>_<data>/<job>/      evaluate.py -m: the w sweep (improved), a replica (simple)
    <paper.dir>/eval/floor_<data>/real/         real held-out images at the same N: what a perfect model scores
    <paper.dir>/samples/<model>_<data>/         final sample grid, reverse and forward strips (sample.py)
    <paper.dir>/report/                         the paper's figures and the table (report.py)
    <paper.dir>/paper_log.jsonl                 each stage's command, wall time and commit
"""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import files, schema
from ddpm_lightning.cli import one_line
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.schema import CONF, compose

log = logging.getLogger(__name__)
ROOT = CONF.parent
LAUNCHER_PREFIXES = ("hydra/launcher=", "hydra.launcher.")


def compose_train_config(overrides: list[str]) -> DictConfig:
    try:
        return compose("config", overrides)
    except Exception as e:
        raise ConfigError(f"{one_line(e)} (python train.py --help lists the groups and options)") from None


def commit() -> str:
    p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    return (p.stdout.strip() or "unknown") + ("+uncommitted" if dirty.strip() else "")


def plan(argv: list[str]) -> tuple[DictConfig, list[tuple[str, list[str]]]]:
    """The settings and the stages: (name, command) in order. Nothing runs here."""
    launcher = [a for a in argv if a.startswith(LAUNCHER_PREFIXES)]
    train_args = [a for a in argv if a not in launcher]
    for a in train_args:
        if a.split("=")[0].lstrip("~+") in ("model", "data"):
            raise ConfigError(
                f"{a}: the experiment trains every model on every data set; choose them with "
                "paper.models=[simple,improved] and paper.data=[cars,five_class]"
            )
        if a.startswith("-"):
            raise ConfigError(f"{a}: paper.py takes only key=value overrides of train.py's config")
    cfg = compose_train_config(train_args)
    schema.check(cfg, "config")
    p, out = cfg.paper, Path(cfg.paper.dir)
    py = sys.executable
    group = (
        [] if cfg.logger.wandb is None or cfg.logger.wandb.group else [f"logger.wandb.group={out.name}"]
    )  # one W&B group
    names = [(model, data) for model in p.models for data in p.data]
    stages = [
        (
            "train",
            [
                py,
                str(ROOT / "train.py"),
                "-m",
                f"model={','.join(p.models)}",
                f"data={','.join(p.data)}",
                *train_args,
                *group,
                *launcher,
                f"hydra.sweep.dir={out / 'train'}",
                "hydra.sweep.subdir=${hydra:runtime.choices.model}_${hydra:runtime.choices.data}",
            ],
        )
    ]
    metrics = OmegaConf.to_container(cfg.metrics, resolve=True) | {"seed": p.eval_seed}
    if p.eval_num_samples is not None:
        metrics["num_samples"] = p.eval_num_samples
    common = [f"metrics.{k}={'null' if v is None else v}" for k, v in metrics.items()] + [f"data.root={cfg.data.root}"]
    common.append(
        f"data.max_images={'null' if cfg.data.max_images is None else cfg.data.max_images}"
    )  # memorization: what was trained on
    if cfg.logger.wandb is None:
        common.append("logger=csv")
    else:
        common += [
            f"logger.wandb.{k}={'null' if v is None else v}"
            for k, v in cfg.logger.wandb.items()
            if k in ("online", "project", "entity")
        ]
        common.append(f"logger.wandb.group={cfg.logger.wandb.group or out.name}")
    for model, data in names:
        name = f"{model}_{data}"
        ckpt = out / "train" / name / "checkpoints" / "last.ckpt"
        sweep = (
            [f"guidance.w={','.join(str(w) for w in p.guidance_ws)}", "hydra.sweep.subdir=w${guidance.w}"]
            if model == "improved"
            else ["hydra.sweep.subdir=replica"]
        )
        stages.append(
            (
                f"eval {name}",
                [
                    py,
                    str(ROOT / "evaluate.py"),
                    "-m",
                    f"ckpt={ckpt}",
                    *common,
                    *sweep,
                    *launcher,
                    f"hydra.sweep.dir={out / 'eval' / name}",
                ],
            )
        )
    for data in p.data:
        ckpt = out / "train" / f"{p.models[0]}_{data}" / "checkpoints" / "last.ckpt"
        stages.append(
            (
                f"floor {data}",
                [
                    py,
                    str(ROOT / "evaluate.py"),
                    "-m",
                    f"ckpt={ckpt}",
                    "real=true",
                    *common,
                    *launcher,
                    f"hydra.sweep.dir={out / 'eval' / f'floor_{data}'}",
                    "hydra.sweep.subdir=real",
                ],
            )
        )
    sampler = [f"sampler={cfg.sampler.name}", *(f"sampler.{k}={v}" for k, v in cfg.sampler.items() if k != "name")]
    for model, data in names:
        name = f"{model}_{data}"
        ckpt = out / "train" / name / "checkpoints" / "last.ckpt"
        stages.append(
            (
                f"samples {name}",
                [
                    py,
                    str(ROOT / "sample.py"),
                    f"ckpt={ckpt}",
                    f"n={p.samples}",
                    *sampler,  # the sampler the run's grids and scores use, not sample.py's default
                    "strips.reverse=true",
                    "strips.forward=true",
                    f"data.root={cfg.data.root}",
                    f"hydra.run.dir={out / 'samples' / name}",
                ],
            )
        )
    stages.append(
        (
            "report",
            [
                py,
                str(ROOT / "report.py"),
                f"runs={out}",
                f"out={out / 'report'}",
                f"loss_from_epoch={p.loss_from_epoch}",
            ],
        )
    )
    return cfg, stages


def samples_done(command: list[str]) -> bool:
    """A sample stage is done when its grid is newer than its checkpoint."""
    ckpt = Path(next(a for a in command if a.startswith("ckpt="))[5:])
    grid = Path(next(a for a in command if a.startswith("hydra.run.dir="))[14:]) / "grid.png"
    return grid.is_file() and ckpt.is_file() and grid.stat().st_mtime > ckpt.stat().st_mtime


def run(argv: list[str]) -> None:
    cfg, stages = plan(argv)
    out = Path(cfg.paper.dir)
    out.mkdir(parents=True, exist_ok=True)
    started, rev = time.time(), commit()
    for name, command in stages:
        skip = name.startswith("samples") and samples_done(command)
        log.info(f"paper: {name}: " + ("done already" if skip else " ".join(command[1:])))
        t0 = time.perf_counter()
        returncode = 0 if skip else subprocess.run(command, cwd=ROOT).returncode
        seconds = round(time.perf_counter() - t0, 1)
        files.append_line(
            out / "paper_log.jsonl",
            json.dumps(
                {
                    "stage": name,
                    "seconds": seconds,
                    "returncode": returncode,
                    "skipped": skip,
                    "commit": rev,
                    "started": started,
                    "command": " ".join(command[1:]),
                    "args": argv,
                }
            ),
            "the pipeline's log",
        )
        if returncode:
            raise ConfigError(
                f"stage '{name}' failed (exit {returncode}); fix what it printed and rerun: finished work is kept"
            )
    log.info(f"paper: done in {time.time() - started:.0f} s; the report is in {out / 'report'}")
