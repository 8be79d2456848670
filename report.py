"""python report.py runs=DIR [out=DIR] : the paper's figures (Fig. 1, 7, 9-14), its table and sample grids."""

import logging

import hydra
from omegaconf import DictConfig

from ddpm_lightning.cli import exit_on_config_error, main_entry, startup

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from ddpm_lightning.errors import ConfigError
    from ddpm_lightning.report import write

    if cfg.publish:  # before any work: publishing needs a login
        from ddpm_lightning.dashboard import require_login

        entity = require_login(cfg.wandb.entity)
    with startup("the report", cfg=cfg):  # a library's error is one line, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
        try:
            written = write(cfg.runs, cfg.out, cfg.loss_from_epoch)
        except FileNotFoundError as e:
            raise ConfigError(f"runs={cfg.runs}: {e}") from None
    log.info(f"{len(written)} files in {cfg.out}: " + ", ".join(p.name for p in written))
    if cfg.publish:
        from pathlib import Path

        from ddpm_lightning.dashboard import publish

        urls = publish(entity, cfg.wandb.project, cfg.wandb.group or Path(cfg.runs).name)
        log.info("W&B dashboard: " + ", ".join(urls))


if __name__ == "__main__":
    main_entry(main, "report")
