"""run(cfg): build the data, the module, the loggers and callbacks from the Hydra config, and fit."""

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import cluster, files, metrics, schema
from ddpm_lightning.callbacks import (
    EMA,
    ETA,
    FIDCallback,
    PostHocEMA,
    Preemption,
    ProgressBar,
    SampleGrid,
    TrainingStarted,
    last_checkpoint,
)
from ddpm_lightning.cli import startup
from ddpm_lightning.cluster import SIGNALS, Preempted
from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.diffusion.schedule import Schedule
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.loggers import build_loggers
from ddpm_lightning.module import DiffusionModule, pick_device, upgrade_hparams

log = logging.getLogger(__name__)


def guidance_weights(cfg: DictConfig) -> list[float]:
    """guidance.w as a list: one weight, or several to evaluate side by side (the first one draws the grids)."""
    w = OmegaConf.to_container(cfg.guidance, resolve=True)["w"]
    return [float(v) for v in w] if isinstance(w, list) else [float(w)]


def build_module(cfg: DictConfig, class_names: list[str]) -> DiffusionModule:
    """The module from the config groups; guidance.w is the first of the weights (it draws the grids)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    guidance = {"p_uncond": c["guidance"]["p_uncond"], "w": guidance_weights(cfg)[0]}
    return DiffusionModule(
        net=c["net"],
        schedule=c["schedule"],
        guidance=guidance,
        recipe=c["recipe"],
        speed={k: v for k, v in c["speed"].items() if k != "profile"},  # the profile chose these values
        sampler=c["sampler"],
        class_names=class_names,
        conditional=c["model"]["conditional"],
        lr=c["model"]["lr"],
        seed=c["seed"],
        max_nonfinite=c["trainer"]["max_nonfinite"],
    )


def resume_from(cfg: DictConfig, run_dir: Path, module: DiffusionModule) -> tuple[str | None, int | None]:
    """The checkpoint to continue from and its global step: ckpt_path=PATH, ckpt_path=last, or the run dir's own
    last.ckpt when rerun in the same dir; checked to be readable and of the same model before anything is written."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path is None:
        path = last if last.is_file() else None
    elif cfg.ckpt_path == "last":
        if not last.is_file():
            raise ConfigError(
                f"ckpt_path=last, but {last} does not exist; pass hydra.run.dir=<the run's dir> or ckpt_path=PATH"
            )
        path = last
    else:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"checkpoint ckpt_path={cfg.ckpt_path} does not exist; pass the path of a .ckpt file")
    if path is None:
        return None, None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        hparams, step = upgrade_hparams(ckpt["hyper_parameters"]), int(ckpt["global_step"])
    except Exception as e:
        raise ConfigError(
            f"cannot read checkpoint {path} ({type(e).__name__}); pass a checkpoint written by train.py"
        ) from None
    for key in ("net", "schedule", "conditional", "class_names", "image_size"):
        if hparams.get(key) != module.hparams[key]:
            raise ConfigError(
                f"checkpoint {path} has {key}={hparams.get(key)}, this run {key}={module.hparams[key]}; "
                "resume with the same model/net/schedule/data settings or use another run dir"
            )
    old, new = hparams["recipe"], module.hparams["recipe"]
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (betas: a list or a tuple)
    changed = [k for k in new if plain(old.get(k)) != plain(new[k])]
    if changed:
        k = changed[0]
        raise ConfigError(
            f"checkpoint {path} was trained with recipe.{k}={old.get(k)}, this run asks recipe.{k}={new[k]}: a resumed "
            "run keeps its recipe (its loss weighting and LR schedule are part of its state); resume with the "
            "checkpoint's recipe settings or start a new run dir"
        )
    log.info(f"resuming from {path}")
    return str(path), step


