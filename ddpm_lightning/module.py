"""DiffusionModule: the thin Lightning shell around the U-Net, the loss of diffusion/loss.py, Adam and its schedule."""

import logging
import math
from pathlib import Path

import lightning as L
import torch

from ddpm_lightning.data import step_seed
from ddpm_lightning.diffusion.generate import generate
from ddpm_lightning.diffusion.loss import DiffusionLoss
from ddpm_lightning.diffusion.posthoc_ema import reconstruct
from ddpm_lightning.diffusion.schedule import Schedule, build_schedule
from ddpm_lightning.errors import ConfigError, NonFiniteLoss
from ddpm_lightning.nets.speed import FastNet
from ddpm_lightning.nets.unet import UNet

log = logging.getLogger(__name__)


class DiffusionModule(L.LightningModule):
    """eps_theta(x_t, t[, c]) trained with Algorithm 1 (diffusion.loss), sampled by diffusion.generate.

    Settings come as the config groups (net, schedule, guidance, recipe, speed, sampler: plain dicts, so a checkpoint
    alone rebuilds the module; checked where the config is composed, schema.check) and ``conditional`` (the improved
    model: labels, dropped to the null class with probability guidance.p_uncond in training). The interface the
    callbacks use: ``update_skipped`` (a device 0/1 for the last update, 1 when a non-finite loss skipped it) and
    ``stop_check`` (during training, a test that stops sampling at its next step: callbacks.Preemption sets it).
    """

    def __init__(self, net: dict, schedule: dict, guidance: dict, recipe: dict, speed: dict, sampler: dict,
                 class_names: list[str], conditional: bool, lr: float, seed: int = 0, image_size: int = 32,
                 max_nonfinite: int = 10, nonfinite_check_every: int = 10):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        num_classes = len(class_names) if conditional else None
        self.net = UNet(**net, num_classes=num_classes, image_size=image_size, dropout=recipe["dropout"])
        self.schedule: Schedule = build_schedule(**schedule)
        self.fast = FastNet(self.net, **speed)
        common = dict(
            p_uncond=guidance["p_uncond"], null_class=self.net.null_class, memory_format=self.fast.memory_format
        )
        draw = {k: recipe[k] for k in ("timesteps", "timestep_center", "timestep_width", "immiscible")}
        self.loss = DiffusionLoss(self.schedule, recipe["loss_weighting"], recipe["snr_gamma"], **draw, **common)
        self.paper_loss = DiffusionLoss(self.schedule, **common)  # validation: the paper's loss, whatever the recipe
        self.update_skipped: torch.Tensor | None = None
        self.stop_check = None
        self.nonfinite_run = None  # consecutive non-finite losses, counted on the device
        self.epoch_loss = None  # (epoch, [sum of loss x images, images]) so far, on the device, kept in checkpoints
        self.lr_schedule = LRSchedule(recipe["warmup_steps"], recipe["lr_decay"], self.optimizer_steps)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # after Lightning's EMA callback has copied the module
            self.fast.compile_for_training()

    def on_fit_start(self) -> None:
        self.schedule.to(self.device)

    @property
    def sched(self) -> Schedule:
        """The schedule's tensors on the module's device."""
        if self.schedule.device != self.device:
            self.schedule.to(self.device)
        return self.schedule

    def labels(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.hparams.conditional else None

    def training_step(self, batch, batch_idx):
        micro = batch_idx % self.trainer.accumulate_grad_batches  # the batch's place in an accumulated update
        seed = step_seed(self.hparams.seed, self.global_step, self.global_rank, micro=micro)
        if self.hparams.recipe["dropout"]:  # dropout draws from the global generator: seeded per step for resume
            torch.manual_seed(seed)
        x0, y = batch
        loss = self.loss(self.fast.train, x0, self.labels(y), torch.Generator(self.device).manual_seed(seed))
        self.skip_if_nonfinite(loss, micro)
        n = x0.shape[0]
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)  # no prog_bar: see ProgressBar
        total = torch.stack([loss.detach() * n, torch.ones_like(loss.detach()) * n])  # no tensor from host data
        e = self.epoch_loss
        same = e is not None and e[0] == self.current_epoch
        self.epoch_loss = (self.current_epoch, e[1].to(total.device) + total if same else total)
        return loss

    def on_train_epoch_end(self) -> None:
        """The epoch's mean loss, by hand: Lightning's on_epoch mean is not in its checkpoints."""
        if self.epoch_loss is not None and self.epoch_loss[0] == self.current_epoch:
            total = self.epoch_loss[1]
            self.log("train/loss_epoch", total[0] / total[1], on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lr_plan"] = self.lr_schedule.plan
        if self.epoch_loss is not None:
            checkpoint["epoch_loss"] = {"epoch": self.epoch_loss[0], "total": self.epoch_loss[1].cpu()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # before configure_optimizers
        e, self.lr_schedule.plan = checkpoint.get("epoch_loss"), checkpoint.get("lr_plan")
        self.epoch_loss = None if e is None else (e["epoch"], e["total"])

    def skip_if_nonfinite(self, loss: torch.Tensor, micro: int = 0) -> None:
        """A NaN or infinite loss skips the update on the device, with no host sync: the fused Adam step reads
        ``found_inf`` as under a grad scaler, so weights, optimizer state and EMA stay as they were (an accumulated
        update is skipped if any of its batches was). Every ``nonfinite_check_every`` steps the count of consecutive
        non-finite losses is read (the one host read of a step)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if micro:
            bad = torch.maximum(bad, self.update_skipped)
        self.optimizers().optimizer.found_inf = bad
        self.update_skipped = bad
        self.nonfinite_run = bad if self.nonfinite_run is None else (self.nonfinite_run + 1) * bad
        hp = self.hparams
        check = (self.global_step + 1) % hp.nonfinite_check_every == 0 and not micro
        if check and int(self.nonfinite_run.item()) >= hp.max_nonfinite:
            raise NonFiniteLoss(
                f"training stopped at step {self.global_step} (epoch {self.current_epoch}): the loss was not finite for "
                f"{int(self.nonfinite_run.item())} consecutive steps (updates skipped: weights, optimizer and EMA are the "
                "last good ones, as is the last checkpoint); lower model.lr or check the data, then resume with ckpt_path=last"
            )

    def validation_step(self, batch, batch_idx):
        """The paper's loss (unweighted, whatever the recipe), with noise fixed per batch so epochs and recipes compare."""
        g = torch.Generator(self.device).manual_seed(batch_idx * self.trainer.world_size + self.global_rank)
        x0, y = batch
        loss = self.paper_loss(self.net, x0, self.labels(y), g)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """recipe.grad_clip by norm, as Lightning's Precision does it: its mixed-precision plugin refuses any clipping
        for a fused optimizer (fearing a grad scaler's unscaling; bf16 has none), and fused Adam is the default."""
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)

    def configure_optimizers(self):
        return adam_and_schedule(self.net.parameters(), self.hparams.lr, self.hparams.recipe, self.lr_schedule)

    def optimizer_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)  # read after the first update, when the loop knows it

    @torch.no_grad()
    def sample(self, n=None, labels=None, w=None, sampler=None, generator=None, batch_size=500, callback=None):
        """uint8 (N, 3, H, W) images with the current weights: ``n`` of them (unconditional), or one per label (class
        indices), guided with weight ``w`` (default guidance.w); ``sampler``: a conf/sampler dict (default the run's);
        ``callback(i, x)`` sees every intermediate state."""
        hp = self.hparams
        if hp.conditional:
            labels = torch.as_tensor(labels, device=self.device)
            n, w = len(labels), hp.guidance["w"] if w is None else w
        shape = (3, hp.image_size, hp.image_size)
        y = labels if hp.conditional else None
        return generate(self.fast.sample, self.sched, sampler or hp.sampler, n, shape, y, w or 0.0, self.net.null_class,
                        generator, batch_size, callback, self.stop_check)  # fmt: skip


