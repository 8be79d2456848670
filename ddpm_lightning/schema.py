"""The settings' schema: a dataclass per config group and entry point, registered in Hydra's ConfigStore as the base
of each group (the yaml files in conf/ are the presets users read; each extends its group's schema), so a wrong type
or an unknown key fails when the config is composed. ``check`` tests ranges, choices and relations right after
composition, in one place, before any data is read or anything is written; ``help_text`` and ``settings_table`` are
--help and the README's table, made from the same fields."""

import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, List, Optional, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING as REQUIRED
from omegaconf import DictConfig, ListConfig, OmegaConf

from ddpm_lightning.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def setting(help: str, choices: list | None = None, node=None, default=REQUIRED):
    """A typed field with its one-line description (and its allowed values, when it is a choice). No default: the
    values are those of the yaml presets in conf/ (``node``: a nested schema; ``default``: only for an optional group)."""
    kind = {"default_factory": node} if node is not None else {"default": default}
    return field(**kind, metadata={"help": help, "choices": choices})


# ---- config groups -------------------------------------------------------------------------------------------------


@dataclass
class NetConfig:
    width: int = setting("channels of the U-Net's first level (levels: width, 2 width, 4 width)")
    emb_dim: int = setting("size of the timestep (and class) embedding")
    heads: int = setting("attention heads; must divide width")
    attention: List[int] = setting("resolutions whose blocks get self-attention (the paper: all of 32, 16, 8, 4)")


@dataclass
class LinearSchedule:
    kind: str = setting("the variance schedule", ["linear", "cosine"])
    T: int = setting("diffusion steps")
    beta_1: float = setting("beta of the first step (paper: 1e-4)")
    beta_T: float = setting("beta of the last step (paper: 0.02)")
    rescale: bool = setting("both betas times 1000 / T, so any T ends where DDPM's 1,000 steps end (paper: false)")


@dataclass
class CosineSchedule:
    kind: str = setting("the variance schedule", ["linear", "cosine"])
    T: int = setting("diffusion steps")


@dataclass
class GuidanceConfig:
    p_uncond: float = setting("probability of dropping the label in training (classifier-free guidance)")
    w: Any = setting("guidance weight (eq. 10), or a list of weights evaluated side by side; >= -1")


@dataclass
class ModelConfig:
    conditional: bool = setting("class-conditional (the improved model) or not (the simple model)")
    lr: float = setting("Adam's learning rate")


@dataclass
class RecipeConfig:
    loss_weighting: str = setting(
        "w_t of the loss: none (the paper) or min_snr, min(SNR_t, gamma) / SNR_t", ["none", "min_snr"]
    )
    snr_gamma: float = setting("gamma of min_snr (Hang et al.: 5)")
    warmup_steps: int = setting("linear LR warm-up over this many steps (DDPM: 5000); 0: none")
    lr_decay: str = setting(
        "the LR after the warm-up: constant, or cosine to 0 at the last step", ["constant", "cosine"]
    )
    grad_clip: Optional[float] = setting("clip the gradient to this global norm (DDPM: 1.0); null: no clipping")
    dropout: float = setting("dropout in the U-Net's residual blocks (DDPM: 0.1)")
    betas: List[float] = setting("Adam's (beta_1, beta_2)")
    weight_decay: float = setting("decoupled weight decay (AdamW) when > 0")
    timesteps: str = setting(
        "the draw of t: uniform (the paper) or laplace, a Laplace density over log-SNR (Hang et al. 2024)",
        ["uniform", "laplace"],
    )
    timestep_center: float = setting("laplace: its centre in log-SNR (0: SNR = 1)")
    timestep_width: float = setting("laplace: its scale in log-SNR (larger: closer to uniform)")
    immiscible: bool = setting("assign each batch's noise to its images by a linear assignment (Li et al. 2024)")


@dataclass
class AncestralSampler:
    name: str = setting("the sampler", ["ancestral", "ddim", "dpm_solver"])
    variance: str = setting("sigma_t^2 of Algorithm 2", ["beta", "posterior"])
    clip_x0: bool = setting("clip each step's predicted x_0 to [-1, 1] (DDPM's released code); false: as printed")


@dataclass
class DDIMSampler:
    name: str = setting("the sampler", ["ancestral", "ddim", "dpm_solver"])
    steps: int = setting("network calls per image, at most schedule.T")
    eta: float = setting("0: deterministic DDIM, 1: the DDPM posterior variance")
    spacing: str = setting("how the steps are spread over 0..T", ["uniform", "quadratic"])
    clip_x0: bool = setting("clip each step's predicted x_0 to [-1, 1] (DDPM's released code); false: as printed")


@dataclass
class DPMSolverSampler:
    name: str = setting("the sampler", ["ancestral", "ddim", "dpm_solver"])
    steps: int = setting("network calls per image, at most schedule.T")
    spacing: str = setting("how the steps are spread over 0..T", ["uniform", "quadratic"])
    clip_x0: bool = setting("clip each step's predicted x_0 to [-1, 1] (DDPM's released code); false: as printed")


