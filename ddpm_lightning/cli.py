"""What the entry points share: bad settings end as one line on stderr and exit code 2, before anything runs."""

import functools
import os
import sys
from pathlib import Path

from ddpm_lightning.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLING_TIME = ("guidance.w", "sampler")  # and sampler.*: settings that change sampling, not the trained model


def exit_on_config_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def one_line(message: str) -> str:
    """Hydra's multi-line error as one line, without its config search path."""
    text = str(message).split("Config search path")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def writable_dir(path: str | Path) -> Path:
    """The output folder, created; an unwritable one fails before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output dir {path} is not writable ({e.strerror}); choose a writable one (hydra.run.dir=DIR, or out=DIR)") from None
    return path


@exit_on_config_error
def preflight(config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so that an unknown group, option or value, or an unwritable run
    dir, ends as one line. Sweeps are checked with their first value. Flags (--help, --cfg, ...) go to Hydra as they are."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if os.environ.get("LOCAL_RANK") or any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # a DDP child relaunched by Lightning (checked by its parent), or a Hydra flag
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides, swept = [], []
        for o in OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")]):
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.value()
            overrides.append(o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={value}")
            swept += [o.get_key_element()] if o.is_sweep_override() else []
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            out = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
    except Exception as e:  # Hydra's composition and parse errors
        raise ConfigError(f"{one_line(e)} (python {Path(sys.argv[0]).name} --help lists the groups and options)") from None
    sampling_time = [k for k in swept if k in SAMPLING_TIME or k.startswith("sampler.")]
    if config_name == "config" and multirun and sampling_time:
        print(f"warning: this sweep trains one model per value of {', '.join(sampling_time)}, which only changes how samples are "
              "drawn: train once with guidance.w=[0,1,2,4] (every w evaluated side by side), or sweep a trained model with "
              "evaluate.py -m ckpt=PATH guidance.w=0,1,2,4", file=sys.stderr)
    if not multirun and "hydra.run.dir" in " ".join(argv) or multirun and "hydra.sweep.dir" in " ".join(argv):
        writable_dir(out)  # the default dirs are made by Hydra itself


def main_entry(main, config_name: str) -> None:
    preflight(config_name, sys.argv[1:])
    main()
