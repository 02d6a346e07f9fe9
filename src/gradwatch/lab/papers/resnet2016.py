"""The ``resnet2016`` preset: plain vs residual stacks of increasing depth (He et al. 2016).

He, Zhang, Ren & Sun show the *degradation problem*: deeper plain networks (with batch
normalisation) reach a higher training and test error than shallower ones, while residual
networks of the same depth do not degrade and gain from depth (CIFAR-10 test error of
ResNets, Table 6: 20 layers 8.75%, 32: 7.51%, 44: 7.17%, 56: 6.97%, 110: 6.43%; ImageNet
top-1, Table 2: plain-18 27.94%, plain-34 28.54%, ResNet-18 27.88%, ResNet-34 25.03%).
They argue that it is not vanishing gradients: the plain nets use BN, so "neither forward
nor backward signals vanish", and they "verify that the backward propagated gradients
exhibit healthy norms with BN".

Ours, scaled down to a few minutes on two cores: 1-d CNNs on MNIST-1D (generated offline)
of 8, 20 and 56 weight layers as the paper counts them (6n + 2: 7, 19 and 55 hidden conv
layers plus the linear head) of 16 channels (kernel 3, same padding, no pooling), BatchNorm
and ReLU after each convolution, He init, trained with Adam (lr 1e-3, batches of 64) for 8
epochs. The residual nets use the paper's basic block (``block="basic"``: two convolutions,
relu(h + bn(conv(relu(bn(conv(h))))))) after a first convolution; the plain nets are the
same stacks without the shortcut. The optimiser is the lab's Adam, not the paper's SGD with
momentum 0.9 and lr 0.1 (which we did not tune for these nets).

Telemetry: the watcher records delta RMS (the back-propagated error dL/d(output)) of every
layer at every logged step; ``delta_ratio`` is the first over the last weight layer's (the
first conv over the head; BatchNorm not counted), at initialisation and over training.
Below 1 it vanishes toward the input, above 1 it grows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from gradwatch import numbers
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import (
    Claim,
    ClaimCheck,
    ConfigSummary,
    Preset,
    Published,
    TrainSettings,
    Verdict,
    format_number,
    grid_entry,
    register_preset,
)
from gradwatch.store import RunStore

__all__ = [
    "PAPER",
    "DEPTHS",
    "RESNET_TRAIN",
    "resnet_key",
    "resnet_preset",
    "final_train_loss",
    "delta_ratio_series",
]

PAPER = ("Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2016). Deep Residual Learning for "
         "Image Recognition. CVPR 2016, 770-778; arXiv:1512.03385.")
DEPTHS = (8, 20, 56)  # weight layers, as the paper counts: hidden conv layers + the linear head
WIDTH = 16  # the paper's first stage on CIFAR-10 has 16 filters
RESNET_TRAIN = TrainSettings(optimizer="adam", lr=1e-3, epochs=8, batch_size=64, every=10)
NOT_WORSE_PTS = 2.0  # "residual nets do not degrade": deepest within this many points of the shallowest
HEALTHY = (0.1, 10.0)  # a first/last delta ratio in this band neither vanishes nor explodes


def resnet_key(residual: bool, layers: int) -> str:
    """The config key of one stack of ``layers`` weight layers, ``plain/cnn-<layers>`` or
    ``residual/cnn-<layers>``.
    """
    return f"{'residual' if residual else 'plain'}/cnn-{layers}"


def layers_of(model: ModelConfig) -> int:
    """Weight layers as the paper counts them: the hidden layers plus the linear head."""
    return model.depth + 1


def _model(residual: bool, layers: int) -> ModelConfig:
    return ModelConfig(kind="cnn", depth=layers - 1, width=WIDTH, activation="relu", init="he",
                       batch_norm=True, residual=residual, block="basic")


# --- reading the runs ----------------------------------------------------------------------------


def final_train_loss(summary: ConfigSummary, store: RunStore) -> tuple[float, ...]:
    """``metrics["final_train_loss"]``: the last epoch's mean training loss, per seed (the
    paper's degradation is seen on the training set first).
    """
    out = []
    for run_id in summary.run_ids:
        s = store.scalars(run_id, names=["train_loss"])
        values = s["train_loss"].dropna() if "train_loss" in s else []
        out.append(float(values.iloc[-1]) if len(values) else math.nan)
    return tuple(out)


def delta_ratio_series(store: RunStore, run_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, ratio)``: the run's first over last weight layer delta RMS at each logged
    step, :func:`gradwatch.numbers.delta_ratio_series` (BatchNorm layers not counted;
    docs/lab-contract.md).
    """
    ratio = numbers.delta_ratio_series(store.metrics(run_id, metrics=["delta_rms"]))
    return ratio.index.to_numpy(float), ratio.to_numpy(float)