def adam_and_schedule(params, lr: float, recipe: dict, schedule: "LRSchedule"):
    """Adam (AdamW with ``recipe["weight_decay"]``), fused, with the recipe's betas; with a warm-up or a cosine decay,
    also Lightning's per-step LR schedule, whose factors ``schedule`` gives."""
    adam = torch.optim.AdamW if recipe["weight_decay"] else torch.optim.Adam
    optimizer = adam(params, lr=lr, betas=tuple(recipe["betas"]), weight_decay=recipe["weight_decay"], fused=True)
    if not recipe["warmup_steps"] and recipe["lr_decay"] == "constant":
        return optimizer  # the paper: a constant rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step)
    )  # its plan: in on_save_checkpoint
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LRSchedule:
    """The LR factor of each update (lr_factor): the warm-up, then constant or a cosine to 0 at the run's last step.
    The run's length (``total_steps()``, read after the first update) is kept in the checkpoint with the cosine's
    start as ``plan``. A resume whose settings give another length (a larger trainer.max_epochs, to train on) keeps
    the rate reached and decays it by a cosine over the new remaining steps, with one log line: no jump."""

    def __init__(self, warmup_steps: int, decay: str, total_steps):
        self.warmup_steps, self.decay, self.total_steps = warmup_steps, decay, total_steps
        self.plan: dict | None = None  # the cosine: from update "start" at "factor" to 0 at update "total"
        self.checked = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps or self.decay == "constant":
            return lr_factor(step, self.warmup_steps, self.decay, 1)
        if step and not self.checked:  # the first update of this process
            self.checked, total = True, self.total_steps()
            if self.plan is None:
                self.plan = {"start": self.warmup_steps, "factor": 1.0, "total": total}
            elif total != self.plan["total"]:
                factor = self.cosine(step)
                log.info(
                    f"the run's length changed from {self.plan['total']} to {total} optimizer steps: the cosine LR "
                    f"decay goes on from its factor {factor:.4f} at step {step} and reaches 0 at step {total}"
                )
                self.plan = {"start": step, "factor": factor, "total": total}
        return self.cosine(step)

    def cosine(self, step: int) -> float:
        if self.plan is None:  # update 0, before the length is known
            return 1.0
        return self.plan["factor"] * cosine(step, self.plan["start"], self.plan["total"])


