"""What the entry points share: bad settings end as one line on stderr and exit code 2, before anything runs."""

import contextlib
import functools
import itertools
import logging
import math
import os
import sys
from pathlib import Path

from ddpm_lightning import (
    cluster,
    files,
    schema,  # importing it registers the schema with Hydra's ConfigStore, before any composition
)
from ddpm_lightning.errors import ConfigError

SAMPLING_TIME = ("guidance.w", "sampler")  # and sampler.*: settings that change sampling, not the trained model
SETTING_WORDS = (
    "trainer.devices",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.precision",
    "trainer.max_time",
    "trainer.limit_val_batches",
    "data.root",
    "metrics.inception_weights",
    "metrics.cache_dir",
    "ckpt",
)


def exit_on_config_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # a library's write (a logger's CSV, W&B's files) on a full disk or a read-only place
            if e.errno not in files.NO_ROOM:
                raise
            print(f"error: {files.no_room(e, Path(e.filename or '.'), 'a file', None, ours=False)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def one_line(message) -> str:
    """Hydra's or OmegaConf's multi-line error as one line: the cause when there is one (a wrong type, an unknown key),
    with the key it names, and without the config search path."""
    cause = getattr(message, "__cause__", None)
    text = str(message).split("Config search path")[0]
    if cause is not None and "full_key:" in str(cause):
        first = str(cause).splitlines()[0].strip()
        key = str(cause).split("full_key:")[1].split()[0]
        given = str(message).split("override ", 1)[1].strip() if "Error merging override " in str(message) else key
        group = key.split(".")[0]
        chosen = f" of this {group} (another {group}=... may have it)" if group in ("sampler", "schedule") else ""
        unknown = first.startswith("Key '") and " not in " in first
        text = f"{given}: {first}" if not unknown else refused(key) or f"{key} is not a setting{chosen}; drop it"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def refused(key: str) -> str | None:
    """The one line for a lightning.Trainer argument that train.py sets itself (schema.TRAINER_REFUSED)."""
    name = key.removeprefix("trainer.")
    if key.startswith("trainer.") and name in schema.TRAINER_REFUSED:
        return f"{key} is an argument of lightning.Trainer that is not a setting here: {schema.TRAINER_REFUSED[name]}"
    return None


def sweep_overrides(argv: list[str], multirun: bool) -> tuple[list[list[str]], list[str]]:
    """The override lists to check: the command line's own, or under -m every swept value of every swept key (all
    combinations when there are at most 64, else each value with the other keys at their first); and the swept keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    fixed = [o.input_line for o in parsed if not (multirun and o.is_sweep_override())]
    keys = [o.get_key_element() for o in parsed if multirun and o.is_sweep_override()]
    swept = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        for o in parsed
        if multirun and o.is_sweep_override()
    ]
    if math.prod(len(values) for values in swept) <= 64:
        return [fixed + list(combo) for combo in itertools.product(*swept)], keys
    return [
        fixed + [values[0] for values in swept[:i]] + [v] + [values[0] for values in swept[i + 1 :]]
        for i, values in enumerate(swept)
        for v in values
    ], keys


@exit_on_config_error
def preflight(config_name: str, argv: list[str]) -> None:
    """Compose the config before Hydra runs and check it against the schema (ranges, choices, relations: schema.check),
    so that a wrong type, an unknown key, group or option, a bad value or an unwritable run dir ends as one line. Under
    -m every value of every swept key is checked before the first job starts. --help lists every key; other flags
    (--cfg, --info, ...) go to Hydra as they are."""
    if any(a in ("--help", "-h") for a in argv):
        print(schema.help_text(config_name, Path(sys.argv[0]).name))
        sys.exit(0)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if os.environ.get("LOCAL_RANK") or any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # a DDP child relaunched by Lightning (checked by its parent), or a Hydra flag
    try:
        jobs, swept = sweep_overrides(argv, multirun)
        for overrides in jobs:
            try:
                unnamed = [o.split("=")[0] for o in overrides if o.startswith("sampler.")]
                if config_name == "evaluate" and unnamed and not any(o.startswith("sampler=") for o in overrides):
                    raise ConfigError(
                        f"{unnamed[0]} needs the sampler named: add sampler=ancestral|ddim|dpm_solver (then its "
                        "settings; without sampler=, the checkpoint's own sampler is used whole)"
                    )
                cfg = schema.compose(config_name, overrides, return_hydra_config=True)
                schema.check(cfg, config_name)
            except ConfigError as e:
                job = " ".join(o for o in overrides if o.split("=")[0] in swept)
                raise ConfigError(f"{e} [in the sweep job {job}]" if multirun and len(jobs) > 1 else str(e)) from None
        if config_name == "config":
            check_launcher(cfg, multirun, swept)
        out = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition and parse errors
        raise ConfigError(
            f"{one_line(e)} (python {Path(sys.argv[0]).name} --help lists every setting with its type)"
        ) from None
    sampling_time = [k for k in swept if k in SAMPLING_TIME or k.startswith("sampler.")]
    if config_name == "config" and multirun and sampling_time:
        print(
            f"warning: this sweep trains one model per value of {', '.join(sampling_time)}, which only changes how "
            "samples are drawn: train once with guidance.w=[0,1,2,4] (every w evaluated side by side), or sweep a trained model "
            "with evaluate.py -m ckpt=PATH guidance.w=0,1,2,4",
            file=sys.stderr,
        )
    if not multirun and "hydra.run.dir" in " ".join(argv) or multirun and "hydra.sweep.dir" in " ".join(argv):
        files.writable_dir(out)  # the default dirs are made by Hydra itself
    if config_name == "config" and not multirun and "hydra.run.dir" in " ".join(argv) and cluster.global_rank() == 0:
        files.own_run_dir(out)  # before Hydra writes its .hydra/ files there: one training per run dir


def check_launcher(cfg, multirun: bool, swept: list[str]) -> None:
    """Where train.py's jobs run: hydra/launcher=slurm or local start one task per device (trainer.devices a number, the
    same for every job of the sweep, and equal to the launcher's tasks_per_node); under the basic launcher, a sweep of
    multi-process DDP jobs is refused (Lightning would relaunch the whole sweep in every rank)."""
    t, launcher = cfg.trainer, cfg.hydra.launcher
    target = str(launcher.get("_target_", ""))
    submitit = target.endswith(("SlurmLauncher", "LocalLauncher"))
    choice = "slurm" if target.endswith("SlurmLauncher") else "local"
    if submitit and not multirun:
        raise ConfigError(
            f"hydra/launcher={cfg.hydra.runtime.choices.get('hydra/launcher', choice)} takes effect with -m "
            "(every job of the sweep is submitted); add -m"
        )
    if submitit:
        if t.devices == "auto":
            raise ConfigError(
                f"hydra/launcher={choice} starts one task per device: set trainer.devices to a number (e.g. 4), not auto"
            )
        for key in ("trainer.devices", "trainer.num_nodes"):
            if key in swept:
                raise ConfigError(
                    f"{key} is swept, but hydra/launcher={choice} asks for one size of job for the whole sweep; "
                    f"run one sweep per {key}"
                )
        if launcher.tasks_per_node != t.devices:
            raise ConfigError(
                f"hydra.launcher.tasks_per_node={launcher.tasks_per_node} but trainer.devices={t.devices}: Lightning needs one "
                f"task per device; drop hydra.launcher.tasks_per_node (it follows trainer.devices)"
            )
        if choice == "slurm" and launcher.nodes != t.num_nodes:
            raise ConfigError(
                f"hydra.launcher.nodes={launcher.nodes} but trainer.num_nodes={t.num_nodes}; drop hydra.launcher.nodes "
                "(it follows trainer.num_nodes)"
            )
        if choice == "local" and t.num_nodes != 1:
            raise ConfigError(
                f"trainer.num_nodes={t.num_nodes} with hydra/launcher=local, which runs on this machine; use "
                "hydra/launcher=slurm for several nodes"
            )
    elif multirun and str(t.strategy).startswith("ddp") and (t.num_nodes > 1 or processes_per_node(t) > 1):
        raise ConfigError(
            f"train.py -m with trainer.strategy={t.strategy} and {processes_per_node(t)} devices: Lightning would relaunch "
            "the whole sweep in every rank; run the sweep with hydra/launcher=local (this machine, one process per "
            "device) or hydra/launcher=slurm, or drop -m"
        )


def processes_per_node(t) -> int:
    """The processes Lightning's DDP starts on a node: trainer.devices, or for auto the GPUs it would take (else 1)."""
    if t.devices != "auto":
        return int(t.devices)
    import torch

    return torch.cuda.device_count() if t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1


def flat_settings(cfg, prefix: str = "") -> dict:
    """A config's leaves by dotted key (the hydra node aside)."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out = {}
    for k, v in node.items():
        if k != "hydra":
            out.update(flat_settings(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@contextlib.contextmanager
def startup(what: str, applies=lambda: True, cfg=None):
    """An exception from a library while the run is being built (Lightning's MisconfigurationException, torch's
    ValueError, an OSError, ...) ends as one line, exit 2, naming the setting when the message does, while
    ``applies()`` (for training: until the first step is done; later errors keep their traceback and checkpoint
    guarantees); HYDRA_FULL_ERROR=1 lets the traceback through."""
    try:
        yield
    except (ConfigError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not applies():
            raise
        text = " ".join(str(e).split())[:300] or type(e).__name__
        named = [k for k in SETTING_WORDS if k.split(".")[-1] in text]
        if cfg is not None:  # a setting whose value (a path, a name) the message quotes
            named += [
                k
                for k, v in flat_settings(cfg).items()
                if isinstance(v, str) and len(v) > 2 and v in text and k not in named
            ]
        hint = f" (check {', '.join(named)})" if named else ""
        raise ConfigError(
            f"{what} failed: {type(e).__name__}: {text}{hint}; HYDRA_FULL_ERROR=1 shows the traceback"
        ) from None


def main_entry(main, config_name: str) -> None:
    logging.raiseExceptions = (
        False  # a log handler's failed write (a full disk) is not a traceback; the run's own error says it
    )
    preflight(config_name, sys.argv[1:])
    rank = os.environ.get("SLURM_PROCID") if "SLURM_NTASKS" in os.environ else os.environ.get("RANK")
    if rank not in (None, "0") and not any(a in ("-m", "--multirun") for a in sys.argv):
        # one of the ranks that srun or torchrun started: the run dir is rank 0's; no second copy of .hydra, its own log file
        sys.argv += ["hydra.output_subdir=null", f"hydra.job.name={Path(sys.argv[0]).stem}_rank{rank}"]
    main()
