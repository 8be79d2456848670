"""run(cfg): build the data, the module, the loggers and callbacks from the Hydra config, and fit."""

import csv
import json
import logging
import os
import secrets
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import cluster, files, metrics
from ddpm_lightning.cli import startup
from ddpm_lightning.callbacks import EMA, ETA, FIDCallback, Preemption, ProgressBar, SampleGrid, last_checkpoint
from ddpm_lightning.cluster import SIGNALS, Preempted
from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.diffusion.schedule import Schedule
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DiffusionModule, pick_device

log = logging.getLogger(__name__)


def guidance_weights(cfg: DictConfig) -> list[float]:
    """guidance.w as a list: one weight, or several to evaluate side by side (the first one draws the grids)."""
    w = OmegaConf.to_container(cfg.guidance, resolve=True)["w"]
    return [float(v) for v in w] if isinstance(w, list) else [float(w)]


def build_module(cfg: DictConfig, class_names: list[str]) -> DiffusionModule:
    c = OmegaConf.to_container(cfg, resolve=True)
    return DiffusionModule(
        net=c["net"], schedule=c["schedule"], class_names=class_names, conditional=c["model"]["conditional"],
        p_uncond=c["guidance"]["p_uncond"], guidance_w=guidance_weights(cfg)[0], sampler=c["sampler"], lr=c["model"]["lr"],
        seed=c["seed"], max_nonfinite=c["trainer"]["max_nonfinite"], compile=c["model"]["compile"],
        channels_last=c["model"]["channels_last"], bf16_sampling=c["model"]["bf16_sampling"],
        **{k: c["recipe"][k] for k in ("loss_weighting", "snr_gamma", "warmup_steps", "lr_decay", "betas", "weight_decay", "dropout")},
    )


def resume_from(cfg: DictConfig, run_dir: Path, module: DiffusionModule) -> tuple[str | None, int | None]:
    """The checkpoint to continue from and its global step: ckpt_path=PATH, ckpt_path=last, or the run dir's own
    last.ckpt when rerun in the same dir; checked to be readable and of the same model before anything is written."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path is None:
        path = last if last.is_file() else None
    elif cfg.ckpt_path == "last":
        if not last.is_file():
            raise ConfigError(f"ckpt_path=last, but {last} does not exist; pass hydra.run.dir=<the run's dir> or ckpt_path=PATH")
        path = last
    else:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"checkpoint ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file")
    if path is None:
        return None, None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        hparams, step = ckpt["hyper_parameters"], int(ckpt["global_step"])
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path} ({type(e).__name__}); pass a checkpoint written by train.py") from None
    for key in ("net", "schedule", "conditional", "class_names", "image_size"):
        if hparams.get(key) != module.hparams[key]:
            raise ConfigError(f"checkpoint {path} has {key}={hparams.get(key)}, this run {key}={module.hparams[key]}; "
                              "resume with the same model/net/schedule/data settings or use another run dir")
    log.info(f"resuming from {path}")
    return str(path), step


def wandb_run_id(run_dir: Path) -> str | None:
    """One W&B run per run dir: the id is kept in the run dir, so a resumed (or requeued) run logs to the same W&B run.
    Rank 0 keeps it; the other ranks log nothing to W&B."""
    if cluster.global_rank() != 0:
        return None
    path = run_dir / "wandb_id.txt"
    if not path.is_file() or not path.read_text().strip():
        files.write_text(path, secrets.token_hex(4), "the W&B run id")
    return path.read_text().strip()


def load_reference(cfg: DictConfig, data: CIFARDataModule) -> tuple[metrics.Inception, dict, dict]:
    """The FID detector, the reference statistics of the subset's real images with their class probe, the training
    images (for memorization) and the real-data floor (all cached), on the training device."""
    m = cfg.metrics
    images, labels = (data.train_images, data.train_labels) if m.reference_split == "train" else (data.test_images, data.test_labels)
    device = "cpu" if cfg.trainer.accelerator == "cpu" else pick_device("auto")
    detector, reference = metrics.detector_and_reference(m.inception_weights, data.classes, images, m.reference_split, m.reference_images,
                                                         m.cache_dir, m.batch_size, device, labels=labels, train_images=data.train_images)
    floor = metrics.floor(detector, reference, data.test_images, m.num_samples, metrics.settings_of(cfg.metrics), m.cache_dir, m.batch_size,
                          test_labels=data.test_labels)
    return detector, reference, floor


def fid_callback(cfg: DictConfig, data: CIFARDataModule) -> list[FIDCallback]:
    every = cfg.callbacks.fid.every_n_epochs
    if not every:
        return []
    if cfg.trainer.fast_dev_run:
        log.info("trainer.fast_dev_run: no FID evaluation (it needs the reference statistics and num_samples images)")
        return []
    detector, reference, floor = load_reference(cfg, data)
    return [FIDCallback(detector, reference, floor, every, cfg.metrics.num_samples, guidance_weights(cfg), metrics.settings_of(cfg.metrics),
                        cfg.metrics.batch_size)]


def log_prior_gap(schedule: Schedule, warn_above: float = 0.05) -> None:
    """Sampling starts from N(0, I), but q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I)."""
    ab_T = schedule.alpha_bar[-1].item()
    msg = (f"schedule: T={schedule.T}, alpha_bar_T={ab_T:.3g}: x_T keeps sqrt(alpha_bar_T)={schedule.prior_gap:.3f} of x_0, "
           f"KL(q(x_T|x_0) || N(0,I)) = {schedule.prior_kl:.2g} nats per dimension at |x_0| = 1")
    log.info(msg)
    if schedule.prior_gap > warn_above:
        log.warning(f"sampling starts from N(0, I) while x_T still holds {schedule.prior_gap:.1%} of x_0 (over {warn_above:.0%}); "
                    "raise schedule.T or use schedule=cosine to close the gap")


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
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r.get("step") and int(r["step"]) < self.resumed_step]
            header = reader.fieldnames or []
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


class FlushLogsOnSave(L.Callback):
    """Writes the CSV rows logged so far before each checkpoint, so a checkpoint never holds steps whose rows are
    still in memory (Lightning flushes every 100 steps: a kill after the save would lose them for good)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()