def load_reference(cfg: DictConfig, data: CIFARDataModule) -> tuple[metrics.Inception, dict, dict]:
    """The FID detector, the reference statistics of the subset's real images with their class probe, the training
    images (for memorization) and the real-data floor (all cached), on the training device."""
    m = cfg.metrics
    images, labels = (
        (data.train_images, data.train_labels) if m.reference_split == "train" else (data.test_images, data.test_labels)
    )
    device = "cpu" if cfg.trainer.accelerator == "cpu" else pick_device("auto")
    detector, reference = metrics.detector_and_reference(
        m.inception_weights,
        data.classes,
        images,
        m.reference_split,
        m.reference_images,
        m.cache_dir,
        m.batch_size,
        device,
        labels=labels,
        train_images=data.train_images,
    )
    floor = metrics.floor(
        detector,
        reference,
        data.test_images,
        m.num_samples,
        metrics.settings_of(cfg.metrics),
        m.cache_dir,
        m.batch_size,
        test_labels=data.test_labels,
    )
    return detector, reference, floor


def fid_callback(cfg: DictConfig, data: CIFARDataModule) -> list[FIDCallback]:
    every = cfg.callbacks.fid.every_n_epochs
    if not every:
        return []
    if cfg.trainer.fast_dev_run:
        log.info("trainer.fast_dev_run: no FID evaluation (it needs the reference statistics and num_samples images)")
        return []
    detector, reference, floor = load_reference(cfg, data)
    return [
        FIDCallback(
            detector,
            reference,
            floor,
            every,
            cfg.metrics.num_samples,
            guidance_weights(cfg),
            metrics.settings_of(cfg.metrics),
            cfg.metrics.batch_size,
        )
    ]


def log_prior_gap(schedule: Schedule, warn_above: float = 0.05) -> None:
    """Sampling starts from N(0, I), but q(x_T | x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I)."""
    ab_T = schedule.alpha_bar[-1].item()
    msg = (
        f"schedule: T={schedule.T}, alpha_bar_T={ab_T:.3g}: x_T keeps sqrt(alpha_bar_T)={schedule.prior_gap:.3f} of x_0, "
        f"KL(q(x_T|x_0) || N(0,I)) = {schedule.prior_kl:.2g} nats per dimension at |x_0| = 1"
    )
    log.info(msg)
    if schedule.prior_gap > warn_above:
        log.warning(
            f"sampling starts from N(0, I) while x_T still holds {schedule.prior_gap:.1%} of x_0 (over {warn_above:.0%}); "
            "raise schedule.T or use schedule=cosine to close the gap"
        )


def build_callbacks(cfg: DictConfig, data: CIFARDataModule, run_dir: Path) -> list[L.Callback]:
    """The training callbacks, in the order that matters: TrainingStarted first; the sampling callbacks before the EMA
    callback, so that at the end of a validation they run while the EMA weights are swapped in."""
    return [
        TrainingStarted(),  # first, so that it marks the first step before any callback can stop the run
        SampleGrid(**cfg.callbacks.sample_grid),  # these two before the EMA callback: they use the EMA weights
        *fid_callback(cfg, data),
        EMA(**cfg.callbacks.ema),
        *(
            [PostHocEMA(run_dir / "posthoc_ema", **cfg.callbacks.posthoc_ema)]
            if cfg.callbacks.posthoc_ema.every_n_steps
            else []
        ),
        last_checkpoint(run_dir / "checkpoints"),
        Preemption(run_dir / "checkpoints" / "last.ckpt"),
        *(
            [ProgressBar(refresh_rate=cfg.callbacks.progress.refresh_rate)]
            if cfg.trainer.enable_progress_bar is not False
            else []
        ),
        LearningRateMonitor(logging_interval="step"),
        ETA(),
    ]


def finished(run_dir: Path, max_epochs: int, max_steps: int) -> bool:
    """Whether the run dir holds a run that trained to ``max_epochs`` and ``max_steps`` (its done.json, written at the
    end of fit)."""
    done = files.load_or_none(run_dir / "done.json", lambda p: json.loads(p.read_text()), "the done marker")
    return done is not None and done.get("max_epochs") == max_epochs and done.get("max_steps", -1) == max_steps


