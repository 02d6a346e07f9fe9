"""Mean-field theory measured: the per-layer delta RMS of random networks under ``watch()``.

:mod:`gradwatch.theory` predicts how ``RMS(dL/dh^l)`` changes from layer to layer in a
wide random network (``chi_1`` per layer, Poole et al. 2016; Schoenholz et al. 2017);
:func:`measure_delta_profile` draws such networks (:func:`gradwatch.theory.meanfield_mlp`),
back-propagates once under :func:`gradwatch.watch` and reads the deltas back from the
run store, so a prediction can be checked against what the watcher records.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from gradwatch.errors import check_int
from gradwatch.store import RunStore
from gradwatch.theory import (
    ActivationLike,
    activation_name,
    check_network,
    fixed_point_input,
    meanfield_mlp,
)
from gradwatch.watch import watch

__all__ = ["DeltaMeasurement", "measure_delta_profile"]


@dataclass(frozen=True, eq=False)
class DeltaMeasurement:
    """Per-layer ``RMS(dL/dh^l)`` of random networks at initialisation, measured by ``watch()``.

    Attributes:
        activation, sigma_w2, sigma_b2, width: the networks measured.
        q0: mean square of the inputs (``q^1 = sigma_w2 q0 + sigma_b2``).
        delta_rms: ``(seeds, depth)``, layer 1 first.
        run_ids: the watched runs, one per seed (in a temporary store unless one was given).
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    width: int
    q0: float
    delta_rms: np.ndarray
    run_ids: tuple[int, ...]

    @property
    def depth(self) -> int:
        """Number of weight layers."""
        return self.delta_rms.shape[1]

    @property
    def profile(self) -> np.ndarray:
        """``RMS(delta^l) / RMS(delta^depth)`` per layer, mean over seeds."""
        return (self.delta_rms / self.delta_rms[:, -1:]).mean(axis=0)

    @property
    def middle_layers(self) -> range:
        """0-based layers ``l`` whose ratio ``delta_l^2 / delta_{l+1}^2`` enters :attr:`chi1`."""
        lo = self.depth // 4
        return range(lo, max(lo + 1, self.depth - 1 - self.depth // 4))

    @property
    def chi1(self) -> float:
        """Mean of ``delta_l^2 / delta_{l+1}^2`` over the middle layers and the seeds."""
        if self.depth < 2:
            return math.nan
        sq = np.square(self.delta_rms)
        ratios = sq[:, :-1] / sq[:, 1:]
        return float(ratios[:, list(self.middle_layers)].mean())


def measure_delta_profile(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    *,
    width: int = 512,
    seeds: int = 3,
    batch: int = 64,
    q0: float | None = None,
    seed: int = 0,
    store: RunStore | str | os.PathLike | None = None,
) -> DeltaMeasurement:
    """Measure the per-layer delta RMS of :func:`~gradwatch.theory.meanfield_mlp` networks with
    ``gradwatch.watch``.

    Each seed draws a network, inputs ``x ~ N(0, q0)`` of shape ``(batch, width)`` and a
    readout ``v ~ N(0, 1)``, and back-propagates ``loss = mean_batch(phi(h^depth) . v)``
    once under ``watch(every=1)``; ``delta_rms`` is read back from the run store.

    Args:
        activation: registry name, Activation, module or elementwise callable.
        sigma_w2: weight variance times fan-in.
        sigma_b2: bias variance.
        depth: number of weight layers.
        width: units per layer. Default: 512.
        seeds: networks drawn. Default: 3.
        batch: inputs per network. Default: 64.
        q0: mean square of the inputs. Default: ``E[phi(sqrt(q*) z)^2]``, so that
            ``q^1 = q*`` and every layer starts at the fixed point (1 where ``q*`` is
            0 or infinite).
        seed: seeds are ``seed, seed + 1, ...``.
        store: a :class:`~gradwatch.store.RunStore` or path to keep the runs in.
            Default: a temporary store, removed afterwards.
    """
    name = activation_name(activation)
    sigma_w2, sigma_b2, depth = check_network(sigma_w2, sigma_b2, depth)
    for arg, value in (("seeds", seeds), ("batch", batch), ("width", width)):
        check_int(arg, value, 1)
    if q0 is None:
        q0 = fixed_point_input(activation, sigma_w2, sigma_b2)
    tmp = tempfile.TemporaryDirectory(prefix="gradwatch-theory-") if store is None else None
    run_store = store if isinstance(store, RunStore) else RunStore(store or f"{tmp.name}/runs.db")
    rms = np.empty((seeds, depth))
    run_ids = []
    try:
        for s in range(seeds):
            gen = torch.Generator().manual_seed(seed + s)
            model = meanfield_mlp(activation, sigma_w2, sigma_b2, depth, width, generator=gen)
            x = torch.randn(batch, width, generator=gen) * math.sqrt(q0)
            v = torch.randn(width, generator=gen)
            config = {"theory": {"activation": name, "sigma_w2": sigma_w2, "sigma_b2": sigma_b2,
                                 "depth": depth, "width": width, "q0": q0, "seed": seed + s}}
            run_name = f"theory-{name}-w{sigma_w2:g}-b{sigma_b2:g}-d{depth}-s{seed + s}"
            with watch(model, every=1, store=run_store, run_name=run_name, config=config,
                       activation_stats=False, warn=False) as watcher:
                model.train()
                (model(x) @ v).mean().backward()
                df = watcher.metrics(metrics=["delta_rms"])
            rms[s] = df[df["kind"] == "param"].sort_values("layer_id")["delta_rms"].to_numpy()
            run_ids.append(watcher.run_id)
    finally:
        if run_store is not store:
            run_store.close()
        if tmp is not None:
            tmp.cleanup()
    return DeltaMeasurement(name, sigma_w2, sigma_b2, width, float(q0), rms, tuple(run_ids))