def _forward_std(store: RunStore, run_id: int) -> tuple[float, float]:
    """Smallest and largest output std of the hidden BatchNorm layers at initialisation."""
    m = store.metrics(run_id, metrics=["output_std"])
    bn = m[m["layer"].str.startswith("hidden.") & m["type"].str.contains("Norm")]
    bn = bn[bn["step"] == bn["step"].min()]["output_std"].dropna()
    if bn.empty:
        return math.nan, math.nan
    return float(bn.min()), float(bn.max())


def _geomean(values: Sequence[float]) -> float:
    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    return math.exp(statistics.fmean(logs)) if logs else math.nan


# --- claims ----------------------------------------------------------------------------------


def _plain_degrades_claim(keys: Sequence[str]) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        rows = sorted(_rows(summaries, keys, store))
        errs = [e for _, e, _ in rows]
        losses = [loss for _, _, loss in rows]
        held = all(a < b for a, b in zip(errs, errs[1:], strict=False)) and \
            all(a < b for a, b in zip(losses, losses[1:], strict=False))
        return Verdict(held, "plain nets by depth: " + "; ".join(
            f"{d} layers: test error {e:.1f}%, final train loss {format_number(t)}" for d, e, t in rows)
            + " (need both to rise with depth)")
    return check


def _rows(summaries: Mapping[str, ConfigSummary], keys: Sequence[str], store: RunStore
          ) -> list[tuple[int, float, float]]:
    out = []
    for key in keys:
        s = summaries[key]
        out.append((layers_of(s.entry.model), 100 * (1 - s.test_acc_mean),
                    statistics.fmean(final_train_loss(s, store))))
    return out


def _residual_holds_claim(keys: Sequence[str], margin: float) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        rows = sorted(_rows(summaries, keys, store))
        shallow, deep = rows[0], rows[-1]
        held = deep[1] <= shallow[1] + margin
        return Verdict(held, "residual nets by depth: " + "; ".join(
            f"{d} layers: test error {e:.1f}%, final train loss {format_number(t)}" for d, e, t in rows)
            + f" (need the deepest's test error within {margin:g} points of the shallowest's or below)")
    return check


def _residual_beats_plain_claim(pairs: Sequence[tuple[str, str]]) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        parts, held = [], True
        for plain, residual in pairs:
            p, r = summaries[plain], summaries[residual]
            ep, er = 100 * (1 - p.test_acc_mean), 100 * (1 - r.test_acc_mean)
            held &= er < ep
            parts.append(f"{layers_of(p.entry.model)} layers: plain {ep:.1f}%, residual {er:.1f}%")
        return Verdict(held, "test error: " + "; ".join(parts))
    return check


def _not_vanishing_claim(key: str) -> ClaimCheck:
    """Neither forward nor backward signals vanish in the deepest plain net."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        s = summaries[key]
        lows, inits, stds = [], [], []
        for run_id in s.run_ids:
            _, ratio = delta_ratio_series(store, run_id)
            ratio = ratio[np.isfinite(ratio)]
            if not len(ratio):
                raise ValueError(f"run {run_id} recorded no delta RMS")
            lows.append(float(ratio.min()))
            inits.append(float(ratio[0]))
            stds.append(_forward_std(store, run_id))
        low_std = min(lo for lo, _ in stds)
        held = min(lows) >= HEALTHY[0] and low_std >= 0.5
        return Verdict(held, f"{s.label}: first/last delta RMS at initialisation "
                             + ", ".join(format_number(v) for v in inits)
                             + "; smallest over training " + ", ".join(format_number(v) for v in lows)
                             + f" (need >= {HEALTHY[0]:g}: not vanishing); BatchNorm outputs' std at "
                             f"initialisation >= {low_std:.2f} (need >= 0.5: forward signal kept)")
    return check


def _healthy_norms_claim(key: str) -> ClaimCheck:
    """The paper's 'healthy norms': the deepest plain net's first/last delta ratio within HEALTHY."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        s = summaries[key]
        inits, meds, highs = [], [], []
        for run_id in s.run_ids:
            _, ratio = delta_ratio_series(store, run_id)
            ratio = ratio[np.isfinite(ratio)]
            if not len(ratio):
                raise ValueError(f"run {run_id} recorded no delta RMS")
            inits.append(float(ratio[0]))
            meds.append(float(np.median(ratio)))
            highs.append(float(ratio.max()))
        low, high = HEALTHY
        held = all(low <= v <= high for v in meds + inits)
        return Verdict(held, f"{s.label}: first/last delta RMS at initialisation "
                             f"{format_number(_geomean(inits))} (geometric mean over seeds), median over "
                             f"training {format_number(_geomean(meds))}, "
                             f"largest {format_number(max(highs))}; "
                             f"need within [{low:g}, {high:g}] at initialisation and in the median")
    return check


