"""What a watcher records and how often: one frozen, validated :class:`WatchConfig`.

:func:`gradwatch.watch`, the Lightning and Hugging Face callbacks, the lab and
:func:`gradwatch.prescribe` all build their watchers from a :class:`WatchConfig`, so a
default (the cadence, the activation sample, the tracked weights) is written once, here,
and a bad value fails when the configuration is made, before any training.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradwatch.alerts import Action, resolve_alerts
from gradwatch.errors import ConfigError, check_int
from gradwatch.recorder import ACTIVATION_SAMPLE, DEFAULT_EVERY, WEIGHT_SAMPLES

__all__ = ["WatchConfig", "Selector", "DEFAULT_EVERY"]

Selector = str | type | Iterable[str | type]
# watch()'s arguments that callbacks pass through beside a WatchConfig: they belong to one run
RUNTIME_OPTIONS = ("ui", "scaler")


@dataclass(frozen=True)
class WatchConfig:
    """How a watcher records; every field is checked when the config is made.

    Attributes:
        every: log every N-th step (``step % every == 0``), or a callable ``step -> bool``.
            Default 50 (:data:`DEFAULT_EVERY`, Lightning's ``log_every_n_steps``).
        activation_stats: measure activation modules (saturated, green and dead fractions,
            mean derivative, input quantiles).
        activation_sample: inputs per activation the sampled statistics average over
            (standard error at most ``0.5 / sqrt(n)``: 1.1 points for 2048); 0: all.
        weight_samples: tracked weight elements per layer (the seeds' "weights against
            epochs"); 0: none.
        include, exclude: module-name patterns (``fnmatch``) or ``nn.Module`` types.
        window: keep every step's gradient-norm extremes between logged steps; None: on
            where it is cheap (an accelerator, or a ``"nonfinite"`` alert that stops or calls back).
        alerts: ``{"nonfinite" | "vanishing" | "exploding": "warn" | "stop" | "ignore" | callable}``.
        thresholds: a :class:`gradwatch.diagnose.Thresholds` for the alerts (None: its defaults).
        warn: the default alert action, ``"warn"`` (True) or ``"ignore"`` (False).
    """

    every: int | Callable[[int], bool] = DEFAULT_EVERY
    activation_stats: bool = True
    activation_sample: int = ACTIVATION_SAMPLE
    weight_samples: int = WEIGHT_SAMPLES
    include: Selector | None = None
    exclude: Selector | None = None
    window: bool | None = None
    alerts: Mapping[str, Action] | None = None
    thresholds: Any = None
    warn: bool = True

    def __post_init__(self) -> None:
        should_log(self.every)
        for name in ("activation_stats", "warn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected True or False")
        check_int("weight_samples", self.weight_samples, 0, "a count of weights per layer; 0: none")
        check_int("activation_sample", self.activation_sample, 0, "a sample size; 0: every input")
        if self.window is not None and not isinstance(self.window, bool):
            raise ConfigError(f"window={self.window!r}; expected True, False or None (on where it is cheap)")
        for name in ("include", "exclude"):
            selectors = _selectors(getattr(self, name), name)
            object.__setattr__(self, name, tuple(selectors) if selectors is not None else None)
        resolve_alerts(self.alerts, self.warn)  # raises ConfigError on an unknown kind or action
        if self.alerts is not None:
            object.__setattr__(self, "alerts", types.MappingProxyType(dict(self.alerts)))

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The names of the fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, settings: WatchConfig | None, options: Mapping[str, Any], *,
                     where: str) -> WatchConfig:
        """``settings``, or a config made of ``options`` (keyword arguments named like the fields).

        Raises :class:`ConfigError` for an option that is not a field, and when both are given.
        """
        unknown = sorted(set(options) - set(cls.fields()))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {unknown}; the options are {list(cls.fields())}"
            )
        if settings is None:
            return cls(**options)
        if not isinstance(settings, WatchConfig):
            raise ConfigError(
                f"{where}: settings must be a gradwatch.WatchConfig; got {type(settings).__name__}"
            )
        if options:
            raise ConfigError(
                f"{where}: got settings= and the options {sorted(options)}; give them in one place, e.g. "
                f"settings=dataclasses.replace(settings, {next(iter(sorted(options)))}=...)"
            )
        return settings

    @classmethod
    def split(cls, settings: WatchConfig | None, options: dict[str, Any], *,
              where: str) -> tuple[WatchConfig, dict[str, Any]]:
        """A callback's keyword arguments: ``(the config, watch()'s RUNTIME_OPTIONS among them)``."""
        runtime = {k: options[k] for k in RUNTIME_OPTIONS if k in options}
        rest = {k: v for k, v in options.items() if k not in runtime}
        return cls.from_options(settings, rest, where=where), runtime

    def replace(self, **changes: Any) -> WatchConfig:
        """A copy with ``changes`` (validated like a new config)."""
        return dataclasses.replace(self, **changes)


def should_log(every: int | Callable[[int], bool]) -> Callable[[int], bool]:
    """``step -> whether it is logged`` for ``every`` (a positive int or a callable)."""
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int):
        raise ConfigError(
            f"every={every!r}; expected a positive int (log every N-th step) or a callable step -> bool"
        )
    if every < 1:
        raise ConfigError(
            f"every={every}; expected a positive int: every=1 logs each step, every=10 each tenth"
        )
    return lambda step: step % every == 0


def _selectors(value: Selector | None, what: str) -> list[str | type] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, type)) else list(value)
    for item in items:
        if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise ConfigError(
                f"{what} takes module-name patterns ('encoder.*') or nn.Module types (nn.Linear); "
                f"got {item!r}"
            )
    return items