@dataclass
class EvalData:
    """evaluate.py's data: the subset is the checkpoint's, or a data group's (data=cars|five_class|cifar10)."""

    root: str = setting("the folder that holds cifar-10-batches-py/")
    max_images: Optional[int] = setting(
        "keep only the first N images of each split (train.py: smoke runs; evaluate.py: the training images the model "
        "saw, for memorization)"
    )
    classes: Optional[List[str]] = setting(
        "evaluate.py: the subset of images=PATH, from a data group; null: the checkpoint's", default=None
    )


@dataclass
class DataConfig(EvalData):
    root: str = setting("the folder that holds cifar-10-batches-py/")
    classes: List[str] = setting("the CIFAR-10 classes of the subset")
    batch_size: int = setting("training batch size per device (each rank draws this many images a step)")
    flip: bool = setting("random horizontal flips")
    download: bool = setting("download CIFAR-10 when it is not at data.root")
    url: str = setting("where to download it from")


@dataclass
class TrainerOwnConfig:
    accelerator: str = setting("Lightning's accelerator", ["auto", "cpu", "gpu", "cuda", "mps"])
    devices: Any = setting(
        "devices per node: a number >= 1 or auto (a whole number under hydra/launcher=slurm or local)"
    )
    num_nodes: int = setting("nodes (machines) of one run, for multi-node DDP under SLURM")
    strategy: str = setting("Lightning's strategy", ["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"])
    precision: str = setting(
        "Lightning's precision (default bf16-mixed on a GPU)",
        ["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"],
    )
    max_epochs: int = setting("epochs to train")
    max_steps: int = setting(
        "optimizer steps to train (-1: trainer.max_epochs decides); the LR schedule and ETA follow it"
    )
    max_time: Optional[str] = setting("stop after this long, DD:HH:MM:SS")
    check_val_every_n_epoch: int = setting("validation loss and a sample grid every N epochs")
    val_check_interval: Any = setting(
        "validations within an epoch too: a fraction of it or a count of batches; FID stays at epoch ends"
    )
    limit_val_batches: Any = setting("validation batches: a fraction (<= 1.0) or a count (> 1)")
    limit_train_batches: Any = setting("training batches per epoch: a fraction (<= 1.0) or a count (> 1); null: all")
    accumulate_grad_batches: int = setting("batches per optimizer step (the EMA and LR schedule count optimizer steps)")
    gradient_clip_val: Optional[float] = setting("clip gradients to this norm; the same as recipe.grad_clip (give one)")
    log_every_n_steps: int = setting("log the training loss every N steps")
    use_distributed_sampler: bool = setting("Lightning's sampler (the data module shards batches itself)")
    deterministic: bool = setting("deterministic algorithms only")
    fast_dev_run: bool = setting("one training and one validation batch, a one-image-per-class grid, no FID")
    max_nonfinite: int = setting("consecutive non-finite losses (updates skipped) before training stops")
    process_group_timeout: int = setting(
        "seconds a rank waits for the others in a collective before the run stops (a rank died)"
    )


OURS = (
    "max_nonfinite",
    "process_group_timeout",
)  # trainer.* settings of this project, not arguments of lightning.Trainer
TRAINER_REFUSED = {  # arguments of lightning.Trainer that train.py sets itself: why each is not a setting
    "logger": "train.py builds the loggers: choose them with logger=wandb or logger=csv",
    "callbacks": "train.py builds the callbacks: set them under callbacks.*",
    "plugins": "train.py sets the checkpoint writer and the cluster environment itself",
    "default_root_dir": "the run dir is hydra.run.dir",
    "enable_checkpointing": "last.ckpt is what resume and preemption rely on",
    "barebones": "it turns off the logging and checkpoints that train.py relies on",
    "limit_test_batches": "train.py runs no test loop",
    "limit_predict_batches": "train.py runs no predict loop",
    "gradient_clip_algorithm": "clipping is by norm (recipe.grad_clip or trainer.gradient_clip_val)",
}


def _lightning_type(annotation) -> Any:
    """A Trainer argument's annotation as an OmegaConf type: int, float, bool, str, Optional of one, else Any."""
    plain = (int, float, bool, str)
    if annotation in plain:
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and len(args) == 1 and args[0] in plain and len(get_args(annotation)) == 2:
        return Optional[args[0]]
    return Any


def trainer_schema():
    """The trainer group's schema: this project's typed fields, then every other argument of the installed
    lightning.Trainer (typed from its annotation, Lightning's default) except those train.py sets (TRAINER_REFUSED),
    so that a new Lightning argument is a setting the day it appears."""
    import inspect

    from lightning import Trainer

    own = {f.name for f in fields(TrainerOwnConfig)}
    extra = []
    for name, p in inspect.signature(Trainer.__init__).parameters.items():
        if name == "self" or name in own or name in TRAINER_REFUSED:
            continue
        default = p.default if isinstance(p.default, (int, float, bool, str, type(None))) else None
        help = f"lightning.Trainer's {name} (Lightning's default: {p.default})"
        extra.append((name, _lightning_type(p.annotation), setting(help, default=default)))
    return make_dataclass("TrainerConfig", extra, bases=(TrainerOwnConfig,))