def lr_factor(step: int, warmup_steps: int, decay: str, total_steps: float) -> float:
    """The learning rate of update ``step`` (0-based) over the peak: linear warm-up (step + 1) / warmup_steps, then
    1 (constant) or the cosine (1 + cos(pi p)) / 2 over the progress p of the steps after the warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0 if decay == "constant" else cosine(step, warmup_steps, total_steps)


def cosine(step: int, start: int, end: float) -> float:
    """(1 + cos(pi p)) / 2 over the progress p of ``step`` from ``start`` to ``end`` (0 after it)."""
    return 0.5 * (1 + math.cos(math.pi * min((step - start) / max(1.0, end - start), 1.0)))


# settings added since a checkpoint may have been written, with the values that reproduce what it was trained with
ADDED = {"recipe": dict(timesteps="uniform", timestep_center=0.0, timestep_width=2.0, immiscible=False)}


def upgrade_hparams(hparams: dict) -> dict:
    """The settings of any checkpoint train.py wrote, in today's form: the flat arguments of one written before the
    module took config groups (22 of them) as groups, and the settings added since with their old behaviour."""
    h = dict(hparams) if "guidance" in hparams else flat_to_groups(hparams)
    h["recipe"] = {**ADDED["recipe"], **h["recipe"]}
    if h["schedule"]["kind"] == "linear":
        h["schedule"] = {"rescale": False, **h["schedule"]}
    return h


def flat_to_groups(hparams: dict) -> dict:
    h = dict(hparams)
    recipe_keys = ("loss_weighting", "snr_gamma", "warmup_steps", "lr_decay", "betas", "weight_decay", "dropout")
    return {
        "net": h["net"],
        "schedule": h["schedule"],
        "guidance": {"p_uncond": h["p_uncond"], "w": h["guidance_w"]},
        "recipe": {"grad_clip": None, **{k: h[k] for k in recipe_keys}},
        "speed": {k: h[k] for k in ("compile", "channels_last", "bf16_sampling")},
        "sampler": h["sampler"],
        "class_names": h["class_names"],
        "conditional": h["conditional"],
        "lr": h["lr"],
        "seed": h["seed"],
        "image_size": h["image_size"],
        "max_nonfinite": h["max_nonfinite"],
        "nonfinite_check_every": h["nonfinite_check_every"],
    }


def load_checkpoint(path: str, device: str = "auto", ema_length: float | None = None, **speed) -> DiffusionModule:
    """A trained module from a train.py checkpoint (its state_dict holds the EMA weights), in eval mode; ``speed``
    (compile, channels_last, bf16_sampling) replaces the checkpoint's, which are those of the training machine.
    ``ema_length``: the weights are instead the post-hoc EMA of that sigma_rel (posthoc_weights)."""
    if not path or not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist; pass ckpt=PATH to a .ckpt file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hparams = upgrade_hparams(ckpt["hyper_parameters"])
        hparams["speed"] |= {k: v for k, v in speed.items() if k != "profile"}  # the profile chose these values
        module = DiffusionModule(**hparams)
        module.load_state_dict(ckpt["state_dict"])
        step = int(ckpt["global_step"])
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ConfigError(
            f"cannot load checkpoint {path} ({type(e).__name__}: {first}); pass a checkpoint written by train.py"
        ) from None
    if ema_length is not None:
        module.net.load_state_dict(posthoc_weights(path, step, ema_length), strict=False)  # parameters; no buffers
    return module.to(pick_device(device)).eval()


def posthoc_weights(path: str, step: int, ema_length: float) -> dict[str, torch.Tensor]:
    """The net's parameters as the EMA of length ``ema_length`` (sigma_rel), reconstructed from the snapshots that
    train.py's callbacks.posthoc_ema wrote to the run dir of checkpoint ``path`` (<run dir>/checkpoints/x.ckpt),
    at the last snapshot at or before the checkpoint's step."""
    directory = Path(path).resolve().parents[1] / "posthoc_ema"
    snapshots = []
    for p in sorted(directory.glob("step_*.pt")):
        if int(p.stem.removeprefix("step_")) > step:  # PostHocEMA names each snapshot by its step: not read
            continue
        try:
            snapshots.append(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ConfigError(f"cannot read post-hoc EMA snapshot {p} ({type(e).__name__}); move it away") from None
    if not snapshots:
        raise ConfigError(
            f"ema_length={ema_length} needs post-hoc EMA snapshots at or before step {step} in {directory}, and "
            f"there are none; train with callbacks.posthoc_ema.every_n_steps=N, or leave ema_length=null"
        )
    last = max(s["step"] for s in snapshots)
    log.info(f"post-hoc EMA: sigma_rel={ema_length} at step {last} from {len(snapshots)} snapshots in {directory}")
    return reconstruct(snapshots, last, ema_length)


def pick_device(name: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