def build_loggers(cfg: DictConfig, run_dir: Path, resumed_step: int | None) -> list:
    loggers = [ResumableCSVLogger(run_dir, resumed_step)]
    if cfg.logger.wandb is not None:
        w = cfg.logger.wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(
            project=w.project, entity=w.entity, group=w.group, name=w.name or run_dir.name, save_dir=str(run_dir), job_type="train",
            offline=not w.online, config=OmegaConf.to_container(cfg, resolve=True), id=wandb_run_id(run_dir), resume="allow",
        )
        if cluster.global_rank() == 0:  # the experiment is made here, before Lightning knows the rank: rank 0 alone
            define_wandb_metrics(wandb_logger.experiment)
        loggers.append(wandb_logger)
    return loggers


def define_wandb_metrics(run) -> None:
    """Every val/* metric plots against the epoch; the summary keeps the best (min) FID as well as the last."""
    run.define_metric("epoch")
    run.define_metric("val/*", step_metric="epoch")
    run.define_metric("val/fid*", step_metric="epoch", summary="min,last")


class TrainingStarted(L.Callback):
    """Marks the first finished training step: a failure before it is a start-up error (one line, exit 2)."""

    stepped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped = True


def build_callbacks(cfg: DictConfig, data: CIFARDataModule, run_dir: Path) -> list[L.Callback]:
    """The training callbacks, in the order that matters: TrainingStarted first; the sampling callbacks before the EMA
    callback, so that at the end of a validation they run while the EMA weights are swapped in."""
    return [
        TrainingStarted(),  # first, so that it marks the first step before any callback can stop the run
        SampleGrid(**cfg.callbacks.sample_grid),  # these two before the EMA callback: they use the EMA weights
        *fid_callback(cfg, data),
        EMA(**cfg.callbacks.ema),
        FlushLogsOnSave(),
        last_checkpoint(run_dir / "checkpoints"),
        Preemption(run_dir / "checkpoints" / "last.ckpt"),
        ProgressBar(refresh_rate=cfg.callbacks.progress.refresh_rate),
        LearningRateMonitor(logging_interval="step"),
        ETA(),
    ]