TrainerConfig = trainer_schema()


@dataclass
class WandbConfig:
    online: bool = setting("sync to the W&B server (else offline files in the run dir)")
    project: str = setting("the W&B project")
    entity: Optional[str] = setting("the W&B entity; default yours")
    group: Optional[str] = setting("the W&B group")
    name: Optional[str] = setting("the W&B run's name; default the run dir's name")


@dataclass
class LoggerConfig:
    wandb: Optional[WandbConfig] = setting("Weights & Biases (logger=wandb), or null (logger=csv)")


@dataclass
class SampleGridConfig:
    n_per_class: int = setting("grid images per class (improved model)")
    n: int = setting("grid images (simple model)")
    seed: int = setting("the grid's noise, the same every time")


@dataclass
class FIDConfig:
    every_n_epochs: int = setting("FID/KID/IS every N epochs, a multiple of trainer.check_val_every_n_epoch; 0: off")


@dataclass
class EMAConfig:
    decay: float = setting("EMA decay of the weights, in (0, 1)")
    warmup: bool = setting("decay_t = min(decay, (1 + t) / (10 + t)) after t updates")


@dataclass
class PostHocEMAConfig:
    every_n_steps: int = setting("save the power-function EMAs every N optimizer steps (and at the end); 0: off")
    sigma_rels: List[float] = setting("the EMA lengths trained, as sigma_rel (EDM2: [0.05, 0.10])")


@dataclass
class ProgressConfig:
    refresh_rate: int = setting("progress bar refresh every N steps (default 50 on a GPU)")


@dataclass
class CallbacksConfig:
    sample_grid: SampleGridConfig = setting("sample grids at each validation", node=SampleGridConfig)
    fid: FIDConfig = setting("FID evaluations during training", node=FIDConfig)
    ema: EMAConfig = setting("the EMA of the weights", node=EMAConfig)
    posthoc_ema: PostHocEMAConfig = setting(
        "snapshots for post-hoc EMA (evaluate.py/sample.py ema_length=)", node=PostHocEMAConfig
    )
    progress: ProgressConfig = setting("the progress bar", node=ProgressConfig)


@dataclass
class MetricsConfig:
    num_samples: int = setting("generated images per evaluation, N (the paper: 500)")
    inception_weights: Optional[str] = setting("FID Inception state dict in torch-fidelity's layout; null: download")
    reference_split: str = setting("the real images FID is measured against", ["train", "test"])
    reference_images: Optional[int] = setting("only the first N images of that split; null: all")
    cache_dir: str = setting("where reference statistics and floors are cached")
    batch_size: int = setting("images per generation and Inception batch")
    seed: int = setting("noise, labels and bootstrap resamples, the same at every evaluation")
    kid_subsets: int = setting("KID: random subsets")
    kid_subset_size: int = setting("KID: subset size (at most N and the reference size)")
    bootstrap: int = setting("bootstrap resamples for the 95% intervals of FID and KID; 0: none")
    prc: bool = setting("also precision and recall (Kynkaanniemi et al. 2019)")


@dataclass
class PaperConfig:
    dir: str = setting("make paper's output: trainings, sweeps, samples, report")
    models: List[str] = setting("the models to train", ["simple", "improved"])
    data: List[str] = setting("the data sets to train on", ["cars", "five_class", "cifar10"])
    guidance_ws: List[Any] = setting("the guidance sweep of each improved model (Fig. 11-12)")
    eval_seed: int = setting("the evaluations' noise (another draw than metrics.seed)")
    eval_num_samples: Optional[int] = setting(
        "N of the sweeps and the floor beside them; null: metrics.num_samples (the training's N)"
    )
    samples: int = setting("final sample grid size per model")
    loss_from_epoch: float = setting("Fig. 14: the loss from this epoch on")


@dataclass
class SpeedConfig:
    profile: str = setting(
        "whose defaults ${gpu_or:...} takes (compile, channels_last, bf16, trainer.precision): auto (the machine's), "
        "gpu (on any machine: a test aid on a CPU) or cpu",
        ["auto", "gpu", "cpu"],
    )
    compile: bool = setting("torch.compile the U-Net (default on a GPU)")
    compile_backend: str = setting(
        "torch.compile's backend: inductor (generates kernels) or aot_eager (graph capture and the backward graph, "
        "eager kernels: the GPU rehearsal's on a CPU, and the first step when a compile fails)",
        ["inductor", "aot_eager"],
    )
    channels_last: bool = setting("NHWC memory layout (default on a GPU)")
    bf16_sampling: bool = setting("bf16 autocast of the U-Net (default on a GPU)")


