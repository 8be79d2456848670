"""python paper.py [train.py overrides] : the paper's experiment end to end (make paper ARGS="...")."""

import logging
import sys

from ddpm_lightning.cli import exit_on_config_error


@exit_on_config_error
def main() -> None:
    from ddpm_lightning.paper import run

    if any(a in ("--help", "-h") for a in sys.argv[1:]):  # paper.py takes train.py's settings (paper.* among them)
        from ddpm_lightning.schema import help_text

        print(help_text("config", "paper.py"))
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