def finished(run_dir: Path, max_epochs: int) -> bool:
    """Whether the run dir holds a run that trained to ``max_epochs`` (its done.json, written at the end of fit)."""
    done = files.load_or_none(run_dir / "done.json", lambda p: json.loads(p.read_text()), "the done marker")
    return done is not None and done.get("max_epochs") == max_epochs


def run(cfg: DictConfig) -> None:
    logging.getLogger("lightning").handlers.clear()  # Hydra's handlers already print and file its messages
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.trainer.fast_dev_run and finished(run_dir, cfg.trainer.max_epochs):
        log.info(f"{run_dir} already holds a run trained to trainer.max_epochs={cfg.trainer.max_epochs} (done.json); "
                 "nothing to do (raise trainer.max_epochs to train on, or use another run dir)")
        return
    start = time.perf_counter()
    SIGNALS.install()  # from here on a preemption signal stops the run (at once until training starts)
    SIGNALS.stage = "starting"
    try:
        if SIGNALS.received:  # during an earlier job of this process (a sweep under Hydra's basic launcher)
            raise Preempted(SIGNALS.received, f"{SIGNALS.received.name} before this job started")
        fit(cfg, run_dir, start)
    except Preempted as e:
        done = cluster.requeue(e.signum) if cluster.global_rank() == 0 else "rank 0 requeues the job"
        log.warning(f"{e}; {done}; exit code {cluster.exit_code(e.signum)} (a rerun in {run_dir} resumes from its last.ckpt)")
        raise SystemExit(cluster.exit_code(e.signum)) from None
    finally:
        if cfg.logger.wandb is not None:
            import wandb

            wandb.finish()


def fit(cfg: DictConfig, run_dir: Path, start: float) -> None:
    with startup("building the run", cfg=cfg):  # until the first training step: any failure is one line, and nothing is trained
        if cluster.global_rank() == 0:
            files.remove_leftovers(run_dir)  # temp files of a run killed while writing
        L.seed_everything(cfg.seed, workers=True)  # the initial weights; each step's noise comes from (seed, step, rank)
        data = CIFARDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
        data.setup("fit")  # bad data fails here, before anything is built
        module = build_module(cfg, data.classes)
        ckpt_path, resumed_step = resume_from(cfg, run_dir, module)
        log_prior_gap(module.schedule)
        callbacks = build_callbacks(cfg, data, run_dir)
        started = callbacks[0]
        trainer_args = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                        if k not in ("max_nonfinite", "process_group_timeout")}
        trainer_args |= cluster.trainer_environment(cfg)
        trainer_args |= {"gradient_clip_val": cfg.recipe.grad_clip, "gradient_clip_algorithm": "norm"}
        trainer_args["plugins"] = [*trainer_args.get("plugins", []), files.checkpoint_io()]  # crash-safe checkpoint writes
        trainer = L.Trainer(**trainer_args, logger=build_loggers(cfg, run_dir, resumed_step), callbacks=callbacks, default_root_dir=run_dir)
        if trainer.world_size > 1 and trainer.is_global_zero:
            log.info(f"{trainer.world_size} ranks on {trainer.num_nodes} node(s), from {type(trainer.strategy.cluster_environment).__name__}")
    with startup("starting the training", applies=lambda: not started.stepped, cfg=cfg), cluster.lost_ranks(trainer, run_dir):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if not trainer.fast_dev_run and trainer.current_epoch >= cfg.trainer.max_epochs and trainer.is_global_zero:
        files.write_json(run_dir / "done.json", {"max_epochs": cfg.trainer.max_epochs, "global_step": trainer.global_step,
                                                 "seconds_this_process": round(time.perf_counter() - start, 1)}, "the run's done marker")