# ---- entry points --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    net: NetConfig = setting("the U-Net (net=unet|tiny)", node=NetConfig)
    schedule: Any = setting("the variance schedule (schedule=linear|cosine)")
    guidance: GuidanceConfig = setting("classifier-free guidance (guidance=none|cfg)", node=GuidanceConfig)
    model: ModelConfig = setting("model=simple|improved", node=ModelConfig)
    recipe: RecipeConfig = setting("the training levers (recipe=paper|fast)", node=RecipeConfig)
    speed: SpeedConfig = setting("torch.compile, NHWC, bf16 sampling", node=SpeedConfig)
    sampler: Any = setting("sampler=ancestral|ddim|dpm_solver")
    data: DataConfig = setting("data=cars|five_class|cifar10", node=DataConfig)
    trainer: TrainerConfig = setting("trainer=default|ddp", node=TrainerConfig)
    logger: LoggerConfig = setting("logger=wandb|csv", node=LoggerConfig)
    callbacks: CallbacksConfig = setting("callbacks", node=CallbacksConfig)
    metrics: MetricsConfig = setting("FID/KID/IS settings", node=MetricsConfig)
    paper: PaperConfig = setting("make paper's settings", node=PaperConfig)
    seed: int = setting("initial weights and the training noise")
    ckpt_path: Optional[str] = setting("resume from: a .ckpt path or last")


@dataclass
class EvalGuidance:
    w: Any = setting("guidance weight, a number >= -1; null: the checkpoint's")


@dataclass
class DataRoot:
    root: str = setting("the folder that holds cifar-10-batches-py/")


EMA_LENGTH_HELP = (
    "post-hoc EMA: the EMA length (sigma_rel) reconstructed from the run's posthoc_ema/ snapshots; null: the "
    "checkpoint's EMA"
)


@dataclass
class EvaluateConfig:
    metrics: MetricsConfig = setting("FID/KID/IS settings", node=MetricsConfig)
    speed: SpeedConfig = setting("sampling speed options for this device", node=SpeedConfig)
    logger: LoggerConfig = setting("logger=wandb|csv", node=LoggerConfig)
    sampler: Any = setting(
        "sampler=ancestral|ddim|dpm_solver (then sampler.* as in train.py); default the checkpoint's", default=None
    )
    ckpt: Optional[str] = setting("a checkpoint written by train.py (or images=PATH)", default=None)
    images: Optional[str] = setting(
        "score these images instead of a checkpoint's: a folder of PNG/JPEG files (class subfolders for labels) or an "
        ".npz (arr_0: uint8 N x H x W x 3; labels: arr_1 or labels), with data=cars|five_class|cifar10",
        default=None,
    )
    guidance: EvalGuidance = setting("guidance", node=EvalGuidance)
    ema_length: Optional[float] = setting(EMA_LENGTH_HELP, default=None)
    real: bool = setting("score real test images instead: the floor")
    device: str = setting("auto, cpu, cuda, cuda:N or mps")
    data: EvalData = setting(
        "data=cars|five_class|cifar10, or data.root alone (the checkpoint's subset)", node=EvalData
    )


@dataclass
class Strips:
    frames: int = setting("images per strip")
    reverse: bool = setting("the reverse diffusion of the first sample (Fig. 7)")
    forward: bool = setting("the forward diffusion of a real test image (Fig. 1); needs data.root")


@dataclass
class SampleConfig:
    sampler: Any = setting("sampler=ancestral|ddim|dpm_solver")
    speed: SpeedConfig = setting("sampling speed options for this device", node=SpeedConfig)
    ckpt: str = setting("a checkpoint written by train.py")
    n: int = setting("images to draw")
    classes: Optional[List[str]] = setting("improved model: class names, cycled; default all")
    guidance: EvalGuidance = setting("guidance", node=EvalGuidance)
    ema_length: Optional[float] = setting(EMA_LENGTH_HELP, default=None)
    seed: int = setting("the same seed gives the same images")
    out: Optional[str] = setting("output folder; default the run dir")
    device: str = setting("auto, cpu, cuda, cuda:N or mps")
    batch_size: int = setting("images per sampling batch")
    strips: Strips = setting("the paper's strips", node=Strips)
    data: DataRoot = setting("data", node=DataRoot)


@dataclass
class ReportWandb:
    entity: Optional[str] = setting("W&B entity; default yours")
    project: str = setting("W&B project")
    group: Optional[str] = setting("the experiment's W&B group; default the runs dir's name")


@dataclass
class ReportConfig:
    runs: str = setting("a make paper dir (paper.dir)")
    out: str = setting("where the figures and tables go")
    loss_from_epoch: float = setting("Fig. 14: the loss from this epoch on")
    publish: bool = setting("also save the W&B dashboard; needs wandb login")
    wandb: ReportWandb = setting("the dashboard's W&B place", node=ReportWandb)


GROUPS = {
    "net": {"schema": NetConfig},
    "schedule": {"schema_linear": LinearSchedule, "schema_cosine": CosineSchedule},
    "guidance": {"schema": GuidanceConfig},
    "model": {"schema": ModelConfig},
    "recipe": {"schema": RecipeConfig},
    "sampler": {
        "schema_ancestral": AncestralSampler,
        "schema_ddim": DDIMSampler,
        "schema_dpm_solver": DPMSolverSampler,
    },
    "data": {"schema": DataConfig},
    "trainer": {"schema": TrainerConfig},
    "logger": {"schema": LoggerConfig},
    "callbacks": {"schema": CallbacksConfig},
    "metrics": {"schema": MetricsConfig},
    "paper": {"schema": PaperConfig},
    "speed": {"schema": SpeedConfig},
}
ENTRY_POINTS = {"config": TrainConfig, "evaluate": EvaluateConfig, "sample": SampleConfig, "report": ReportConfig}


