"""The one error type for bad settings and bad input: entry points print its message as one line."""


class ConfigError(ValueError):
    """A setting or input that cannot work; the message names the problem and the fix."""


class NonFiniteLoss(ConfigError):
    """Training met too many non-finite losses in a row; the message names the step, the epoch and the way on."""


class Interrupted(Exception):
    """A sampling loop stopped at a step because a preemption signal arrived; its images were not made."""
