"""Callbacks that generate images during training. They run at the end of validation, where Lightning's
WeightAveraging callback has swapped the EMA weights in, so they must come before it in the callback list."""

import logging
import math
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, RichProgressBar, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import make_grid

from ddpm_lightning import metrics
from ddpm_lightning.cluster import SIGNALS, Preempted
from ddpm_lightning.diffusion.posthoc_ema import PowerEMA
from ddpm_lightning.errors import Interrupted
from ddpm_lightning.files import save_png, save_torch

log = logging.getLogger(__name__)


def sample_grid(module, n_per_class: int, n: int, seed: int, sampler: dict | None = None) -> tuple[torch.Tensor, str]:
    """A grid of samples with fixed noise: one row per class for the conditional model, else n images."""
    g = torch.Generator(module.device).manual_seed(seed)
    if module.hparams.conditional:
        names = module.hparams.class_names
        labels = torch.arange(len(names), device=module.device).repeat_interleave(n_per_class)
        images, nrow = module.sample(labels=labels, sampler=sampler, generator=g), n_per_class
        caption = f"rows: {', '.join(names)}; w={module.hparams.guidance['w']}"
    else:
        images, nrow = module.sample(n=n, sampler=sampler, generator=g), math.ceil(math.sqrt(n))
        caption = ", ".join(module.hparams.class_names)
    return make_grid(images, nrow=nrow, padding=2), caption