def register() -> None:
    """Each group's schema as ``schema/<group>[_<option>]`` (conf/<group>/*.yaml extend it: ``/schema/<group>@_here_``)
    and each entry point's as ``schema_<config name>``."""
    cs = ConfigStore.instance()
    for group, nodes in GROUPS.items():
        for (
            name,
            node,
        ) in nodes.items():  # schema/net, schema/schedule_linear, ...: not options of the groups themselves
            cs.store(group="schema", name=group + name[len("schema") :], node=node)
    for name, node in ENTRY_POINTS.items():
        cs.store(name=f"schema_{name}", node=node)


register()  # on import: the entry points (through cli) and paper.py import this module before Hydra composes


def compose(entry: str, overrides: list[str] | tuple = (), return_hydra_config: bool = False) -> DictConfig:
    """The config of an entry point (config, evaluate, sample, report) with ``overrides``, as Hydra would compose it,
    outside a Hydra run (preflight, paper.py, --help, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(entry, overrides=list(overrides), return_hydra_config=return_hydra_config)


# ---- ranges, choices and relations ---------------------------------------------------------------------------------


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


SIGMA_REL_MAX = math.sqrt(1 / 12)  # the power function's exponent gamma > 0: at 0 it averages all of training evenly
RANGES = {  # key: (test, what it must be[, the fix]); None values pass where the schema allows None
    "seed": (lambda v: v >= 0, ">= 0"),
    "net.width": (lambda v: v >= 1, ">= 1"),
    "net.emb_dim": (lambda v: v >= 2 and v % 2 == 0, "an even number >= 2"),
    "net.heads": (lambda v: v >= 1, ">= 1"),
    "net.attention": (
        lambda v: len(set(v)) == len(v) and set(v) <= {32, 16, 8, 4},
        "distinct resolutions of the net's blocks",
        "choose from 32, 16, 8, 4 (the paper: [32,16,8,4]; [] for none), e.g. net.attention=[8,4]",
    ),
    "recipe.snr_gamma": (lambda v: v > 0, "> 0"),
    "recipe.warmup_steps": (lambda v: v >= 0, ">= 0 (0: no warm-up)"),
    "recipe.grad_clip": (lambda v: v > 0, "> 0 (or null: no clipping)"),
    "recipe.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "recipe.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9,0.999]"),
    "recipe.weight_decay": (lambda v: v >= 0, ">= 0"),
    "recipe.timestep_width": (lambda v: v > 0, "> 0"),
    "schedule.T": (lambda v: v >= 1, ">= 1"),
    "schedule.beta_1": (lambda v: 0 < v < 1, "in (0, 1)"),
    "schedule.beta_T": (lambda v: 0 < v < 1, "in (0, 1)"),
    "guidance.p_uncond": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.lr": (lambda v: v > 0, "> 0"),
    "sampler.steps": (lambda v: v >= 1, ">= 1"),
    "sampler.eta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.max_images": (
        lambda v: v >= 2,
        ">= 2 (or null: all)",
        "set data.max_images to 2 or more (memorization compares each image with its two nearest training images)",
    ),
    "data.classes": (
        lambda v: len(v) >= 1 and len(set(v)) == len(v) and set(v) <= set(CIFAR10_CLASSES),
        "a non-empty list of distinct CIFAR-10 classes",
        f"choose from {', '.join(CIFAR10_CLASSES)}",
    ),
    "trainer.devices": (
        lambda v: v == "auto" or (_number(v) and v >= 1 and v == int(v)),
        "a whole number >= 1 or auto",
    ),
    "trainer.max_epochs": (lambda v: v >= 1, ">= 1"),
    "trainer.max_steps": (lambda v: v == -1 or v >= 1, ">= 1 (or -1: trainer.max_epochs decides)"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, ">= 1"),
    "trainer.gradient_clip_val": (lambda v: v > 0, "> 0 (or null: no clipping)"),
    "trainer.limit_train_batches": (
        lambda v: _number(v) and v > 0 and (v <= 1 or v == int(v)),
        "a fraction in (0, 1] or a whole count > 1",
    ),
    "trainer.val_check_interval": (
        lambda v: _number(v) and v > 0 and (v <= 1 or v == int(v)),
        "a fraction in (0, 1] or a whole count of batches",
    ),
    "trainer.check_val_every_n_epoch": (lambda v: v >= 1, ">= 1"),
    "trainer.limit_val_batches": (
        lambda v: _number(v) and v > 0 and (v <= 1 or v == int(v)),
        "a fraction in (0, 1] or a whole count > 1",
    ),
    "trainer.log_every_n_steps": (lambda v: v >= 1, ">= 1"),
    "trainer.max_nonfinite": (lambda v: v >= 1, ">= 1"),
    "trainer.num_nodes": (lambda v: v >= 1, ">= 1"),
    "trainer.process_group_timeout": (lambda v: v >= 10, ">= 10 (seconds)"),
    "trainer.max_time": (
        lambda v: len(v.split(":")) == 4 and all(p.isdigit() for p in v.split(":")),
        "DD:HH:MM:SS",
        "for example trainer.max_time=00:12:00:00 stops after 12 hours",
    ),
    "callbacks.sample_grid.n_per_class": (lambda v: v >= 1, ">= 1"),
    "callbacks.sample_grid.n": (lambda v: v >= 1, ">= 1"),
    "callbacks.sample_grid.seed": (lambda v: v >= 0, ">= 0"),
    "callbacks.fid.every_n_epochs": (lambda v: v >= 0, ">= 0 (0: off)"),
    "callbacks.ema.decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "callbacks.posthoc_ema.every_n_steps": (lambda v: v >= 0, ">= 0 (0: off)"),
    "callbacks.posthoc_ema.sigma_rels": (
        lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(0 < s < SIGMA_REL_MAX for s in v),
        f"distinct lengths in (0, {SIGMA_REL_MAX:.4f})",
        "for example callbacks.posthoc_ema.sigma_rels=[0.05,0.1] (EDM2's)",
    ),
    "ema_length": (lambda v: 0 < v < SIGMA_REL_MAX, f"in (0, {SIGMA_REL_MAX:.4f}) (or null: the checkpoint's EMA)"),
    "callbacks.progress.refresh_rate": (lambda v: v >= 1, ">= 1"),
    "metrics.num_samples": (lambda v: v >= 2, ">= 2 (FID needs a covariance)"),
    "metrics.reference_images": (lambda v: v >= 2, ">= 2 (or null: all)"),
    "metrics.batch_size": (lambda v: v >= 1, ">= 1"),
    "metrics.seed": (lambda v: v >= 0, ">= 0"),
    "metrics.kid_subsets": (lambda v: v >= 1, ">= 1"),
    "metrics.kid_subset_size": (lambda v: v >= 2, ">= 2"),
    "metrics.bootstrap": (lambda v: v == 0 or v >= 10, "0 (no intervals) or >= 10 resamples"),
    "paper.models": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list without repeats"),
    "paper.data": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list without repeats"),
    "paper.guidance_ws": (
        lambda v: len(v) >= 1 and all(_number(w) and w >= -1 for w in v),
        "a non-empty list of weights >= -1, e.g. [0,0.5,1,2,3,4]",
    ),
    "paper.eval_seed": (lambda v: v >= 0, ">= 0"),
    "paper.eval_num_samples": (lambda v: v >= 2, ">= 2 (or null: metrics.num_samples)"),
    "paper.samples": (lambda v: v >= 1, ">= 1"),
    "paper.loss_from_epoch": (lambda v: v >= 0, ">= 0"),
    "n": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "strips.frames": (lambda v: v >= 2, ">= 2"),
    "classes": (lambda v: len(v) >= 1, "a non-empty list of the checkpoint's class names (or null: all)"),
    "loss_from_epoch": (lambda v: v >= 0, ">= 0"),
    "device": (
        lambda v: v in ("auto", "cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "logger.wandb.project": (lambda v: bool(v.strip()), "a non-empty name"),
}


def _keys(cfg: DictConfig, known: dict, prefix: str = ""):
    """Every key of the composed config down to the schema's leaves (the hydra node aside)."""
    for k in cfg.keys():
        full = f"{prefix}{k}"
        if full == "hydra" or full in known:
            if full != "hydra":
                yield full
            continue
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            yield from _keys(node, known, f"{full}.")
        else:
            yield full


