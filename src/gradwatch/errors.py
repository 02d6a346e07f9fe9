"""Errors raised by gradwatch.

Every message says what was got, what was expected, and how to fix it. The CLI
catches :class:`GradwatchError` once and prints it without a traceback.
"""

from __future__ import annotations

__all__ = [
    "GradwatchError",
    "ConfigError",
    "WatchError",
    "StoreError",
    "RunNotFoundError",
    "DataError",
    "TrainingStopped",
    "GradientWarning",
    "check_int",
]


class GradwatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class ConfigError(GradwatchError, ValueError):
    """A parameter has a value gradwatch cannot use."""


class WatchError(GradwatchError):
    """A model cannot be watched as asked (wrong type, no parameters, already watched)."""


class StoreError(GradwatchError):
    """The run store cannot be opened, read or written."""


class RunNotFoundError(StoreError, KeyError):
    """A run id or name that the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(GradwatchError, ValueError):
    """A data set that cannot be used for training (missing arrays, NaN, one class...)."""


class TrainingStopped(GradwatchError):
    """Raised from inside training when an alert rule asks to stop (e.g. first NaN gradient).

    Everything recorded up to the stop is in the store, and the run's status is
    ``stopped``. Attributes: ``alert`` (a :class:`gradwatch.alerts.Alert`), and its
    ``kind``, ``step`` and ``layer``.
    """

    def __init__(self, alert) -> None:
        super().__init__(alert.message)
        self.alert = alert
        self.kind = alert.kind
        self.step = alert.step
        self.layer = alert.layer


class GradientWarning(RuntimeWarning):
    """Emitted while training when gradients go non-finite, vanish or explode.

    ``watch(..., warn=False)`` silences it; ``simplefilter("error", GradientWarning)`` stops training.
    """


def check_int(name: str, value: object, minimum: int, hint: str | None = None) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else :class:`ConfigError`.

    The message names the argument, repeats what was got and says what is expected:
    ``"depth=0; expected an integer >= 1 (the number of hidden layers)"``.

    Args:
        name: the argument's name as the user wrote it (``"epochs"``, ``"Thresholds.persistence"``).
        value: what was passed.
        minimum: the smallest value allowed.
        hint: what the argument means, added in parentheses to the message.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f" ({hint})" if hint else ""
        raise ConfigError(f"{name}={value!r}; expected an integer >= {minimum}{what}")
    return value