def at_epoch_end(trainer: L.Trainer) -> bool:
    """Whether this validation comes at the end of the training epoch (not one that trainer.val_check_interval puts
    within it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


class SampleGrid(L.Callback):
    """At each validation (every ``trainer.check_val_every_n_epoch`` epochs), with the EMA weights: a grid of
    samples to ``<run dir>/samples/epoch_XXXX.png`` (``epoch_XXXX_step_YYYYYYY.png`` for a validation within the epoch)
    and, as an image, to W&B."""

    def __init__(self, n_per_class: int = 8, n: int = 64, seed: int = 0):
        self.n_per_class, self.n, self.seed = n_per_class, n, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        try:
            if trainer.fast_dev_run:  # the path, not the picture: one image per class, two DDIM steps
                grid, caption = sample_grid(
                    pl_module, 1, 1, self.seed, {"name": "ddim", "steps": 2, "eta": 0.0, "spacing": "uniform"}
                )
            else:
                grid, caption = sample_grid(pl_module, self.n_per_class, self.n, self.seed)
        except Interrupted:  # a preemption signal: callbacks.Preemption stops the run at the end of this validation
            return
        name = f"epoch_{trainer.current_epoch:04d}" + (
            "" if at_epoch_end(trainer) else f"_step_{trainer.global_step:07d}"
        )
        save_png(grid, Path(trainer.default_root_dir) / "samples" / f"{name}.png", "a sample grid")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "samples", [grid.permute(1, 2, 0).cpu().numpy()], step=trainer.global_step, caption=[caption]
                )


class FIDCallback(L.Callback):
    """Every ``every_n_epochs`` epochs (at a validation, with the EMA weights): metrics.evaluate on ``num_samples``
    images with the configured sampler, fixed seeds and evenly drawn classes; logs val/fid, val/kid_mean, val/kid_std,
    val/is_mean, val/is_std, the 95% intervals (val/fid_ci95_low, ...), the real-data floor (val/fid_floor,
    val/kid_floor) and, with metrics.prc, val/precision and val/recall; for an improved model of several classes the
    class agreement (val/class_acc and its floor); the memorized fraction (val/memorized, val/nn_ratio_median); all
    suffixed _w<w> when several guidance weights are given; and a grid of the first samples. When to evaluate is decided here; how, in metrics.evaluate."""

    def __init__(
        self,
        detector,
        reference: dict,
        floor: dict,
        every_n_epochs: int,
        num_samples: int,
        guidance_ws: list[float | None],
        settings: dict,
        batch_size: int = 250,
    ):
        self.detector, self.reference, self.floor, self.every_n_epochs = detector, reference, floor, every_n_epochs
        self.num_samples, self.guidance_ws, self.settings, self.batch_size = (
            num_samples,
            guidance_ws,
            settings,
            batch_size,
        )
        self.history: list[dict] = []  # every evaluation so far; checkpointed, so a resumed run keeps it

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detector.to(pl_module.device)
        if self.detector.is_unavailable and trainer.is_global_zero:
            log.warning(self.detector.is_unavailable)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs or not at_epoch_end(trainer):
            return  # FID at the validation that ends the epoch, not those within it (trainer.val_check_interval)
        for w in self.guidance_ws:
            try:
                scores, preview = metrics.evaluate(
                    pl_module, self.detector, self.reference, self.num_samples, w, self.settings, self.batch_size
                )
            except (
                Interrupted
            ):  # on every rank (metrics.evaluate agrees on it): Preemption stops the run after this validation
                return
            scores = {
                **scores,
                "fid_floor": self.floor["fid"],
                "kid_floor": self.floor["kid_mean"],
                "class_acc_floor": self.floor.get("class_acc"),
                "memorized_floor": self.floor.get("memorized"),
            }
            suffix = f"_w{w}" if len(self.guidance_ws) > 1 else ""
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "w": w, **scores})
            for name, value in metrics.loggable(
                scores
            ).items():  # the same numbers on every rank (the states are synced)
                pl_module.log(f"val/{name}{suffix}", value)
            if trainer.is_global_zero:
                grid = make_grid(preview, nrow=8, padding=2)
                save_png(
                    grid,
                    Path(trainer.default_root_dir) / "samples" / f"fid_epoch_{trainer.current_epoch:04d}{suffix}.png",
                    "the FID preview grid",
                )
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_image(
                            f"val/fid_samples{suffix}", [grid.permute(1, 2, 0).cpu().numpy()], step=trainer.global_step
                        )


class EMAModel(AveragedModel):
    """torch's AveragedModel with the update count read back from the device once per process rather than twice per
    step (torch's ``update_parameters`` tests ``n_averaged``, a device tensor, with Python ``if``s): the first update
    copies the weights, every later one is ``multi_avg_fn`` over each (device, dtype) group, all queued on the device."""

    started: bool | None = None  # whether an update was made, as read from n_averaged at this process's first update

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        """One EMA update; a step whose update was skipped (``model.update_skipped``, a device 0/1 set
        by DiffusionModule.skip_if_nonfinite) is no update: the EMA and its count stay as they were, with no host read."""
        if self.started is None:
            self.started = bool(
                self.n_averaged > 0
            )  # the one host read (a resumed run's count comes from its checkpoint)
        if self.use_buffers:
            averaged, current = (
                [*self.module.parameters(), *self.module.buffers()],
                [*model.parameters(), *model.buffers()],
            )
        else:
            averaged, current = list(self.parameters()), list(model.parameters())
        skipped = getattr(model, "update_skipped", None)
        groups: dict = {}
        for a, c in zip(averaged, current, strict=True):
            group = groups.setdefault((a.device, a.dtype), ([], []))
            group[0].append(a.detach())
            group[1].append(c.detach().to(a.device))
        for a, c in groups.values():
            if self.started:
                if (
                    skipped is not None
                ):  # averaged + keep (current - averaged): the current weights, or the EMA itself after a skip
                    keep = (1 - skipped).to(a[0].device, a[0].dtype)
                    c = torch._foreach_sub(c, a)
                    torch._foreach_mul_(c, keep)
                    torch._foreach_add_(c, a)
                self.multi_avg_fn(a, c, self.n_averaged)
            else:
                torch._foreach_copy_(a, c)
        self.started = True
        self.n_averaged += 1 if skipped is None else (1 - skipped).to(self.n_averaged.device, self.n_averaged.dtype)


def ema_decay(num_averaged: torch.Tensor, decay: float, warmup: bool) -> torch.Tensor | float:
    """The decay of the next EMA update: fixed, or with warm-up min(decay, (1 + n) / (10 + n)) after n updates, as
    TensorFlow's ExponentialMovingAverage (num_updates) and diffusers' EMAModel; a device tensor, so no host read."""
    return torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay) if warmup else decay


def ema_multi_avg_fn(decay: float, warmup: bool = True):
    """theta_ema <- d theta_ema + (1 - d) theta for a group of tensors, all on the device (d: ema_decay)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        d = ema_decay(num_averaged, decay, warmup)
        if not torch.is_tensor(d):
            torch._foreach_lerp_(averaged, current, 1 - d)  # as torch's get_ema_multi_avg_fn
            return
        # a device tensor as a foreach *scalar* would be read back to the host: theta_ema += (1 - d) (theta - theta_ema)
        step = torch._foreach_sub(current, averaged)
        torch._foreach_mul_(step, (1 - d).to(averaged[0].device, averaged[0].dtype))
        torch._foreach_add_(averaged, step)

    return update


class EMA(WeightAveraging):
    """Lightning's WeightAveraging with an exponential moving average of the weights, theta_ema <- d theta_ema +
    (1 - d) theta after every optimizer step (foreach ops), and no host read per step (EMAModel). A step that a
    non-finite loss skipped is no step for the EMA either (Lightning's WeightAveraging would average it in). With
    ``warmup`` the decay d rises as min(decay, (1 + n) / (10 + n)), so short runs and early evaluations do not
    sample from weights that are mostly the initial ones (0.9999^3900 = 68% of them after 3,900 steps)."""

    def __init__(self, decay: float = 0.9999, warmup: bool = True):
        super().__init__(multi_avg_fn=ema_multi_avg_fn(decay, warmup))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = EMAModel(
                pl_module, device=self._device or pl_module.device, use_buffers=self._use_buffers, **self._kwargs
            )


class PostHocEMA(L.Callback):
    """Power-function EMAs of the training weights at the lengths ``sigma_rels`` (diffusion/posthoc_ema.py), saved
    every ``every_n_steps`` optimizer steps and at the end of training as <run dir>/posthoc_ema/step_<t>.pt, from
    which evaluate.py and sample.py reconstruct the EMA of any length (ema_length=sigma_rel). The EMAs are in the
    checkpoints, so a resumed run continues them exactly; a snapshot is one net's weights per length."""

    def __init__(self, directory: Path, every_n_steps: int, sigma_rels: list[float]):
        self.directory, self.every_n_steps, self.sigma_rels = Path(directory), every_n_steps, list(sigma_rels)
        self.ema: PowerEMA | None = None
        self.t, self.saved, self.restored = 0, 0, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema = PowerEMA(list(pl_module.net.parameters()), self.sigma_rels)
        if self.restored is not None:
            self.t = self.saved = self.restored["t"]
            for average, stored in zip(self.ema.averages, self.restored["averages"], strict=True):
                torch._foreach_copy_(average, [a.to(average[0].device) for a in stored])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.t:  # no optimizer step yet (accumulating)
            return
        self.t = trainer.global_step
        self.ema.update(list(pl_module.net.parameters()), self.t)
        if self.t % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.t > self.saved:
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved = self.t
        if trainer.is_global_zero:
            names = [name for name, _ in pl_module.net.named_parameters()]
            weights = [{n: a.cpu() for n, a in zip(names, average, strict=True)} for average in self.ema.averages]
            snapshot = {"step": self.t, "sigma_rels": self.sigma_rels, "weights": weights}
            save_torch(snapshot, self.directory / f"step_{self.t:07d}.pt", "a post-hoc EMA snapshot")

    def state_dict(self) -> dict:
        return {"t": self.t, "averages": [[a.cpu() for a in average] for average in self.ema.averages]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training loss read back from the device once per ``refresh_rate``
    steps (it is logged without ``prog_bar``, which Lightning would convert to a number after every step)."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.loss: float | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if trainer.training and (self.loss is None or trainer.global_step % self.refresh_rate == 0):
            loss = trainer.callback_metrics.get("train/loss_step")  # gathered only when it is read
            self.loss = self.loss if loss is None else loss.item()
        if self.loss is not None:
            items["loss"] = f"{self.loss:.4g}"
        return items


class ETA(L.Callback):
    """Says at start-up how long the training steps will take, at the speed of steps ``first``..``first + count``
    (the first ones include compilation and warm-up; only the steps are timed, not validation between them); on a
    CPU, a run of over an hour names the CPU-sized presets."""

    def __init__(self, first: int = 2, count: int = 5):
        self.first, self.count, self.started, self.seconds, self.timed = first, count, None, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if (
            trainer.fast_dev_run
            or not trainer.is_global_zero
            or self.timed >= self.count
            or trainer.global_step <= self.first
        ):
            return
        self.seconds += time.perf_counter() - self.started
        self.timed += 1
        if self.timed < self.count:
            return
        per_step = self.seconds / self.count * trainer.accumulate_grad_batches  # an optimizer step's batches
        left_steps = max(trainer.estimated_stepping_batches - trainer.global_step, 0)
        msg = (
            f"speed: {per_step:.3g} s per optimizer step; the {left_steps} steps left take about {duration(left_steps * per_step)} "
            "(validation, sample grids and FID come on top)"
        )
        if pl_module.device.type == "cpu" and left_steps * per_step > 3600:
            log.warning(
                msg + "; this is a GPU recipe: on a CPU try experiment=smoke (about a minute) or experiment=paper_cpu "
                "(the paper's whole experiment in about an hour: make paper ARGS=experiment=paper_cpu)"
            )
        else:
            log.info(msg)


def duration(seconds: float) -> str:
    """Seconds as '45 s', '62 min', '7.5 h' or '21.0 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def last_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """<dirpath>/last.ckpt, overwritten at the end of every epoch (atomically: files.checkpoint_io)."""
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=True
    )


class Preemption(Checkpoint):  # a Checkpoint: its epoch-end hook runs after the module's
    """Acts on a preemption signal (SIGUSR2 or $SUBMITIT_PREEMPT_SIGNAL, SIGUSR1, SIGTERM; cluster.SIGNALS records it):
    every rank stops at the same point, rank 0 writes last.ckpt (atomically: files.checkpoint_io) and cluster.Preempted
    ends fit(), so no epoch-end save overwrites it. The points: the next training step (under DDP the ranks agree every
    ``sync_every`` steps), or the end of the validation in progress, whose sample grid and FID sampling stop at their
    next sampler step (DiffusionModule.stop_check) and log nothing. train.run requeues the job and exits."""

    def __init__(self, last_ckpt: Path, sync_every: int = 10):
        self.last_ckpt, self.sync_every = Path(last_ckpt), sync_every

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        SIGNALS.install()  # again: Lightning registered its own SIGTERM handler when fit started; one owner per signal
        SIGNALS.stage = "training"
        pl_module.stop_check = SIGNALS.requested

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        SIGNALS.stage = "done"
        pl_module.stop_check = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if at_epoch_end(trainer):  # the epoch's end (its validation, mean loss, checkpoint) comes first: see below
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # within an accumulated update: in no checkpoint
            return
        if trainer.world_size > 1 and trainer.global_step % self.sync_every:
            return
        self.stop_if_requested(trainer, "after", log_this_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal during an epoch's last step stops here, after the epoch's validation (run, or cut and redone on
        resume) and the module's epoch-end hook (Lightning calls a Checkpoint's hook after the module's), with the
        epoch's row (its mean loss) written first, as Lightning would right after this hook: a resumed run does not
        replay the epoch's end, so the log lacks no row."""
        self.stop_if_requested(trainer, "after", log_this_epoch=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # after the grid, FID and the EMA swap-back (callbacks before this one)
            self.stop_if_requested(trainer, "during the validation after", redo_validation=True)

    def stop_if_requested(
        self,
        trainer: L.Trainer,
        where: str,
        log_this_step: bool = False,
        redo_validation: bool = False,
        log_this_epoch: bool = False,
    ) -> None:
        signum = agreed_signal(trainer)
        if signum:
            if (
                log_this_step
            ):  # what Lightning does right after on_train_batch_end, which the stop skips: the step's log row
                trainer._logger_connector.on_batch_end()
                trainer._logger_connector.update_train_step_metrics()
            if log_this_epoch:  # fit_loop.on_advance_end's logging after the epoch-end hooks
                loop = trainer.fit_loop.epoch_loop
                trainer._logger_connector.on_epoch_end()
                loop._batches_that_stepped -= 1
                trainer._logger_connector.update_train_epoch_metrics()
                loop._batches_that_stepped += 1
            if redo_validation:
                validation_not_started(trainer)
            trainer.save_checkpoint(self.last_ckpt)  # the rows above are on disk: Lightning saves the CSV per log
            raise Preempted(
                signum,
                f"{signal.Signals(signum).name} {where} step {trainer.global_step} (epoch {trainer.current_epoch}): "
                f"saved {self.last_ckpt} and stopped",
            )


def validation_not_started(trainer: L.Trainer) -> None:
    """The validation that a signal cut (its grid and FID stopped, nothing of it logged) as Lightning's loops record a
    validation interrupted at its first batch, in the checkpoint about to be saved: on resume Lightning runs it
    again from its first batch (its 'restart mid evaluation'), so the epoch's val/loss, grid and FID appear once."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    total, current = loop.batch_progress.total, loop.batch_progress.current
    before = total.completed - current.completed  # batches of the validations before this one
    total.ready = total.started = before + 1
    total.processed = total.completed = before
    current.ready = current.started = 1
    current.processed = current.completed = 0
    loop._results.reset()  # its val/loss so far: the rerun adds every batch again


def agreed_signal(trainer: L.Trainer) -> int:
    """The signal every rank acts on (0: none): under DDP the ranks' signals are gathered, and a time-limit signal (which
    requeues) wins over SIGTERM, so rank 0 requeues even when the signal reached another rank first."""
    mine = int(SIGNALS.received or 0)
    if trainer.world_size == 1:
        return mine
    got = trainer.strategy.all_gather(torch.tensor(mine, device=trainer.strategy.root_device)).flatten().tolist()
    requeue = [s for s in got if s and s != signal.SIGTERM]
    return requeue[0] if requeue else max(got)


class TrainingStarted(L.Callback):
    """Marks the first finished training step: a failure before it is a start-up error (one line, exit 2)."""

    stepped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped = True