# --- the preset --------------------------------------------------------------------------------


def resnet_preset(depths: Sequence[int] = DEPTHS, *, train: TrainSettings = RESNET_TRAIN,
                  seeds: int = 3) -> Preset:
    """The ``resnet2016`` preset over ``depths``, weight layers as the paper counts them
    (hidden conv layers + the head; even, so that basic blocks fit), smaller grids for tests.
    """
    depths = tuple(sorted(depths))

    def label(res: bool, d: int) -> str:
        return f"{'residual' if res else 'plain'} {d} layers (cnn, {WIDTH} channels, BN, ReLU, He init)"

    grid = tuple(
        grid_entry("residual" if res else "plain", resnet_key(res, d).split("/", 1)[1], _model(res, d), train,
                   label=label(res, d))
        for res in (False, True) for d in depths
    )
    plain = [resnet_key(False, d) for d in depths]
    residual = [resnet_key(True, d) for d in depths]
    deepest = resnet_key(False, depths[-1])

    def beside(depth: int, residual_net: bool) -> str | None:
        return resnet_key(residual_net, depth) if depth in depths else None

    published = (
        Published(beside(20, True), "test_error_pct", 8.75, "ResNet-20", "Table 6, CIFAR-10"),
        Published(None, "test_error_pct", 7.51, "ResNet-32", "Table 6, CIFAR-10"),
        Published(None, "test_error_pct", 7.17, "ResNet-44", "Table 6, CIFAR-10"),
        Published(beside(56, True), "test_error_pct", 6.97, "ResNet-56", "Table 6, CIFAR-10"),
        Published(None, "test_error_pct", 6.43, "ResNet-110", "Table 6, CIFAR-10"),
        Published(beside(20, False), "test_error_pct", 27.94, "plain-18", "Table 2, ImageNet top-1"),
        Published(beside(56, False), "test_error_pct", 28.54, "plain-34", "Table 2, ImageNet top-1"),
        Published(beside(20, True), "test_error_pct", 27.88, "ResNet-18", "Table 2, ImageNet top-1"),
        Published(beside(56, True), "test_error_pct", 25.03, "ResNet-34", "Table 2, ImageNet top-1"),
    )
    claims = (
        Claim("plain nets get worse with depth: test error and final training loss rise with depth",
              _plain_degrades_claim(plain)),
        Claim(f"residual nets do not: the deepest one's test error is no more than {NOT_WORSE_PTS:g} "
              "points above the shallowest one's", _residual_holds_claim(residual, NOT_WORSE_PTS)),
        Claim("at every depth beyond the shallowest the residual net beats the plain one",
              _residual_beats_plain_claim([(resnet_key(False, d), resnet_key(True, d)) for d in depths[1:]])),
        Claim(f"the deepest plain net's degradation is not vanishing gradients: its first/last delta "
              f"RMS stays >= {HEALTHY[0]:g} at every logged step and BN keeps the forward signal",
              _not_vanishing_claim(deepest)),
        Claim(f"the deepest plain net's back-propagated gradients have healthy norms (the paper's words): "
              f"first/last delta RMS within [{HEALTHY[0]:g}, {HEALTHY[1]:g}] at initialisation and in "
              "its median over training", _healthy_norms_claim(deepest)),
    )
    return Preset(
        name="resnet2016",
        description=(f"plain vs residual (basic blocks) 1-d CNNs (BN, ReLU, He init, {WIDTH} channels) of "
                     f"{'/'.join(map(str, depths))} layers on MNIST-1D, Adam {train.epochs} epochs "
                     "(He et al. 2016, scaled down from CIFAR-10); about 5 minutes on 2 idle cores"),
        grid=grid,
        claims=claims,
        dataset="mnist1d",
        seeds=seeds,
        paper=PAPER,
        # a plain row with no plain net beside it (a test's smaller grid) says nothing: dropped
        published=tuple(p for p in published if p.config_key is not None or p.label.startswith("ResNet-")),
        metrics={"final_train_loss": final_train_loss},
    )


register_preset(resnet_preset())
