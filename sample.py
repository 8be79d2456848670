"""python sample.py ckpt=PATH [n=64] [classes=[cat,horse]] [guidance.w=2] [sampler=ddim] [seed=0] [out=DIR]"""

import hydra
from omegaconf import DictConfig

from ddpm_lightning.cli import exit_on_config_error, main_entry, startup


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from ddpm_lightning.sample import run

    with startup("sampling", cfg=cfg):  # a library's error is one line, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
        run(cfg)


if __name__ == "__main__":
    main_entry(main, "sample")