def _weights(v) -> list | None:
    """guidance.w as a list of numbers, or None when it is not a number or a non-empty list of numbers."""
    values = list(v) if isinstance(v, (list, ListConfig)) else [v]
    return values if values and all(_number(x) for x in values) else None


def check(cfg: DictConfig, entry: str) -> None:
    """Ranges, choices and relations of a composed config of ``entry`` (config, evaluate, sample, report): the first
    problem as one ConfigError naming the setting, the problem and the fix. Reads no data and writes nothing."""
    schema = ENTRY_POINTS[entry]
    known = dict(leaves(schema, cfg))
    for key in _keys(cfg, known):
        if key not in known and key.split(".")[0] in ("schedule", "sampler") and key.count(".") == 1:
            option = f"{key.split('.')[0]}.{'kind' if key.startswith('schedule') else 'name'}"
            raise ConfigError(
                f"{key} is not a setting of {option}={_get(cfg, option)}; choose it with "
                f"{key.split('.')[0]}={_get(cfg, option)} (which brings its own settings)"
            )
        if key not in known:
            raise ConfigError(f"{key} is not a setting of this program; drop it (--help lists every key with its type)")
    for key, spec in known.items():
        if (
            OmegaConf.is_missing(cfg, key)
            if "." not in key
            else OmegaConf.is_missing(_get(cfg, key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])
        ):
            raise ConfigError(f"{key} is required and has no value; pass {key}=... ({spec.metadata['help']})")
        value = _get(cfg, key)
        choices = spec.metadata.get("choices")
        if value is None:
            continue
        numbers = list(value) if isinstance(value, ListConfig) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{key}={value} must be a finite number; set {key} to one")
        if choices:
            for v in value if isinstance(value, (list, ListConfig)) else [value]:
                if v not in choices:
                    raise ConfigError(f"{key}={v} is not one of {', '.join(map(str, choices))}; choose one of them")
        if key in RANGES:
            test, must, *fix = RANGES[key]
            if not test(value):
                shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
                fix = fix[0] if fix else f"set {key} to {'a value ' if must[0] in '<>i' else ''}{must}"
                raise ConfigError(f"{key}={shown} must be {must}; {fix}")
    if entry in ("config", "evaluate", "sample") and "guidance" in cfg:
        w = cfg.guidance.w
        weights = _weights(w) if w is not None else [0.0]
        if weights is None or any(x < -1 for x in weights) or entry != "config" and isinstance(w, ListConfig):
            shown = OmegaConf.to_container(w) if isinstance(w, ListConfig) else w
            raise ConfigError(
                f"guidance.w={shown} must be a number >= -1 (w = -1 is the unconditional model)"
                + (", or a list of them" if entry == "config" else "")
                + "; for example guidance.w=2"
                + (" or guidance.w=[0,1,2,4]" if entry == "config" else "")
            )
    if entry == "config":
        relations(cfg)
    if entry in ("evaluate", "sample") and cfg.ckpt is not None and not Path(cfg.ckpt).is_file():
        raise ConfigError(
            f"checkpoint ckpt={cfg.ckpt} does not exist; pass ckpt=PATH to a .ckpt file written by train.py"
        )
    if entry == "evaluate":
        evaluate_sources(cfg)
    if entry in ("config", "evaluate") and cfg.metrics.prc and cfg.metrics.num_samples < 4:
        raise ConfigError(
            f"metrics.prc=true needs metrics.num_samples >= 4, not {cfg.metrics.num_samples} (precision and recall use "
            "each image's third-nearest neighbour); raise metrics.num_samples or set metrics.prc=false"
        )
    if (
        entry in ("config", "evaluate")
        and cfg.metrics.reference_split == "test"
        and cfg.metrics.reference_images is None
    ):
        raise ConfigError(
            "metrics.reference_split=test with metrics.reference_images=null puts every test image in the reference and "
            "leaves none for the floor; set metrics.reference_images=N below the subset's test images (the floor uses "
            "the ones after them), or metrics.reference_split=train"
        )
    if entry == "report" and not Path(cfg.runs).is_dir():
        raise ConfigError(f"runs={cfg.runs} is not a folder; pass the paper.dir of a make paper run")
    if (
        entry in ("config", "evaluate")
        and cfg.metrics.inception_weights is not None
        and not Path(cfg.metrics.inception_weights).is_file()
    ):
        raise ConfigError(
            f"metrics.inception_weights={cfg.metrics.inception_weights} does not exist; point it at an FID Inception state dict"
        )


