"""The ``dying_relu`` preset: networks born dead (Lu, Shin, Su & Karniadakis 2019).

Lu et al. prove that a deep ReLU network whose weights (and biases) are drawn from
symmetric distributions is *born dead* with a probability that tends to 1 as the depth
grows: some hidden layer outputs zero for every input, so the network is a constant
function and no gradient reaches the layers below. Narrow nets die first; the paper
gives, for 9 hidden layers (as filed in issue 8), about 0.82-0.88 of the nets of width
2, 0.45-0.59 of width 3, 0.09-0.11 of width 5 and below 0.01 of width 10.

Our Monte Carlo (:func:`born_dead_fraction`) follows the paper's one-dimensional setup
as we read it: input dimension 1, inputs uniform on [-sqrt(3), sqrt(3)] (mean 0,
variance 1), He-normal weights W ~ N(0, 2 / fan_in), zero biases (the lab's ``he``
init), ``depth`` hidden ReLU layers of ``width`` units. A net is born dead when some
hidden layer is zero for every one of the sampled inputs. With zero biases a layer
that is zero stays zero above, and the verdict does not depend on the weights' scale,
only on their signs and directions. Thousands of nets are drawn at once as batched
matrix products (``(nets, width, width) @ (nets, width, inputs)``).

Each seed of a configuration gives one Monte Carlo estimate (``metrics["born_dead_frac"]``
seeded by the run's seed), so the paper table shows mean ± std over seeds. The grid's
runs are short watched trainings of each width (ReLU MLP, 9 hidden layers, He init, one
epoch on digits) so that the report also shows what the watcher's ``dead_frac`` sees at
initialisation; on digits' 64 input dimensions whole layers die less often than on the
paper's one-dimensional inputs, so those runs are context, not a reproduction.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from gradwatch import numbers
from gradwatch.errors import check_int
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import (
    Claim,
    ClaimCheck,
    ConfigSummary,
    MetricFn,
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
    "WIDTHS",
    "HIDDEN_LAYERS",
    "MC_NETS",
    "MC_INPUTS",
    "PUBLISHED_BORN_DEAD",
    "born_dead_fraction",
    "single_input_dead_probability",
    "born_dead_metric",
    "dying_relu_key",
    "dying_relu_preset",
]

PAPER = ("Lu Lu, Yeonjong Shin, Yanhui Su and George Em Karniadakis (2019). Dying ReLU and "
         "Initialization: Theory and Numerical Examples. arXiv:1903.06733; Communications in "
         "Computational Physics 28(5), 1671-1706, 2020.")
WIDTHS = (2, 3, 4, 5, 10)
HIDDEN_LAYERS = 9
MC_NETS = 10_000  # per width and seed: binomial standard error <= 0.005
MC_INPUTS = 32  # inputs per net, uniform on [-sqrt(3), sqrt(3)]
INPUT_DIM = 1
# As filed in issue 8 from Lu et al. (2019): born-dead probability at 9 hidden layers.
PUBLISHED_BORN_DEAD: dict[int, tuple[float, float]] = {2: (0.82, 0.88), 3: (0.45, 0.59),
                                                       5: (0.09, 0.11), 10: (0.0, 0.01)}
# One short epoch of the watched runs: enough to record initialisation (step 0) and a few steps.
WATCH_TRAIN = TrainSettings(optimizer="adam", lr=1e-3, epochs=1, batch_size=64, every=5)


@functools.lru_cache(maxsize=256)
def born_dead_fraction(width: int, *, depth: int = HIDDEN_LAYERS, nets: int = MC_NETS,
                       inputs: int = MC_INPUTS, input_dim: int = INPUT_DIM, seed: int = 0,
                       chunk: int = 4096) -> float:
    """Monte Carlo estimate of the probability that a He-initialised ReLU net is born dead.

    Draws ``nets`` networks of ``depth`` hidden ReLU layers of ``width`` units, weights
    W ~ N(0, 2 / fan_in) and zero biases (He et al. 2015), and one set of ``inputs``
    points uniform on [-sqrt(3), sqrt(3)]^input_dim; a net is born dead (Lu et al. 2019,
    definition 3.1) when some hidden layer's output is zero for every input, which makes
    the network constant. Nets are drawn ``chunk`` at a time as batched matrix products.

    Args:
        width: units per hidden layer.
        depth: hidden layers. Default: 9.
        nets: networks drawn. Default: 10,000 (standard error <= 0.005).
        inputs: input points shared by all nets. Default: 32.
        input_dim: input dimension. Default: 1 (the paper's one-dimensional examples).
        seed: seeds a private generator (the global RNG is untouched).
        chunk: nets per batched product (memory ~ chunk * width * inputs floats).

    Returns:
        The fraction of the ``nets`` networks that are born dead.

    Raises:
        ConfigError: a size below 1.
    """
    for name, value in (("width", width), ("depth", depth), ("nets", nets), ("inputs", inputs),
                        ("input_dim", input_dim), ("chunk", chunk)):
        check_int(name, value, 1)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(inputs, input_dim, generator=gen) * 2 - 1) * math.sqrt(3.0)
    dead = 0
    for start in range(0, nets, chunk):
        m = min(chunk, nets - start)
        h = x.T.expand(m, input_dim, inputs)  # (nets, units, inputs)
        alive = torch.ones(m, dtype=torch.bool)
        fan_in = input_dim
        for _ in range(depth):
            w = torch.randn(m, width, fan_in, generator=gen) * math.sqrt(2.0 / fan_in)
            h = torch.relu(torch.bmm(w, h))
            alive &= h.flatten(1).amax(1) > 0
            fan_in = width
        dead += int((~alive).sum())
    return dead / nets


def single_input_dead_probability(width: int, depth: int = HIDDEN_LAYERS) -> float:
    """Exact probability that one fixed nonzero input dies within ``depth`` layers:
    ``1 - (1 - 2^-width)^depth``.

    With zero biases and weights symmetric about 0, each unit of a layer is active for a
    given nonzero input with probability 1/2, independently of the others, so a layer
    turns a live input into all zeros with probability 2^-width. A born-dead net must
    kill every input, so this is an upper bound on :func:`born_dead_fraction` (and its
    value when ``inputs=1``).
    """
    return 1.0 - (1.0 - 2.0 ** -width) ** depth


def born_dead_metric(nets: int = MC_NETS) -> MetricFn:
    """``metrics["born_dead_frac"]``: a function giving one Monte Carlo estimate of
    :func:`born_dead_fraction` (``nets`` networks) per seed of a configuration, at its
    width and depth, seeded by the run's seed.
    """
    def born_dead_frac(summary: ConfigSummary, store: RunStore | None) -> tuple[float, ...]:
        m = summary.entry.model
        return tuple(born_dead_fraction(m.width, depth=m.depth, nets=nets, seed=int(seed))
                     for seed in summary.seeds)
    return born_dead_frac


def dying_relu_key(width: int) -> str:
    """The config key of one width, ``born-dead/relu-w<width>``."""
    return f"born-dead/relu-w{width}"


# --- claims ----------------------------------------------------------------------------------


def _estimates(summaries: Mapping[str, ConfigSummary], keys: Sequence[str], nets: int
               ) -> list[tuple[int, float, float, int]]:
    """``(width, mean, std over seeds, seeds)`` of the Monte Carlo estimate per configuration."""
    out = []
    metric = born_dead_metric(nets)
    for key in keys:
        s = summaries[key]
        values = metric(s, None)  # the Monte Carlo reads no store
        if not values:
            raise KeyError(key)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append((s.entry.model.width, statistics.fmean(values), std, len(values)))
    return out


def _falls_with_width_claim(keys: Sequence[str], nets: int) -> ClaimCheck:
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        rows = sorted(_estimates(summaries, keys, nets))
        means = [m for _, m, _, _ in rows]
        held = all(a > b for a, b in zip(means, means[1:], strict=False)) or (
            all(a >= b for a, b in zip(means, means[1:], strict=False)) and means[-1] == 0.0)
        listing = ", ".join(f"width {w}: {format_number(m)} ± {format_number(s)}" for w, m, s, _ in rows)
        return Verdict(held, f"born-dead fraction (Monte Carlo, {nets:,} nets per seed): {listing}")
    return check


def _matches_published_claim(keys: Sequence[str], z: float, nets: int) -> ClaimCheck:
    """Each width's mean is inside the published range widened by ``z`` standard errors."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        held, parts = True, []
        for width, mean, _, n in sorted(_estimates(summaries, keys, nets)):
            if width not in PUBLISHED_BORN_DEAD:
                continue
            low, high = PUBLISHED_BORN_DEAD[width]
            se = math.sqrt(max(mean * (1 - mean), 1e-12) / (nets * n))
            ok = low - z * se <= mean <= high + z * se
            held &= ok
            miss = 0.0 if low <= mean <= high else min(abs(mean - low), abs(mean - high))
            parts.append(f"width {width}: {mean:.3f} vs {low:g}-{high:g}"
                         + ("" if ok else f" (OUTSIDE by {miss:.3f} = {miss / se:.1f} standard errors)"))
        return Verdict(held, "; ".join(parts) + f"; standard error from {nets:,} nets x seeds, "
                             f"need within {z:g} of them")
    return check


def _watcher_claim(keys: Sequence[str]) -> ClaimCheck:
    """The watched runs' dead-unit fraction at initialisation falls with width."""
    def check(summaries: Mapping[str, ConfigSummary], store: RunStore) -> Verdict:
        rows = []
        for key in keys:
            s = summaries[key]
            fractions, dead_layers = [], 0
            for run_id in s.run_ids:
                frac, whole = _initial_dead(store, run_id)
                fractions.append(frac)
                dead_layers += whole
            rows.append((s.entry.model.width, statistics.fmean(fractions), dead_layers, len(s.run_ids)))
        rows.sort()
        means = [m for _, m, _, _ in rows]
        held = all(a >= b for a, b in zip(means, means[1:], strict=False)) and means[0] > means[-1]
        listing = ", ".join(f"width {w}: {100 * m:.0f}% ({d} of {n} runs with a whole layer dead)"
                            for w, m, d, n in rows)
        return Verdict(held, f"dead units at step 0 (hidden ReLUs, first batch of digits): {listing}")
    return check


def _initial_dead(store: RunStore, run_id: int) -> tuple[float, int]:
    """Mean dead-unit fraction of the hidden activations at the first logged step, and 1 if
    one of them is dead as a whole (the net is constant on that batch), else 0.
    """
    m = store.metrics(run_id, metrics=["dead_frac"])
    mean = numbers.dead_fraction(m, "first")
    if math.isnan(mean):
        raise ValueError(f"run {run_id} recorded no hidden activations")
    a = m[(m["kind"] == "activation") & m["dead_frac"].notna()]
    a = a[a["step"] == a["step"].min()]
    return mean, int((a["dead_frac"] >= 1.0).any())


# --- the preset --------------------------------------------------------------------------------


def dying_relu_preset(widths: Sequence[int] = WIDTHS, *, depth: int = HIDDEN_LAYERS,
                      train: TrainSettings = WATCH_TRAIN, seeds: int = 3, nets: int = MC_NETS) -> Preset:
    """The ``dying_relu`` preset over ``widths``, ``nets`` Monte Carlo draws per width and
    seed (smaller grids for tests).
    """
    grid = tuple(
        grid_entry("born-dead", dying_relu_key(w).split("/", 1)[1],
                   ModelConfig(depth=depth, width=w, activation="relu", init="he"), train)
        for w in widths
    )
    keys = [e.config_key for e in grid]
    published = tuple(
        Published(dying_relu_key(w), "born_dead_frac", PUBLISHED_BORN_DEAD[w], f"width {w}",
                  "numerical examples, 9 hidden layers (as filed in issue 8)")
        for w in widths if w in PUBLISHED_BORN_DEAD and depth == HIDDEN_LAYERS
    )
    claims = (
        Claim(f"the fraction of He-initialised ReLU nets born dead at {depth} hidden layers falls "
              "as the width grows", _falls_with_width_claim(keys, nets)),
        Claim("our Monte Carlo born-dead fractions fall within the published ranges "
              "(widened by 3 standard errors of our estimate)", _matches_published_claim(keys, 3.0, nets)),
        Claim("the watcher sees it at initialisation: the hidden ReLUs' dead-unit fraction at "
              "step 0 does not grow with width, and is higher at the narrowest width than at the widest",
              _watcher_claim(keys)),
    )
    return Preset(
        name="dying_relu",
        description=(f"ReLU nets born dead vs width at {depth} hidden layers, He init (Lu et al. 2019): "
                     f"Monte Carlo of {nets:,} nets per width and seed (1-d inputs), beside one-epoch "
                     "watched runs of each width on digits; about a minute on 2 cores"),
        grid=grid,
        claims=claims,
        dataset="digits",
        seeds=seeds,
        paper=PAPER,
        published=published,
        metrics={"born_dead_frac": born_dead_metric(nets)},
    )


register_preset(dying_relu_preset())
