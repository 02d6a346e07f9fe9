"""Step-time overhead of watching, measured side by side against the tools people use today.

Each round times every variant step by step beside a fresh copy of its baseline (same seed,
same batch; steps alternate A B, B A, ...), so both see the same moment of a shared machine;
``--unpaired`` times each variant in a block of its own steps instead, in an order that
rotates from round to round. Reported per model: the median over rounds of
(variant step time / baseline step time) with its min and max, and the median step time.
The baseline is the unwatched eager model, or the unwatched compiled model for the
compiled rows. A step is ``zero_grad``, forward, loss, backward, ``optimizer.step()`` and the
variant's per-step logging call; the variant's final flush is inside the timed span.

Models (``--models``):

- ``mlp``: 20-layer tanh MLP, width 256, batch 128;
- ``cnn``: a ResNet-style CNN (stem + 4 BasicBlocks with BatchNorm and ``nn.ReLU(inplace=True)``,
  widths 16-32-64), 3x16x16 inputs, batch 64;
- ``bert``: ``transformers.BertForSequenceClassification`` from ``BertConfig(hidden_size=128,
  num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)``, sequence length 64,
  batch 16.

Variants (``--variants``, keys as below; ``unwatched`` always runs):

- ``unwatched``; ``foreach``: one ``torch._foreach_norm`` of all gradients and one transfer per
  step (the floor for per-layer norms); ``naive``: a forward hook and a tensor hook on every
  parameterised module (RMS of dL/d output) plus those norms (the naive floor for deltas);
- ``every``: gradwatch every step with every metric; ``part-*``: what each part of it costs, each
  row an every-step watcher timed step by step against the same watcher with that part off
  (``part-activations``: activation statistics; ``part-samples``: tracked weights;
  ``part-outputs``: the per-layer output hooks, delta_rms and output moments; ``part-store``:
  writing the rows; ``part-params``: the parameter-level metrics that remain, against
  unwatched); the "extra ms per step" column adds up to ``every``'s;
- ``default``: gradwatch at its default cadence
  (timed over whole logging periods: see :func:`steps_for`); ``default-window``: the same with
  ``window=True`` (every step's gradient norms; the CPU default is off);
- ``wandb-gradients``, ``wandb-all``: ``wandb.watch(model, log="gradients"|"all", log_freq=1)`` in
  offline mode (``WANDB_MODE=offline``, ``WANDB_DIR`` a temporary directory) and ``wandb.log`` of
  the loss every step;
- ``tensorboard``: ``SummaryWriter.add_histogram`` of every gradient and weight every step;
- ``lightning``: Lightning's ``grad_norm(model, 2)`` before every optimizer step;
- ``compiled``, ``compiled-default``, ``compiled-every``: ``torch.compile(model)`` (inductor on
  CPU) unwatched, and ``gradwatch.watch()`` on the compiled model.

A peer that is not installed (``pip install -e '.[bench]'``) gives a "not installed" row; a
variant that raises gives a "failed" row with the error, in the table and the JSON.

    python bench/overhead.py [--models mlp,cnn,bert] [--variants every,default,...]
                             [--repeats 5] [--steps 20] [--warmup 5] [--threads 2]

Writes bench/results/overhead-<model>-<threads>threads.json per model and prints one
markdown table per model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradwatch
from gradwatch.errors import GradientWarning

RESULTS = Path(__file__).parent / "results"
DEFAULT_EVERY = gradwatch.watch.__kwdefaults__["every"]
COMPILED_WARMUP = 25  # compilation happens on the first steps (no per-layer hooks on a compiled model)


# -- models --------------------------------------------------------------------------------


def tanh_mlp(depth: int = 20, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """He et al. (2016)'s basic residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet_cnn(width: int = 16, classes: int = 10) -> nn.Module:
    """Stem, then BasicBlocks at widths w, w, 2w (stride 2), 4w (stride 2), pool, linear."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        BasicBlock(width, width),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


def bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    return BertForSequenceClassification(config)


BERT_SEQ, BERT_BATCH = 64, 16


def _classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _bert_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: how to build it, its (fixed) batch, and its training loss."""

    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    requires: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "20-layer tanh MLP, width 256, batch 128",
        tanh_mlp,
        lambda g: (torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)),
        _classification_loss,
    ),
    "cnn": ModelSpec(
        "ResNet-style CNN, 4 BasicBlocks (BN, in-place ReLU), widths 16-32-64, 3x16x16, batch 64",
        resnet_cnn,
        lambda g: (torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)),
        _classification_loss,
    ),
    "bert": ModelSpec(
        f"BERT (transformers BertForSequenceClassification: hidden 128, 2 layers, 2 heads, "
        f"intermediate 512), seq {BERT_SEQ}, batch {BERT_BATCH}",
        bert_classifier,
        lambda g: (
            torch.randint(0, 30522, (BERT_BATCH, BERT_SEQ), generator=g),
            torch.randint(0, 2, (BERT_BATCH,), generator=g),
        ),
        _bert_loss,
        requires=("transformers",),
    ),
}