def evaluate_sources(cfg: DictConfig) -> None:
    """evaluate.py scores one source: a checkpoint's samples (or, with real=true, the subset's test images), or images
    (the checkpoint's existence is checked in ``check``, as for sample.py)."""
    if (cfg.ckpt is None) == (cfg.images is None):
        raise ConfigError(
            "evaluate.py scores a checkpoint or a set of images: pass ckpt=PATH, or images=PATH (a folder or .npz) "
            "with data=cars|five_class|cifar10" + (", not both" if cfg.ckpt is not None else "")
        )
    if cfg.images is None:
        return
    if not Path(cfg.images).exists():
        raise ConfigError(f"images={cfg.images} does not exist; pass a folder of PNG/JPEG files or an .npz")
    if cfg.data.classes is None:
        raise ConfigError(
            f"images={cfg.images} needs the subset it is scored against: add data=cars|five_class|cifar10 "
            "(train.py's data groups)"
        )
    given = [
        k
        for k, v in (
            ("real", cfg.real),
            ("guidance.w", cfg.guidance.w),
            ("sampler", cfg.sampler),
            ("ema_length", cfg.ema_length),
        )
        if v is not None and v is not False
    ]
    if given:
        raise ConfigError(f"{', '.join(given)} is a setting of a checkpoint's sampling; drop it with images=PATH")


