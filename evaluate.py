"""python evaluate.py ckpt=PATH [sampler=...] [guidance.w=...] [metrics.num_samples=...]; -m for a sweep over w."""

import hydra
from omegaconf import DictConfig

from ddpm_lightning.cli import exit_on_config_error, main_entry, startup


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from ddpm_lightning.evaluate import run

    with startup(
        "the evaluation", cfg=cfg
    ):  # a library's error is one line, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
        run(cfg)


if __name__ == "__main__":
    main_entry(main, "evaluate")
