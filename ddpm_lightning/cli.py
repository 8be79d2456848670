"""What the entry points share: bad settings end as one line on stderr and exit code 2."""

import functools
import sys

from ddpm_lightning.errors import ConfigError


def exit_on_config_error(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
