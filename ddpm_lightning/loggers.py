"""Lightning's loggers as this project needs them: a CSV log that a resumed run keeps, and W&B (one run per run dir)."""

import csv
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import cluster, files
from ddpm_lightning.errors import ConfigError


class ResumedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, which deletes the log dir's metrics.csv when it starts (so a resumed run kept only the
    rows logged after the resume, and the report's curves began there); when resuming, it keeps the rows of the steps
    before the checkpoint's (the resumed run logs every later step again), rewriting the file atomically."""

    def __init__(self, log_dir: str, resumed_step: int | None):
        self.resumed_step = resumed_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resumed_step is None or not path.is_file():
            return super()._check_log_dir_exists()
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step") and int(r["step"]) < self.resumed_step]
                header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error, ValueError) as e:
            raise ConfigError(
                f"the run's log {path} is not the CSV log Lightning writes ({type(e).__name__}), so its rows before "
                f"step {self.resumed_step} cannot be kept; move it away (the resumed run then logs from there on) and rerun"
            ) from None
        files.write_csv(path, rows, header, "the run's metrics.csv")
        self.metrics_keys = list(header)  # Lightning appends to the file while its columns stay these


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger at <run dir>/csv/, keeping a resumed run's earlier rows (ResumedCSVWriter)."""

    def __init__(self, run_dir: Path, resumed_step: int | None):
        super().__init__(run_dir, name="csv", version="")
        self.resumed_step = resumed_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumedCSVWriter(self.log_dir, self.resumed_step)
        return self._experiment


def wandb_run_id(run_dir: Path) -> str | None:
    """One W&B run per run dir: the id is kept in the run dir, so a resumed (or requeued) run logs to the same W&B run.
    Rank 0 keeps it; the other ranks log nothing to W&B."""
    if cluster.global_rank() != 0:
        return None
    path = run_dir / "wandb_id.txt"
    if not path.is_file() or not path.read_text().strip():
        files.write_text(path, secrets.token_hex(4), "the W&B run id")
    return path.read_text().strip()


def build_loggers(cfg: DictConfig, run_dir: Path, resumed_step: int | None) -> list:
    """The CSV log (its earlier rows read now, before training) and, unless logger=csv, W&B (started now, on rank 0)."""
    loggers = [ResumableCSVLogger(run_dir, resumed_step)]
    if cluster.global_rank() == 0:
        loggers[0].experiment  # noqa: B018 (a resumed run's rows are read here: a bad log fails before training)
    if cfg.logger.wandb is not None:
        w = cfg.logger.wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(
            project=w.project,
            entity=w.entity,
            group=w.group,
            name=w.name or run_dir.name,
            save_dir=str(run_dir),
            job_type="train",
            offline=not w.online,
            config=OmegaConf.to_container(cfg, resolve=True),
            id=wandb_run_id(run_dir),
            resume="allow",
        )
        if cluster.global_rank() == 0:  # the experiment is made here, before Lightning knows the rank: rank 0 alone
            try:
                define_wandb_metrics(wandb_logger.experiment)
            except Exception as e:
                raise ConfigError(
                    f"W&B could not start its run in {ascii(str(run_dir))} ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:160]}); use logger=csv, or a run dir W&B can write"
                ) from None
        loggers.append(wandb_logger)
    return loggers


def define_wandb_metrics(run) -> None:
    """Every val/* metric plots against the epoch; the summary keeps the best (min) FID as well as the last."""
    run.define_metric("epoch")
    run.define_metric("val/*", step_metric="epoch")
    run.define_metric("val/fid*", step_metric="epoch", summary="min,last")