def relations(cfg: DictConfig) -> None:
    """Relations between the training settings."""
    fid, val = cfg.callbacks.fid.every_n_epochs, cfg.trainer.check_val_every_n_epoch
    if fid % val:
        raise ConfigError(
            f"callbacks.fid.every_n_epochs={fid} must be a multiple of trainer.check_val_every_n_epoch={val} "
            "(FID runs at validation, with the EMA weights); change one of them"
        )
    if cfg.schedule.kind == "linear" and cfg.schedule.beta_T < cfg.schedule.beta_1:
        raise ConfigError(
            f"schedule.beta_T={cfg.schedule.beta_T} < schedule.beta_1={cfg.schedule.beta_1}: betas must not decrease; swap them"
        )
    if "steps" in cfg.sampler and cfg.sampler.steps > cfg.schedule.T:
        raise ConfigError(
            f"sampler.steps={cfg.sampler.steps} must be at most schedule.T={cfg.schedule.T}; lower sampler.steps"
        )
    width, heads = cfg.net.width, cfg.net.heads
    if width % heads:
        raise ConfigError(
            f"net.heads={heads} must divide net.width={width} (attention splits the channels); change one of them"
        )
    if not cfg.model.conditional and (cfg.guidance.p_uncond or any(_weights(cfg.guidance.w) or [])):
        raise ConfigError(
            f"guidance (w={cfg.guidance.w}, p_uncond={cfg.guidance.p_uncond}) given to the unconditional model; "
            "use model=improved, or guidance=none with model=simple"
        )
    clip, trainer_clip = cfg.recipe.grad_clip, cfg.trainer.gradient_clip_val
    if clip is not None and trainer_clip is not None and clip != trainer_clip:
        raise ConfigError(
            f"recipe.grad_clip={clip} and trainer.gradient_clip_val={trainer_clip} are the same setting with two "
            "values; give one of them"
        )
    if (clip or trainer_clip) and cfg.trainer.precision == "16-mixed":  # fused Adam unscales inside its step
        raise ConfigError(
            f"gradient clipping at {clip or trainer_clip} with trainer.precision=16-mixed would clip the grad scaler's "
            "scaled gradients (fused Adam unscales them in its step); use trainer.precision=bf16-mixed"
        )
    if cfg.data.max_images is not None and cfg.data.batch_size > cfg.data.max_images:  # max_images: of the whole subset
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {cfg.data.max_images} training images that "
            f"data.max_images={cfg.data.max_images} leaves at most; lower data.batch_size"
        )


# ---- documentation -------------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    if tp is Any:
        return "any"
    origin = get_origin(tp)
    if origin is list or origin is List:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is not None:  # Optional[X]
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def leaves(schema, cfg: DictConfig | None = None, prefix: str = ""):
    """(key, field) of every setting of a schema, nested dataclasses flattened; for ``Any`` groups (schedule, sampler),
    the fields of the schema chosen in ``cfg``, or of the default one."""
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not MISSING and is_dataclass(f.default_factory) else None
        if sub is not None and cfg is not None and isinstance(_get(cfg, key), DictConfig):
            sub = OmegaConf.get_type(_get(cfg, key)) or sub  # as composed: evaluate.py's data=<group> is a DataConfig
        if f.type is Any and key in ("schedule", "sampler"):  # the schema of the chosen option
            name = f"{key}.kind" if key == "schedule" else f"{key}.name"
            chosen = _get(cfg, name) if cfg is not None and _get(cfg, key) is not None else None
            options = [n[len("schema_") :] for n in GROUPS[key]]
            if chosen is not None and chosen not in options:
                raise ConfigError(f"{name}={chosen} is not one of {', '.join(options)}; choose one with {key}=<option>")
            sub = GROUPS[key][f"schema_{chosen}"] if chosen else None
        if f.type == Optional[WandbConfig] and cfg is not None and _get(cfg, key) is None:
            yield key, f  # logger=csv: wandb is null
            continue
        if f.type == Optional[WandbConfig]:
            sub = WandbConfig
        if sub is not None:
            yield from leaves(sub, cfg, f"{key}.")
        else:
            yield key, f


def _shown(cfg: DictConfig, key: str) -> str:
    """A key's value in the composed config as the docs show it: ${gpu_or:A,B} as 'A on a GPU, else B'."""
    node = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node == "???":
        return "required"
    text = "null" if node is None else str(node).lower() if isinstance(node, bool) else str(node).replace("'", "")
    if text.startswith("${gpu_or:"):
        on_gpu, otherwise = text[len("${gpu_or:") : -1].split(",")
        return f"{otherwise} ({on_gpu} on a GPU)"
    return text


def _rows(entry: str) -> list[tuple[str, str, str, str]]:
    cfg = compose(entry)
    rows = []
    for key, f in leaves(ENTRY_POINTS[entry], cfg):
        choices = f.metadata.get("choices")
        rows.append(
            (
                key,
                _type_name(f.type) + (f" ({'|'.join(map(str, choices))})" if choices else ""),
                _shown(cfg, key),
                f.metadata["help"],
            )
        )
    return rows


def help_text(entry: str, script: str) -> str:
    """--help: every key of the entry point with its type, default and a one-line description."""
    rows = _rows(entry)
    width = [max(len(r[i]) for r in rows + [("key", "type", "default", "")]) for i in range(3)]
    lines = [
        f"python {script} [key=value ...]    -m: a sweep, each value checked before the first job; --cfg job: the composed "
        "config; HYDRA_FULL_ERROR=1: full tracebacks",
        "",
        "  ".join(h.ljust(w) for h, w in zip(("key", "type", "default"), width, strict=False)) + "  description",
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row[:3], width, strict=False)) + "  " + row[3] for row in rows]
    return "\n".join(lines)


def settings_table(entry: str) -> str:
    """The README's settings table of an entry point: key, type, default, description."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t.replace('|', ' or ')} | {d} | {h.replace('|', ' or ')} |" for k, t, d, h in _rows(entry)]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ddpm_lightning.schema config|evaluate|sample|report: the README's table
    import sys

    print(settings_table(sys.argv[1]))
