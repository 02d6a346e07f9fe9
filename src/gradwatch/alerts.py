"""Alert rules: what the watcher does when a step shows non-finite, vanishing or exploding gradients.

A rule maps a *kind* of alert to an *action*::

    watch(model, opt, alerts={"nonfinite": "stop", "exploding": my_callback})

Kinds (judged by :class:`gradwatch.thresholds.Thresholds`, in :func:`gradwatch.thresholds.live_alert`):

* ``"nonfinite"``: a parameter's gradient holds inf or NaN. Checked on **every** step
  when the window is on (the per-step gradient norms of the windowed extremes), at the
  end of its backward pass when the gradients live on the CPU (no cost), else when the
  next logged step reaches the host (no device sync on unlogged steps); with the window
  off, on logged steps. ``"stop"`` or a callback turns the window on (``watch(window=None)``,
  the default). Not raised for a step that a ``GradScaler`` skips: overflow there is the
  scaler's normal business.
* ``"vanishing"``: the first parameterised layer's ``delta_rms`` is below
  ``vanishing_ratio`` of the last one's (logged steps).
* ``"exploding"``: that ratio is above ``exploding_ratio`` (logged steps).

Actions:

* ``"warn"``: a :class:`~gradwatch.errors.GradientWarning`, once per kind per run;
* ``"stop"``: write everything recorded, mark the run ``stopped`` and raise
  :class:`TrainingStopped` from the training call that noticed it (``loss.backward()``
  for a non-finite gradient on the CPU, else the next ``model(x)``);
* ``"ignore"``;
* a callable ``f(alert: Alert) -> None``, called at every step the condition holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Union

from gradwatch.errors import ConfigError, TrainingStopped

__all__ = ["Alert", "Action", "ALERT_KINDS", "ACTIONS", "resolve_alerts", "TrainingStopped"]

ALERT_KINDS = ("nonfinite", "vanishing", "exploding")
ACTIONS = ("warn", "stop", "ignore")
Action = Union[Literal["warn", "stop", "ignore"], Callable[["Alert"], None]]  # noqa: UP007 (runtime alias)


@dataclass(frozen=True)
class Alert:
    """One alert: what was seen, at which step, where.

    Attributes:
        kind: one of :data:`ALERT_KINDS`.
        step: the training step where it was first seen.
        message: one line for a person, ending with where to look next.
        layer: the module where it appeared (for ``"nonfinite"``: the first layer the
            non-finite value reached, in backward order; see :meth:`Watcher` docs), or None.
        run_id: the run in the store.
    """

    kind: str
    step: int
    message: str
    layer: str | None = None
    run_id: int | None = None


def resolve_alerts(alerts: Mapping[str, Action] | None, warn: bool) -> dict[str, Action]:
    """Each kind's action: ``alerts`` over the default (``"warn"``, or ``"ignore"`` if not ``warn``)."""
    default: Action = "warn" if warn else "ignore"
    out: dict[str, Action] = dict.fromkeys(ALERT_KINDS, default)
    if alerts is None:
        return out
    if not isinstance(alerts, Mapping):
        raise ConfigError(
            f"alerts={alerts!r}; expected a mapping of kind to action, e.g. {{'nonfinite': 'stop'}}"
        )
    for kind, action in alerts.items():
        if kind not in ALERT_KINDS:
            raise ConfigError(f"alerts: unknown kind {kind!r}; expected one of {', '.join(ALERT_KINDS)}")
        if not callable(action) and action not in ACTIONS:
            raise ConfigError(
                f"alerts[{kind!r}]={action!r}; expected one of {', '.join(ACTIONS)} or a callable "
                f"taking an Alert"
            )
        out[kind] = action
    return out