def run(cfg: DictConfig) -> None:
    logging.getLogger("lightning").handlers.clear()  # Hydra's handlers already print and file its messages
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    t = cfg.trainer
    if not t.fast_dev_run and finished(run_dir, t.max_epochs, t.max_steps):
        log.info(
            f"{run_dir} already holds a run trained to trainer.max_epochs={t.max_epochs}, trainer.max_steps={t.max_steps} "
            "(done.json); nothing to do (raise trainer.max_epochs or trainer.max_steps to train on, or use another run dir)"
        )
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
        log.warning(
            f"{e}; {done}; exit code {cluster.exit_code(e.signum)} (a rerun in {run_dir} resumes from its last.ckpt)"
        )
        raise SystemExit(cluster.exit_code(e.signum)) from None
    finally:
        if cfg.logger.wandb is not None:
            import wandb

            wandb.finish()


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers) -> L.Trainer:
    """Lightning's Trainer from trainer.* (less what train.py sets itself), the launcher's environment, the recipe's
    gradient clipping and the crash-safe checkpoint writer."""
    trainer_args = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in schema.OURS}
    trainer_args |= cluster.trainer_environment(cfg)
    clip = cfg.recipe.grad_clip if cfg.recipe.grad_clip is not None else cfg.trainer.gradient_clip_val  # one setting
    trainer_args |= {"gradient_clip_val": clip, "gradient_clip_algorithm": "norm"}
    trainer_args["plugins"] = [*trainer_args.get("plugins", []), files.checkpoint_io()]  # crash-safe checkpoints
    return L.Trainer(**trainer_args, logger=loggers, callbacks=callbacks, default_root_dir=run_dir)


def fit(cfg: DictConfig, run_dir: Path, start: float) -> None:
    with startup(
        "building the run", cfg=cfg
    ):  # until the first training step: any failure is one line, and nothing is trained
        if cluster.global_rank() == 0:
            files.own_run_dir(run_dir)  # one training per run dir
            if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():  # would lose an epoch
                raise ConfigError(
                    f"{run_dir / 'checkpoints'} is a file where the checkpoints go; move it away and rerun"
                )
            files.remove_leftovers(run_dir, recursive=True)  # temp files of a run killed while writing
        L.seed_everything(
            cfg.seed, workers=True
        )  # the initial weights; each step's noise comes from (seed, step, rank)
        data = CIFARDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
        data.setup("fit")  # bad data fails here, before anything is built
        module = build_module(cfg, data.classes)
        ckpt_path, resumed_step = resume_from(cfg, run_dir, module)
        log_prior_gap(module.schedule)
        callbacks = build_callbacks(cfg, data, run_dir)
        started = callbacks[0]
        trainer = build_trainer(cfg, run_dir, callbacks, build_loggers(cfg, run_dir, resumed_step))
        sp = cfg.speed
        log.info(
            f"speed ({sp.profile} profile): precision {trainer.precision}, torch.compile "
            f"{f'on ({sp.compile_backend})' if sp.compile else 'off'}, channels_last {'on' if sp.channels_last else 'off'}, "
            f"bf16 sampling {'on' if sp.bf16_sampling else 'off'}, fused Adam"
        )
        if trainer.world_size > 1 and trainer.is_global_zero:
            log.info(
                f"{trainer.world_size} ranks on {trainer.num_nodes} node(s), from {type(trainer.strategy.cluster_environment).__name__}"
            )
    with (
        startup("starting the training", applies=lambda: not started.stepped, cfg=cfg),
        cluster.lost_ranks(trainer, run_dir),
    ):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    t = cfg.trainer
    reached = trainer.current_epoch >= t.max_epochs or 0 < t.max_steps <= trainer.global_step
    if not trainer.fast_dev_run and reached and trainer.is_global_zero:
        files.write_json(
            run_dir / "done.json",
            {
                "max_epochs": t.max_epochs,
                "max_steps": t.max_steps,
                "global_step": trainer.global_step,
                "seconds_this_process": round(time.perf_counter() - start, 1),
            },
            "the run's done marker",
        )
