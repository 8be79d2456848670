"""DiffusionModule: the U-Net, Algorithm 1's loss, Adam, and the one sample() API."""

import logging
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ddpm_lightning.data import step_seed
from ddpm_lightning.diffusion.guidance import drop_labels, guided
from ddpm_lightning.diffusion.samplers import StepCallback, get_sampler
from ddpm_lightning.diffusion.schedule import Schedule, build_schedule
from ddpm_lightning.errors import ConfigError, Interrupted, NonFiniteLoss
from ddpm_lightning.nets.unet import UNet

log = logging.getLogger(__name__)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class DiffusionModule(L.LightningModule):
    """eps_theta trained with ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t)||^2.

    With ``conditional`` the net also takes a class label (classifier-free guidance, the "improved"
    model): labels are dropped to the null class with probability ``p_uncond`` during training.
    Every argument is a plain value, so a checkpoint alone rebuilds the module. Speed options: ``compile``
    (torch.compile of the U-Net for training, and for sampling with static shapes: CUDA graphs on a GPU),
    ``channels_last`` (NHWC convolutions) and ``bf16_sampling`` (bf16 autocast of the sampling calls).
    Training levers beyond the paper (conf/recipe; the defaults are the paper's): ``loss_weighting`` ("none" or
    "min_snr" with ``snr_gamma``), a linear LR warm-up over ``warmup_steps`` then ``lr_decay`` ("constant" or
    "cosine" to 0 at the last step), Adam's ``betas`` and ``weight_decay`` (decoupled, AdamW, when > 0) and
    ``dropout`` in the residual blocks; gradient clipping is the Trainer's ``gradient_clip_val``.
    """

    def __init__(self, net: dict, schedule: dict, class_names: list[str], conditional: bool, p_uncond: float,
                 guidance_w: float, sampler: dict, lr: float = 1e-3, image_size: int = 32, seed: int = 0,
                 max_nonfinite: int = 10, nonfinite_check_every: int = 10, compile: bool = False, channels_last: bool = False,
                 bf16_sampling: bool = False, loss_weighting: str = "none", snr_gamma: float = 5.0, warmup_steps: int = 0,
                 lr_decay: str = "constant", betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        if not 0 <= p_uncond <= 1:
            raise ConfigError(f"guidance.p_uncond={p_uncond} must lie in [0, 1]")
        if not conditional and (p_uncond != 0 or guidance_w != 0):
            raise ConfigError(f"guidance (w={guidance_w}, p_uncond={p_uncond}) given to the unconditional model; use model=improved, or guidance=none with model=simple")
        if lr_decay not in ("constant", "cosine"):
            raise ConfigError(f"recipe.lr_decay={lr_decay!r} is unknown; use constant or cosine")
        get_sampler(sampler.get("name"))
        self.save_hyperparameters()
        self.net = UNet(**net, num_classes=len(class_names) if conditional else None, image_size=image_size, dropout=dropout)
        self.schedule: Schedule = build_schedule(**schedule)
        self.schedule.loss_weights(loss_weighting, snr_gamma)  # an unknown weighting fails here, before training
        self.nonfinite_run = None  # consecutive non-finite losses, counted on the device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.compiled: dict = {}  # "train" / "sample": the compiled U-Net (not a submodule), or the U-Net after a failure
        self.stop_requested = None  # during training, callbacks.Preemption's test: sampling stops at the next step when true
        self.skipped = None  # during training, 1 (on the device) when the last update was skipped (a non-finite loss)
        self.epoch_loss = None  # (epoch, [sum of loss x images, images]) so far, on the device, kept in checkpoints

    def setup(self, stage: str) -> None:
        """torch.compile for training, after Lightning's EMA callback has copied the module."""
        if stage == "fit" and self.hparams.compile:
            self.compiled["train"] = torch.compile(self.net)

    def call_net(self, use: str, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta through the compiled U-Net of ``use`` ("train" or "sample") when there is one; if torch.compile
        fails, one warning and eager from then on."""
        net = self.compiled.get(use, self.net)
        try:
            return net(x_t, t, y)
        except Exception as e:
            if net is self.net:
                raise
            log.warning(f"torch.compile of the U-Net failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); running it eagerly")
            self.compiled[use] = self.net
            return self.net(x_t, t, y)

    def forward_train(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.call_net("train", x_t, t, y)

    def forward_sample(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta as the samplers call it: every call has the same shapes, so with compile=True the U-Net is
        compiled once (fullgraph, static shapes) and on a GPU captured as CUDA graphs (mode reduce-overhead) that
        each step replays; the output is used before the next call reuses its memory. fp32 out, also under bf16."""
        if self.hparams.compile and "sample" not in self.compiled:
            mode = "reduce-overhead" if x_t.device.type == "cuda" else None
            self.compiled["sample"] = torch.compile(self.net, mode=mode, fullgraph=True, dynamic=False)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.hparams.bf16_sampling):
            return self.call_net("sample", x_t, t, y).float()

    @property
    def sched(self) -> Schedule:
        """The schedule's tensors on the module's device."""
        if self.schedule.device != self.device:
            self.schedule.to(self.device)
        return self.schedule

    def loss(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, net=None,
             weighting: str = "none") -> torch.Tensor:
        """Algorithm 1: t ~ Uniform({1..T}) (0-based index here), eps ~ N(0, I), MSE on the noise; with a
        ``weighting`` other than the paper's "none", each image's squared error is weighted by w_t."""
        sched = self.sched
        t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = sched.q_sample(x0, t, eps).contiguous(memory_format=self.memory_format)  # eq. 3
        y = drop_labels(y, self.hparams.p_uncond, self.net.null_class, generator) if self.hparams.conditional else None
        eps_theta = (net or self.net)(x_t, t, y).float()
        if weighting == "none":
            return F.mse_loss(eps_theta, eps)  # eq. 14
        w_t = sched.loss_weights(weighting, self.hparams.snr_gamma)[t]
        return (w_t * (eps_theta - eps).square().flatten(1).mean(1)).mean()

    def training_step(self, batch, batch_idx):
        seed = step_seed(self.hparams.seed, self.global_step, self.global_rank)
        if self.hparams.dropout:
            torch.manual_seed(seed)  # dropout draws from the global generator: per step, so a resumed run drops the same units
        g = torch.Generator(self.device).manual_seed(seed)
        loss = self.loss(*batch, generator=g, net=self.forward_train, weighting=self.hparams.loss_weighting)
        self.skip_if_nonfinite(loss)
        n = batch[0].shape[0]
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)  # no prog_bar: see ProgressBar
        total = torch.stack([loss.detach() * n, loss.new_tensor(float(n))])
        e = self.epoch_loss
        self.epoch_loss = (self.current_epoch, total if e is None or e[0] != self.current_epoch else e[1].to(total.device) + total)
        return loss

    def on_train_epoch_end(self) -> None:
        """The epoch's mean loss, by hand: Lightning's on_epoch mean is not in its checkpoints, so after a mid-epoch
        resume it would be the mean of the steps since the resume."""
        if self.epoch_loss is not None and self.epoch_loss[0] == self.current_epoch:
            total = self.epoch_loss[1]
            self.log("train/loss_epoch", total[0] / total[1], on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.epoch_loss is not None:
            checkpoint["epoch_loss"] = {"epoch": self.epoch_loss[0], "total": self.epoch_loss[1].cpu()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        e = checkpoint.get("epoch_loss")
        self.epoch_loss = None if e is None else (e["epoch"], e["total"])

    def skip_if_nonfinite(self, loss: torch.Tensor) -> None:
        """A NaN or infinite loss skips the update on the device, with no host sync: the fused Adam step reads
        ``found_inf`` as it does under a grad scaler, so weights, optimizer state and EMA stay as they were. Every
        ``nonfinite_check_every`` steps the count of consecutive skips is read, and ``max_nonfinite`` of them stop
        the run."""
        bad = (~torch.isfinite(loss.detach())).float()
        self.optimizers().optimizer.found_inf = bad
        self.skipped = bad  # callbacks.EMAModel makes no EMA update for a skipped step
        self.nonfinite_run = bad if self.nonfinite_run is None else (self.nonfinite_run + 1) * bad
        hp = self.hparams
        if (self.global_step + 1) % hp.nonfinite_check_every == 0 and int(self.nonfinite_run.item()) >= hp.max_nonfinite:
            raise NonFiniteLoss(
                f"training stopped at step {self.global_step} (epoch {self.current_epoch}): the loss was not finite for "
                f"{int(self.nonfinite_run.item())} consecutive steps (updates skipped: weights, optimizer and EMA are the "
                "last good ones, as is the last checkpoint); lower model.lr or check the data, then resume with ckpt_path=last")

    def validation_step(self, batch, batch_idx):
        """The paper's loss (unweighted, whatever the recipe) on held-out images, with noise fixed per batch so epochs
        and recipes compare."""
        g = torch.Generator(self.device).manual_seed(batch_idx * self.trainer.world_size + self.global_rank)
        loss = self.loss(*batch, generator=g)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        adam = torch.optim.AdamW if hp.weight_decay else torch.optim.Adam
        optimizer = adam(self.net.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=True)
        if not hp.warmup_steps and hp.lr_decay == "constant":
            return optimizer  # the paper: a constant rate
        total = []  # the run's steps, read after the first update: estimated_stepping_batches sets up the data, and here, before
        # a resumed run's loop state is restored, that made a mid-epoch resume draw other batches than the uninterrupted run

        def factor(step: int) -> float:
            if step and not total:
                total.append(self.trainer.estimated_stepping_batches)
            return lr_factor(step, hp.warmup_steps, hp.lr_decay, total[0] if total else 1)  # step 0: the same for any total

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def sample(self, n: int | None = None, labels: torch.Tensor | None = None, w: float | None = None,
               sampler: dict | None = None, generator: torch.Generator | None = None, batch_size: int = 500,
               callback: StepCallback = None) -> torch.Tensor:
        """Generate images as uint8 (N, 3, H, W) with the module's current weights.

        Unconditional: ``n`` images. Conditional: one image per entry of ``labels`` (class indices
        0..K-1), guided with weight ``w`` (default: the configured guidance.w). ``sampler`` replaces the
        configured sampler settings (one conf/sampler/*.yaml, e.g. ``{"name": "ddim", "steps": 50, ...}``).
        Images are generated ``batch_size`` at a time; ``callback(i, x)`` sees every intermediate state.
        """
        hp = self.hparams
        if hp.conditional:
            if labels is None:
                raise ConfigError("the conditional model needs the labels of the classes to generate")
            labels = torch.as_tensor(labels, device=self.device)
            n = len(labels)
        elif labels is not None or (w or 0) != 0:
            raise ConfigError("the unconditional model (model=simple) takes no labels and no guidance weight")
        w = hp.guidance_w if w is None else w
        settings = dict(sampler or hp.sampler)
        run_sampler = get_sampler(settings.pop("name"))
        out = []
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            y = labels[start : start + size] if hp.conditional else None
            x_T = torch.randn((size, 3, hp.image_size, hp.image_size), device=self.device, generator=generator)
            eps_fn = stoppable(guided(self.forward_sample, y, w, self.net.null_class), self.stop_requested)
            out.append(to_uint8(run_sampler(eps_fn, self.sched, x_T, generator=generator, callback=callback, **settings)))
        return torch.cat(out)


def lr_factor(step: int, warmup_steps: int, decay: str, total_steps: float) -> float:
    """The learning rate of update ``step`` (0-based) over the peak: linear warm-up (step + 1) / warmup_steps, then
    1 (constant) or the cosine (1 + cos(pi p)) / 2 over the progress p of the steps after the warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def stoppable(eps_fn, stop_requested):
    """eps_fn that raises Interrupted, before the next sampler step, once ``stop_requested()`` is true."""
    if stop_requested is None:
        return eps_fn

    def checked(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if stop_requested():
            raise Interrupted("a preemption signal arrived while sampling")
        return eps_fn(x, t)

    return checked


def pick_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_checkpoint(path: str, device: str = "auto", **speed) -> DiffusionModule:
    """A trained module from a train.py checkpoint (its state_dict holds the EMA weights), in eval mode; ``speed``
    (compile, channels_last, bf16_sampling) replaces the checkpoint's, which are those of the training machine."""
    if not path or not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist; pass ckpt=PATH to a .ckpt file written by train.py")
    try:
        module = DiffusionModule.load_from_checkpoint(path, map_location=pick_device(device), weights_only=True, **speed)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass a checkpoint written by train.py") from None
    return module.eval()