# -- variants ------------------------------------------------------------------------------


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class _ForeachFloor:
    """The floor for per-layer norms: one ``torch._foreach_norm`` and one transfer per step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        params = list(model.parameters())

        def hook(optimizer, args, kwargs):
            torch.stack(torch._foreach_norm(_grads(params))).cpu()

        self.handle = opt.register_step_pre_hook(hook)

    def detach(self) -> None:
        self.handle.remove()


class _NaiveDeltaFloor:
    """PEERS.md's naive floor for deltas: a forward hook and a tensor hook (RMS of dL/d output) on
    every parameterised module, plus foreach norms of the gradients, one transfer per step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.values: list[torch.Tensor] = []
        self.handles = [
            m.register_forward_hook(self._forward)
            for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        params = list(model.parameters())

        def step(optimizer, args, kwargs):
            norms = torch._foreach_norm(_grads(params))
            torch.stack([*norms, *self.values]).cpu()
            self.values.clear()

        self.handles.append(opt.register_step_pre_hook(step))

    def _forward(self, module, args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._grad)

    def _grad(self, grad):
        self.values.append(grad.pow(2).mean().sqrt())

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


_wandb_run: Any = None


def _wandb() -> Any:
    """One offline wandb run for the whole benchmark (``wandb.init`` takes seconds)."""
    global _wandb_run
    if _wandb_run is None:
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_DIR"] = tempfile.mkdtemp(prefix="gradwatch-bench-wandb-")  # removed at the end
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        _wandb_run = wandb.init(project="gradwatch-bench", mode="offline", dir=os.environ["WANDB_DIR"])
    return _wandb_run


class _WandbWatch:
    """``wandb.watch(model, log=..., log_freq=1)`` and ``wandb.log`` of the loss every step."""

    def __init__(self, model: nn.Module, log: str) -> None:
        self.run = _wandb()
        self.model = model
        self.run.watch(model, log=log, log_freq=1)

    def log(self, loss: torch.Tensor) -> None:
        self.run.log({"loss": loss.item()})

    def detach(self) -> None:
        self.run.unwatch(self.model)


class _TensorBoardHistograms:
    """``add_histogram`` of every parameter's gradient and weight before every optimizer step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))
        self.step = 0
        named = list(model.named_parameters())

        def hook(optimizer, args, kwargs):
            for name, p in named:
                if p.grad is not None:
                    self.writer.add_histogram(f"grad/{name}", p.grad, self.step)
                self.writer.add_histogram(f"weight/{name}", p.detach(), self.step)
            self.step += 1

        self.handle = opt.register_step_pre_hook(hook)

    def log(self, loss: torch.Tensor) -> None:
        self.writer.add_scalar("loss", loss.item(), self.step)

    def flush(self) -> None:
        self.writer.flush()

    def detach(self) -> None:
        self.handle.remove()
        self.writer.close()


class _LightningGradNorm:
    """Lightning's ``grad_norm(model, 2)`` (per-parameter 2-norms and their total) before each step,
    as ``LightningModule.on_before_optimizer_step`` calls it; the norms are not sent to a logger."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError:
            from pytorch_lightning.utilities import grad_norm

        def hook(optimizer, args, kwargs) -> None:
            grad_norm(model, 2)

        self.handle = opt.register_step_pre_hook(hook)

    def detach(self) -> None:
        self.handle.remove()


Attach = Callable[[nn.Module, torch.optim.Optimizer, Path], object]


@dataclass(frozen=True)
class Variant:
    """How one row of the table watches (or does not watch) the model."""

    key: str
    name: str
    attach: Attach | None
    requires: tuple[str, ...] = ()
    compiled: bool = False
    against: str | None = None  # the baseline variant, if not the unwatched (compiled) model
    listed: bool = True  # False: only a baseline of another row

    @property
    def baseline(self) -> str:
        if self.against is not None:
            return self.against
        return "compiled" if self.compiled else "unwatched"


def _gradwatch(every: int | None, then: Callable[[object], None] | None = None, **options: Any) -> Attach:
    def attach(model: nn.Module, opt: torch.optim.Optimizer, tmp: Path) -> object:
        kwargs = {} if every is None else {"every": every}
        watcher = gradwatch.watch(model, opt, store=tmp / "gradwatch.db", **kwargs, **options)
        if then is not None:
            then(watcher)
        return watcher

    return attach


def _lighter(*, outputs: bool = True, store: bool = True) -> Callable[[object], None]:
    """Switch parts of an every-step watcher off, for the breakdown rows (what each part costs).

    ``outputs=False``: no per-layer forward hooks (no delta_rms, output moments or activation
    statistics; the parameter-level metrics stay). ``store=False``: the rows are built but
    not written. Both go through the Watcher's own seams, as a test double would.
    """

    def lighten(watcher: object) -> None:
        if not outputs:
            watcher._make_param_hook = lambda layer: (lambda *args: None)
            watcher._make_activation_hook = lambda layer: (lambda *args: None)
        if not store:
            for name in ("add_layer_array", "add_scalars", "add_weight_samples"):
                setattr(watcher.store, name, lambda *args, **kwargs: None)

    return lighten


_LEAN_A = {"activation_stats": False}
_LEAN_B = {"activation_stats": False, "weight_samples": 0}
_EVERY_C = _gradwatch(1, then=_lighter(outputs=False), **_LEAN_B)
_EVERY_D = _gradwatch(1, then=_lighter(outputs=False, store=False), **_LEAN_B)

VARIANTS = [
    Variant("unwatched", "unwatched", None),
    Variant("foreach", "torch._foreach_norm floor", lambda m, o, tmp: _ForeachFloor(m, o)),
    Variant("naive", "naive delta floor (hooks + norms)", lambda m, o, tmp: _NaiveDeltaFloor(m, o)),
    Variant("every", "gradwatch every step", _gradwatch(1)),
    # The breakdown of "every step": each row is a watcher timed step by step against the same
    # watcher with one more part switched off (an unlisted variant, below), so its extra
    # milliseconds are what that part costs; the last row is what remains against unwatched.
    Variant("part-activations", "  of which activation statistics", _gradwatch(1), against="every-a"),
    Variant("part-samples", "  of which tracked weights", _gradwatch(1, **_LEAN_A), against="every-b"),
    Variant(
        "part-outputs", "  of which output hooks (delta_rms, output moments)", _gradwatch(1, **_LEAN_B),
        against="every-c",
    ),
    Variant("part-store", "  of which writing the rows", _EVERY_C, against="every-d"),
    Variant("part-params", "  of which parameter-level metrics (norms, update ratios)", _EVERY_D),
    Variant("every-a", "every step, no activation statistics", _gradwatch(1, **_LEAN_A), listed=False),
    Variant("every-b", "every step, no activation statistics or tracked weights", _gradwatch(1, **_LEAN_B),
            listed=False),
    Variant("every-c", "every step, parameter-level metrics only", _EVERY_C, listed=False),
    Variant("every-d", "every step, parameter-level metrics, rows not written", _EVERY_D, listed=False),
    Variant("default", f"gradwatch default (every {DEFAULT_EVERY})", _gradwatch(None)),
    Variant(
        "default-window", f"gradwatch every {DEFAULT_EVERY}, window=True", _gradwatch(None, window=True)
    ),
    Variant(
        "wandb-gradients",
        'wandb.watch(log="gradients"), every step',
        lambda m, o, tmp: _WandbWatch(m, "gradients"),
        requires=("wandb",),
    ),
    Variant(
        "wandb-all", 'wandb.watch(log="all"), every step', lambda m, o, tmp: _WandbWatch(m, "all"), ("wandb",)
    ),
    Variant(
        "tensorboard",
        "TensorBoard add_histogram, grads + weights, every step",
        lambda m, o, tmp: _TensorBoardHistograms(m, o, Path(tempfile.mkdtemp(dir=tmp))),
        requires=("tensorboard",),
    ),
    Variant(
        "lightning",
        "Lightning grad_norm, every step",
        lambda m, o, tmp: _LightningGradNorm(m, o),
        requires=("lightning|pytorch_lightning",),
    ),
    Variant("compiled", "torch.compile, unwatched", None, compiled=True),
    Variant(
        "compiled-default",
        f"torch.compile + gradwatch default (every {DEFAULT_EVERY})",
        _gradwatch(None),
        compiled=True,
    ),
    Variant("compiled-every", "torch.compile + gradwatch every step", _gradwatch(1), compiled=True),
]
VARIANT_KEYS = [v.key for v in VARIANTS if v.listed]


def missing_requirement(requires: tuple[str, ...]) -> str | None:
    """The first required module (``a|b``: either) that cannot be imported, else None."""
    for req in requires:
        if not any(importlib.util.find_spec(name) is not None for name in req.split("|")):
            return req.split("|")[0]
    return None


# -- timing --------------------------------------------------------------------------------


def _detach(handle: object) -> None:
    if handle is None:
        return
    if hasattr(handle, "detach"):
        handle.detach()
    else:
        handle.remove()


def train_step(
    spec: ModelSpec, model: nn.Module, opt: torch.optim.Optimizer, batch: tuple, log: Callable | None
) -> None:
    """One timed training step: zero_grad, forward and loss, backward, optimizer step, the log call."""
    opt.zero_grad()
    loss = spec.loss(model, batch)
    loss.backward()
    opt.step()
    if log is not None:
        log(loss=loss)


def time_variant(
    variant: Variant, spec: ModelSpec, steps: int, warmup: int, tmp: Path, seed: int
) -> tuple[float, float]:
    """Seconds per training step (zero_grad, forward, loss, backward, optimizer step, log) of one
    variant: wall-clock, and the process's CPU time (all its threads: PyTorch's and the store's
    writer), which another job on the machine disturbs far less than wall-clock time."""
    torch.manual_seed(seed)
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if variant.compiled:
        torch._dynamo.reset()  # a fresh model per round: stay under dynamo's recompile limit
        model = torch.compile(model)
        warmup = max(warmup, COMPILED_WARMUP)
    handle = variant.attach(model, opt, tmp) if variant.attach else None
    try:
        g = torch.Generator().manual_seed(seed)
        batch = spec.batch(g)
        log = getattr(handle, "log", None)
        for i in range(warmup + steps):
            if i == warmup:
                start, start_cpu = time.perf_counter(), time.process_time()
            train_step(spec, model, opt, batch, log)
        if hasattr(handle, "flush"):
            handle.flush()  # the cost of writing is part of the cost
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        _detach(handle)
    return elapsed / steps, cpu / steps


def steps_for(variant: Variant, steps: int) -> int:
    """Timed steps of a variant: a whole number of logging periods at the default cadence.

    Any ``DEFAULT_EVERY`` consecutive steps hold exactly one logged step, so the default
    rows time the real mix of logged and unlogged steps (fewer steps would time only
    unlogged ones, or one logged step in too few).
    """
    if variant.key in ("default", "default-window", "compiled-default"):
        return max(1, math.ceil(steps / DEFAULT_EVERY)) * DEFAULT_EVERY
    return steps


def _fresh(variant: Variant, spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if variant.compiled:
        model = torch.compile(model)
    return model, opt


def time_pair(
    variant: Variant, baseline: Variant, spec: ModelSpec, steps: int, warmup: int, tmp: Path, seed: int
) -> tuple[float, float, float, float]:
    """One variant against its baseline, **step by step**: two copies of the model (same seed, same
    batch), one watched by the variant, whose training steps alternate (A B, B A, A B, ...), each
    timed on its own. Both copies see the same moment of a shared machine, so the ratio of their
    summed step times is far steadier than that of two runs one after the other.

    Returns seconds per step: variant wall, baseline wall, variant CPU, baseline CPU (process
    time, all threads).
    """
    if variant.compiled:
        torch._dynamo.reset()  # fresh models per round: stay under dynamo's recompile limit
        warmup = max(warmup, COMPILED_WARMUP)
    base_model, base_opt = _fresh(baseline, spec, seed)
    model, opt = _fresh(variant, spec, seed)
    handle = variant.attach(model, opt, tmp) if variant.attach else None
    # a watched baseline (the breakdown rows), in a store of its own
    base_handle = None
    if baseline.attach is not None:
        base_handle = baseline.attach(base_model, base_opt, Path(tempfile.mkdtemp(dir=tmp)))
    batch = spec.batch(torch.Generator().manual_seed(seed))
    log = getattr(handle, "log", None)
    wall = [0.0, 0.0]
    cpu = [0.0, 0.0]
    runs = [(model, opt, log), (base_model, base_opt, getattr(base_handle, "log", None))]
    try:
        for i in range(warmup + steps):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                m, o, lg = runs[k]
                t, c = time.perf_counter(), time.process_time()
                train_step(spec, m, o, batch, lg)
                if i >= warmup:
                    wall[k] += time.perf_counter() - t
                    cpu[k] += time.process_time() - c
        for k, h in ((0, handle), (1, base_handle)):
            if hasattr(h, "flush"):
                t, c = time.perf_counter(), time.process_time()
                h.flush()  # the cost of writing is part of the cost
                wall[k] += time.perf_counter() - t
                cpu[k] += time.process_time() - c
    finally:
        _detach(handle)
        _detach(base_handle)
    return wall[0] / steps, wall[1] / steps, cpu[0] / steps, cpu[1] / steps


def _error_text(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    text = "".join(lines).strip()
    return text if len(text) <= 4000 else text[:4000] + " ..."


def bench_model(
    model_name: str,
    variants: list[Variant],
    repeats: int,
    steps: int,
    warmup: int,
    tmp: Path,
    paired: bool = True,
) -> list[dict[str, Any]]:
    """Rounds of every variant on one model; one result row per variant.

    ``paired``: each variant against its baseline step by step (:func:`time_pair`); else each
    variant's steps in a block of its own, the variants in a rotating order (:func:`time_variant`).
    """
    spec = MODELS[model_name]
    status: dict[str, str] = {}
    errors: dict[str, str] = {}
    for v in variants:
        missing = missing_requirement(v.requires)
        status[v.key] = f"not installed ({missing})" if missing else "ok"
    runnable = [v for v in variants if status[v.key] == "ok"]
    times: dict[str, list[float]] = {v.key: [] for v in variants}
    ratios: dict[str, list[float]] = {v.key: [] for v in variants}
    cpu_ratios: dict[str, list[float]] = {v.key: [] for v in variants}
    extra_ms: dict[str, list[float]] = {v.key: [] for v in variants}
    for r in range(repeats):
        live = [v for v in runnable if status[v.key] == "ok"]
        order = live[r % len(live) :] + live[: r % len(live)]
        this_round: dict[str, float] = {}
        this_cpu: dict[str, float] = {}
        for v in order:
            try:
                if paired and v.attach is not None:
                    baseline = next(b for b in VARIANTS if b.key == v.baseline)
                    this_round[v.key], base_wall, this_cpu[v.key], base_cpu = time_pair(
                        v, baseline, spec, steps_for(v, steps), warmup, tmp, seed=r
                    )
                    if baseline.key in times:  # the baseline row: its steps beside the first variant
                        this_round.setdefault(baseline.key, base_wall)
                        this_cpu.setdefault(baseline.key, base_cpu)
                    this_round[f"{v.key}@base"], this_cpu[f"{v.key}@base"] = base_wall, base_cpu
                elif paired:
                    continue  # a baseline: timed beside each variant
                else:
                    this_round[v.key], this_cpu[v.key] = time_variant(
                        v, spec, steps_for(v, steps), warmup, tmp, seed=r
                    )
            except Exception as err:  # noqa: BLE001 - a failing variant is a result, not a crash
                status[v.key] = "failed"
                errors[v.key] = _error_text(err)
                print(f"  {model_name} / {v.key} failed: {errors[v.key].splitlines()[-1][:300]}", flush=True)
        for key, t in this_round.items():
            if key.endswith("@base"):
                continue
            times[key].append(t)
            baseline = next(v for v in VARIANTS if v.key == key).baseline
            base = f"{key}@base" if f"{key}@base" in this_round else baseline
            if base in this_round:
                ratios[key].append(t / this_round[base])
                cpu_ratios[key].append(this_cpu[key] / this_cpu[base])
                extra_ms[key].append((t - this_round[base]) * 1e3)
        print(
            f"{model_name} round {r + 1}/{repeats}: "
            + ", ".join(f"{k} {t * 1e3:.1f} ms" for k, t in this_round.items() if not k.endswith("@base")),
            flush=True,
        )
    rows = []
    for v in variants:
        rs, ts, cs = ratios[v.key], times[v.key], cpu_ratios[v.key]
        rows.append(
            {
                "variant": v.name,
                "key": v.key,
                "baseline": next(b.name for b in VARIANTS if b.key == v.baseline),
                "status": status[v.key],
                "error": errors.get(v.key),
                "rounds_measured": len(ts),
                "median_ratio": statistics.median(rs) if rs else None,
                "min_ratio": min(rs) if rs else None,
                "max_ratio": max(rs) if rs else None,
                "median_step_ms": statistics.median(ts) * 1e3 if ts else None,
                "median_extra_ms": statistics.median(extra_ms[v.key]) if extra_ms[v.key] else None,
                "median_cpu_ratio": statistics.median(cs) if cs else None,
                "min_cpu_ratio": min(cs) if cs else None,
                "max_cpu_ratio": max(cs) if cs else None,
            }
        )
    return rows


# -- output --------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | step (ms) | extra ms per step | ratio to baseline, median | min | max "
        "| CPU-time ratio, median (min-max) | baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["median_ratio"] is None:
            what = row["status"]
            if row["error"]:
                what += ": " + row["error"].splitlines()[-1][:160].replace("|", "\\|")
            lines.append(f"| {row['variant']} | - | - | {what} | | | | |")
            continue
        step = f"{row['median_step_ms']:.2f}"
        note = "" if row["status"] == "ok" else f" ({row['status']} after {row['rounds_measured']} rounds)"
        lines.append(
            f"| {row['variant']} | {step} | {row['median_extra_ms']:+.2f} | {row['median_ratio']:.3f}x{note} "
            f"| {row['min_ratio']:.3f}x | "
            f"{row['max_ratio']:.3f}x | {row['median_cpu_ratio']:.3f}x ({row['min_cpu_ratio']:.3f}-"
            f"{row['max_cpu_ratio']:.3f}) | {row['baseline']} |"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__, "gradwatch": gradwatch.__version__}
    for name in ("wandb", "tensorboard", "lightning", "transformers"):
        if importlib.util.find_spec(name) is None:
            out[name] = None
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a version is nice to have
            out[name] = "unknown"
    return out


def _csv(value: str, known: list[str], what: str) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in items if s not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", "--model", default="mlp,cnn,bert", help="comma-separated: mlp,cnn,bert")
    parser.add_argument(
        "--variants", default=",".join(VARIANT_KEYS), help=f"comma-separated: {','.join(VARIANT_KEYS)}"
    )
    parser.add_argument("--repeats", "--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument(
        "--warmup", type=int, default=5, help=f"untimed steps first (at least {COMPILED_WARMUP} compiled)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--unpaired",
        action="store_true",
        help="time each variant in a block of its own steps (rotating order) instead of step by step "
        "beside a copy of its baseline",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    args = parser.parse_args()
    models = _csv(args.models, list(MODELS), "model")
    keys = set(_csv(args.variants, VARIANT_KEYS, "variant")) | {"unwatched"}
    if any(k.startswith("compiled-") for k in keys):
        keys.add("compiled")
    variants = [v for v in VARIANTS if v.key in keys]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=GradientWarning)  # a deep tanh net vanishes: known

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tables = []
    try:
        with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as d:
            for model_name in models:
                spec = MODELS[model_name]
                missing = missing_requirement(spec.requires)
                if missing:
                    print(f"{model_name}: skipped, {missing} not installed (pip install -e '.[bench]')")
                    continue
                rows = bench_model(
                    model_name, variants, args.repeats, args.steps, args.warmup, Path(d), not args.unpaired
                )
                how = "rotating blocks" if args.unpaired else "each variant step by step beside its baseline"
                head = (
                    f"{model_name}: {spec.description}; {args.repeats} rounds x {args.steps} steps "
                    f"({how}), {args.threads} threads, torch {torch.__version__}"
                )
                tables.append(f"{head}\n\n{markdown_table(rows)}")
                out = args.out / f"overhead-{model_name}-{args.threads}threads.json"
                out.write_text(
                    json.dumps(
                        {
                            "model": model_name,
                            "description": spec.description,
                            "rounds": args.repeats,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "threads": args.threads,
                            "paired": not args.unpaired,
                            "torch": torch.__version__,
                            "versions": _versions(),
                            "machine": platform.platform(),
                            "cpus": os.cpu_count(),
                            "load_average": list(os.getloadavg()),
                            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "rows": rows,
                        },
                        indent=2,
                    )
                    + "\n"
                )
                print(f"wrote {out}", flush=True)
    finally:
        if _wandb_run is not None:
            _wandb_run.finish()
            shutil.rmtree(os.environ["WANDB_DIR"], ignore_errors=True)
    print()
    print("\n\n".join(tables))
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
