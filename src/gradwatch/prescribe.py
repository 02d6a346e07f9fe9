"""Verified prescriptions: try each fix on fresh copies of the user's model and measure.

:func:`prescribe` builds the model from its factory, checks it against the data,
then trains a short watched trial of the unchanged model and of each change the
seeds recommend: swap the activation (ReLU, LeakyReLU, tanh), re-initialise to
match the activation (He/Xavier), insert batch normalisation before activations,
add residual connections around equal-width blocks, remove layers, clip the
gradient norm, lower the learning rate. Every trial starts from the same weights
(same seed), sees the same batches in the same order and gets the same budget of
steps. The table ranks the changes by the loss they reach on the training set,
with the first/last delta ratio (the product of derivatives; 1 is healthy) beside it.

Trials run on a process pool (``fork``: models, factories and data are inherited,
never pickled; one torch thread per worker).
"""

from __future__ import annotations

import copy
import importlib
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradwatch.activations import activation_for_module, get_activation
from gradwatch.diagnose import FIXES, Finding, Prescription, Thresholds, delta_ratios, diagnose
from gradwatch.errors import ConfigError, DataError, GradwatchError, check_int
from gradwatch.store import RunStore
from gradwatch.watch import watch

if TYPE_CHECKING:
    from gradwatch.lab.data import Dataset

# The lab (gradwatch.lab.data, gradwatch.lab.models) is imported where it is used, not here:
# `import gradwatch` imports this module and must not load the lab.

__all__ = ["TRIALS", "TrialResult", "PrescriptionTable", "prescribe", "load_factory", "resolve_data"]

TRIALS = ("relu_he", "leaky_relu", "tanh", "relu", "reinit", "batch_norm", "residual", "fewer_layers",
          "clip_grad_norm", "lower_lr")
_BASELINE = "unchanged"
_CLIP = 1.0
_LR_FACTOR = 0.1
_CLEAR_GAIN = 0.1  # a fix "improves" when its loss is at least 10% below the unchanged model's
_RECTIFIER_NAMES = {"relu", "leaky_relu", "elu", "gelu", "silu"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_PARAM_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


# --- inputs: factory and data --------------------------------------------------------------


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``"package.module:factory"`` (the current directory is importable).

    Raises:
        ConfigError: malformed spec, module not importable, attribute missing or not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"factory {spec!r} is not of the form package.module:function; e.g. "
            f"mymodels:make_model for a function make_model() in mymodels.py"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"cannot import module {module_name!r} of factory {spec!r}: {err}; check the spelling, run "
            f"from the directory that holds it, or install its package (pip install -e .)"
        ) from err
    except Exception as err:
        raise ConfigError(
            f"importing module {module_name!r} of factory {spec!r} raised {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r}; its callables: "
                f"{', '.join(public[:12]) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"{spec!r} is a {type(obj).__name__}, not a callable; expected a function that returns "
            f"a torch.nn.Module"
        )
    return obj


def resolve_data(data: Any, seed: int = 0) -> Dataset:
    """A lab :class:`Dataset` from a Dataset, a built-in name or file path, or ``(x, y)`` arrays.

    Raises:
        DataError: empty, malformed or unreadable data (see :func:`gradwatch.lab.load_dataset`).
    """
    from gradwatch.lab.data import Dataset, load_dataset, prepare_arrays

    if isinstance(data, Dataset):
        if data.n_train == 0:
            raise DataError(f"{data.name}: the training split is empty; expected at least one example")
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v) for v in data)
        return prepare_arrays(x, y, name="arrays", seed=seed)
    raise DataError(
        f"data of type {type(data).__name__}; expected 'digits', 'mnist1d', a path to .npz/.csv, "
        f"a gradwatch.lab.Dataset, or a pair (x, y) of arrays"
    )


def _build(factory: Callable[[], Any] | nn.Module, seed: int) -> nn.Module:
    if isinstance(factory, nn.Module):
        return copy.deepcopy(factory)
    name = getattr(factory, "__qualname__", repr(factory))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory()
        except GradwatchError:
            raise
        except Exception as err:
            raise ConfigError(f"the model factory {name} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"the model factory {name} returned {type(model).__name__}; expected a torch.nn.Module "
            f"(make it `return model`)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"the model from {name} has no trainable parameters; nothing to prescribe for")
    return model


def _first_layer(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"its first layer '{name}' (Linear) expects {module.in_features} features"
        if isinstance(module, nn.modules.conv._ConvNd):
            return (f"its first layer '{name}' ({type(module).__name__}) expects {module.in_channels} "
                    f"input channel(s)")
    return "its first layer does not say what it expects"


def _input_mode(model: nn.Module, ds: Dataset) -> str:
    """'flat' when the model takes (N, features), 'shaped' for (N, *input_shape)."""
    x = ds.x_train[:2]
    errors = []
    was_training = model.training
    model.eval()
    try:
        candidates = [("flat", x), ("shaped", x.reshape(len(x), *ds.input_shape))]
        for mode, batch in candidates:
            try:
                with torch.no_grad():
                    out = model(batch)
            except Exception as err:  # noqa: BLE001 - any failure here is a shape mismatch to report
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if not isinstance(out, Tensor) or out.ndim != 2:
                raise DataError(
                    f"the model returns {type(out).__name__}"
                    + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
                    + f"; expected logits of shape (batch, {ds.n_classes}) for the {ds.n_classes} classes"
                )
            if out.shape[1] < ds.n_classes:
                raise DataError(
                    f"the model outputs {out.shape[1]} value(s) per example but {ds.name!r} has "
                    f"{ds.n_classes} classes; make its last layer output {ds.n_classes}"
                )
            return mode
    finally:
        model.train(was_training)
    raise DataError(
        f"the data {ds.name!r} has {ds.n_features} features per example (input shape "
        f"{tuple(ds.input_shape)}) but the model does not accept them: {_first_layer(model)}; "
        f"torch said: {errors[0]}"
    )


# --- the changes -----------------------------------------------------------------------------


def _activation_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and activation_for_module(m) is not None]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _seeded_init(model: nn.Module, init: str, activation: Any, seed: int) -> None:
    from gradwatch.lab.models import initialize_

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        initialize_(model, init, activation)


def _swap(model: nn.Module, target: str, init: str | None, seed: int, **params: float) -> str | None:
    sites = _activation_sites(model)
    if not sites:
        return ("the model has no activation module gradwatch can see (an activation called as a "
                "function, e.g. F.relu in forward, cannot be swapped)")
    act = get_activation(target, **params)
    if init is None and all(activation_for_module(m).name == act.name for _, m in sites):
        return f"every activation is already {type(act.make_module()).__name__}"
    for name, _ in sites:
        _set(model, name, act.make_module())
    if init is not None:
        _seeded_init(model, init, act, seed)
    return None


def _reinit(model: nn.Module, seed: int) -> str | None:
    sites = _activation_sites(model)
    if not sites:
        return "the model has no activation module to match an initialisation to"
    counts = Counter(activation_for_module(m).name for _, m in sites)
    name = counts.most_common(1)[0][0]
    module = next(m for _, m in sites if activation_for_module(m).name == name)
    act = activation_for_module(module)
    _seeded_init(model, "he" if name in _RECTIFIER_NAMES else "xavier", act, seed)
    return None


def _record_shapes(model: nn.Module, example: Tensor) -> dict[int, tuple[list, list]]:
    """id(module) -> ([input shapes], [output shapes]), one entry per call, from one forward."""
    seen: dict[int, tuple[list, list]] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        ins, outs = seen.setdefault(id(module), ([], []))
        ins.append(tuple(args[0].shape) if args and isinstance(args[0], Tensor) else None)
        outs.append(tuple(output.shape) if isinstance(output, Tensor) else None)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _batch_norm(model: nn.Module, example: Tensor) -> str | None:
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        return f"the model already has batch normalisation ({len(norms)} layer(s), e.g. '{norms[0]}')"
    sites = _activation_sites(model)
    if not sites:
        return "the model has no activation module to put batch normalisation in front of"
    shapes = _record_shapes(model, example)
    plan = []
    for name, module in sites:
        ins = shapes.get(id(module), ([], []))[0]
        if len(ins) != 1 or ins[0] is None:
            return (f"activation '{name}' is called {len(ins)} times per forward; batch norm needs one "
                    f"module per call site")
        shape = ins[0]
        kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(len(shape))
        if kind is None:
            return f"activation '{name}' sees inputs of shape {shape}; batch norm needs (N, C, ...)"
        plan.append((name, module, kind(shape[1])))
    for name, module, norm in plan:
        _set(model, name, nn.Sequential(norm, module))
    return None


class _Residual(nn.Module):
    """``x + block(x)``: the shortcut passes the gradient back unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.block(x)


def _is_starter(module: nn.Module) -> bool:
    if isinstance(module, _PARAM_LAYERS):
        return True
    has_params = any(True for _ in module.parameters())
    return has_params and not isinstance(module, _NORMS) and activation_for_module(module) is None


def _segments(seq: nn.Sequential, shapes: dict) -> list[tuple[list[nn.Module], bool]]:
    """The Sequential's children grouped into blocks (a layer and what follows it), and
    whether each block maps its input to an output of the same shape.
    """
    groups: list[list[nn.Module]] = []
    for child in seq.children():
        if _is_starter(child) or not groups:
            groups.append([child])
        else:
            groups[-1].append(child)
    out = []
    for group in groups:
        first, last = shapes.get(id(group[0])), shapes.get(id(group[-1]))
        equal = (
            first is not None and last is not None and len(first[0]) == 1 and len(last[1]) == 1
            and first[0][0] is not None and first[0][0] == last[1][0]
            and any(True for m in group for _ in m.parameters())
        )
        out.append((group, equal))
    return out


def _stacks(model: nn.Module, example: Tensor) -> list[tuple[nn.Sequential, list]]:
    shapes = _record_shapes(model, example)
    found, taken = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or any(name.startswith(t + ".") for t in taken):
            continue
        segs = _segments(module, shapes)
        if any(equal for _, equal in segs):
            found.append((module, segs))
            taken.append(name)
    return found


def _rebuild(seq: nn.Sequential, children: list[nn.Module]) -> None:
    seq._modules = OrderedDict((str(i), m) for i, m in enumerate(children))


def _no_blocks(model: nn.Module) -> str:
    if not any(isinstance(m, nn.Sequential) for m in model.modules()):
        return ("the model has no nn.Sequential stack (its forward is custom code), so gradwatch "
                "cannot find blocks to change")
    return "no block keeps its input's shape: the model is not a stack of equal-width blocks"


def _residual(model: nn.Module, example: Tensor) -> str | None:
    stacks = _stacks(model, example)
    if not stacks:
        return _no_blocks(model)
    for seq, segs in stacks:
        children = []
        for group, equal in segs:
            if equal:
                children.append(_Residual(group[0] if len(group) == 1 else nn.Sequential(*group)))
            else:
                children.extend(group)
        _rebuild(seq, children)
    return None


def _fewer_layers(model: nn.Module, example: Tensor) -> str | None:
    stacks = _stacks(model, example)
    if not stacks:
        return _no_blocks(model)
    seq, segs = max(stacks, key=lambda s: sum(eq for _, eq in s[1]))
    n_equal = sum(eq for _, eq in segs)
    if n_equal < 2:
        return f"only {n_equal} equal-width block: nothing to remove without changing the widths"
    keep = max(1, n_equal // 4)
    children, kept = [], 0
    for group, equal in segs:
        if equal:
            kept += 1
            if kept > keep:
                continue
        children.extend(group)
    _rebuild(seq, children)
    return None


def _make_trial(name: str, base: nn.Module, example: Tensor, seed: int) -> tuple[nn.Module, str | None, dict]:
    """(model, reason if not applicable, training overrides) for one trial."""
    model = copy.deepcopy(base)
    overrides: dict[str, float] = {}
    reason: str | None = None
    if name == "relu_he":
        reason = _swap(model, "relu", "he", seed)
    elif name == "leaky_relu":
        reason = _swap(model, "leaky_relu", "he", seed, negative_slope=0.01)
    elif name == "tanh":
        reason = _swap(model, "tanh", "xavier", seed)
        if reason is None and all(isinstance(m, nn.Tanh) for _, m in _activation_sites(base)):
            reason = "every activation is already Tanh (the re-initialisation is the 'reinit' trial)"
    elif name == "relu":
        reason = _swap(model, "relu", None, seed)
    elif name == "reinit":
        reason = _reinit(model, seed)
    elif name == "batch_norm":
        reason = _batch_norm(model, example)
    elif name == "residual":
        reason = _residual(model, example)
    elif name == "fewer_layers":
        reason = _fewer_layers(model, example)
    elif name == "clip_grad_norm":
        overrides["clip"] = _CLIP
    elif name == "lower_lr":
        overrides["lr_factor"] = _LR_FACTOR
    already_relu = all(isinstance(m, nn.ReLU) for _, m in _activation_sites(base))
    if name == "relu_he" and reason is None and already_relu:
        reason = "every activation is already ReLU (the He re-initialisation is the 'reinit' trial)"
    return model, reason, overrides


# --- one trial -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    steps: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int
    every: int
    input_mode: str
    store_path: str
    run_prefix: str


@dataclass(frozen=True)
class TrialResult:
    """What one what-if trial measured.

    Attributes:
        name: the trial (``"unchanged"`` for the model as given, else one of :data:`TRIALS`).
        loss: cross-entropy on the whole training set after the budget (eval mode).
        train_loss: mean mini-batch loss over the last tenth of the steps.
        test_loss: loss on the test split (None without one).
        test_acc: accuracy on the test split, in [0, 1] (None without one).
        delta_ratio_init: first/last delta RMS at the first logged step (initialisation).
        delta_ratio: median first/last delta ratio over the logged steps.
        steps: steps trained (fewer than the budget when the loss went non-finite).
        nonfinite: True when the loss went inf or NaN.
        findings: kinds of the warning and critical findings of the trial's diagnosis.
        seconds: wall time of the trial.
        run_id: the trial's run in the store.
        parameters: trainable parameters of the trial's model.
        error: why the trial failed (empty when it ran).
    """

    name: str
    loss: float = math.nan
    train_loss: float = math.nan
    test_loss: float | None = None
    test_acc: float | None = None
    delta_ratio_init: float = math.nan
    delta_ratio: float = math.nan
    steps: int = 0
    nonfinite: bool = False
    findings: tuple[str, ...] = ()
    seconds: float = 0.0
    run_id: int | None = None
    parameters: int = 0
    error: str = ""


def _inputs(x: Tensor, ds: Dataset, mode: str) -> Tensor:
    return x if mode == "flat" else x.reshape(len(x), *ds.input_shape)


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, ds: Dataset, mode: str) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(_inputs(x, ds, mode))
        loss = nn.functional.cross_entropy(out, y).item()
        acc = (out.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def _train(name: str, model: nn.Module, overrides: dict, ds: Dataset, s: _Settings) -> TrialResult:
    """Train one copy for the budget under watch(); never raises (errors come back in the result)."""
    with torch.random.fork_rng(devices=[]):  # seeded inside, the caller's RNG left alone
        return _train_seeded(name, model, overrides, ds, s)


def _train_seeded(name: str, model: nn.Module, overrides: dict, ds: Dataset, s: _Settings) -> TrialResult:
    from gradwatch.lab.data import iterate_minibatches

    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = s.lr * overrides.get("lr_factor", 1.0)
    clip = overrides.get("clip")
    store = RunStore(s.store_path)
    try:
        torch.manual_seed(s.seed)
        opt = (torch.optim.Adam(params, lr=lr) if s.optimizer == "adam"
               else torch.optim.SGD(params, lr=lr, momentum=0.9))
        gen = torch.Generator().manual_seed(s.seed)
        config = {"prescribe": {"trial": name, "steps": s.steps, "lr": lr, "optimizer": s.optimizer,
                                "batch_size": s.batch_size, "seed": s.seed, "clip": clip},
                  "dataset": ds.name}
        watcher = watch(model, opt, every=s.every, store=store, run_name=f"{s.run_prefix}{name}",
                        config=config, warn=False)
        losses: list[float] = []
        nonfinite = False
        with watcher:
            while len(losses) < s.steps and not nonfinite:
                for xb, yb in iterate_minibatches(ds.x_train, ds.y_train, s.batch_size, gen):
                    opt.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(_inputs(xb, ds, s.input_mode)), yb)
                    loss.backward()
                    if clip is not None:
                        nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    watcher.log(loss=loss.detach())
                    losses.append(loss.item())
                    if not math.isfinite(losses[-1]):
                        nonfinite = True
                    if nonfinite or len(losses) >= s.steps:
                        break
        run_id = watcher.run_id
        metrics = store.metrics(run_id)
        ratios = delta_ratios(metrics).dropna()
        findings = diagnose(run_id, store, save=True)
        loss_all, _ = _evaluate(model, ds.x_train, ds.y_train, ds, s.input_mode)
        test_loss = test_acc = None
        if ds.n_test:
            test_loss, test_acc = _evaluate(model, ds.x_test, ds.y_test, ds, s.input_mode)
        tail = losses[-max(1, len(losses) // 10):]
        return TrialResult(
            name=name,
            loss=loss_all if math.isfinite(loss_all) else math.inf,
            train_loss=float(np.mean(tail)),
            test_loss=test_loss,
            test_acc=test_acc,
            delta_ratio_init=float(ratios.iloc[0]) if len(ratios) else math.nan,
            delta_ratio=float(ratios.median()) if len(ratios) else math.nan,
            steps=len(losses),
            nonfinite=nonfinite or not math.isfinite(loss_all),
            findings=tuple(f.kind for f in findings if f.severity != "info"),
            seconds=time.perf_counter() - start,
            run_id=run_id,
            parameters=sum(p.numel() for p in params),
        )
    except Exception as err:  # noqa: BLE001 - a failed trial is a row of the table, not a crash
        return TrialResult(name=name, error=f"{type(err).__name__}: {err}",
                           seconds=time.perf_counter() - start)
    finally:
        store.close()


# Jobs for forked workers: set before the pool forks, read by index in the children, so
# models, factories (lambdas too) and data are inherited rather than pickled.
_JOBS: list[tuple[str, nn.Module, dict]] = []
_CONTEXT: dict[str, Any] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_job(index: int) -> TrialResult:
    name, model, overrides = _JOBS[index]
    return _train(name, model, overrides, _CONTEXT["data"], _CONTEXT["settings"])


# --- the table -------------------------------------------------------------------------------


@dataclass
class PrescriptionTable:
    """What :func:`prescribe` measured: the unchanged model and each change, ranked.

    Attributes:
        baseline: the unchanged model's trial.
        rows: one :class:`Prescription` per change: measured ones ranked by the loss
            they reach (rank 1 best), then failed and not-applicable ones (rank 0).
        trials: every :class:`TrialResult` by name, the baseline's under ``"unchanged"``.
        findings: the diagnosis of the unchanged model's trial, each finding with the
            measured prescriptions that beat the unchanged model.
        steps: the budget of each trial, in optimizer steps.
        seconds: wall time of the whole call.
    """

    baseline: TrialResult
    rows: list[Prescription]
    trials: dict[str, TrialResult]
    findings: list[Finding]
    steps: int
    seconds: float

    @property
    def best(self) -> Prescription | None:
        """The top-ranked change when it clearly beats the unchanged model, else None."""
        top = next((p for p in self.rows if p.rank == 1), None)
        return top if top is not None and top.measurements.get("improved") else None

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per change (and the unchanged model first), measurements as columns."""
        records = [{"rank": None, "name": _BASELINE, "applicable": True, **_numbers(self.baseline),
                    "reason": ""}]
        for p in self.rows:
            records.append({"rank": p.rank, "name": p.name, "applicable": p.applicable,
                            **p.measurements, "reason": p.reason})
        return pd.DataFrame.from_records(records)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: steps, seconds, baseline, rows, findings."""
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "baseline": asdict(self.baseline),
            "rows": [p.to_dict() for p in self.rows],
            "findings": [f.to_dict() for f in self.findings],
        }


def _numbers(t: TrialResult) -> dict[str, Any]:
    return {"loss": t.loss, "train_loss": t.train_loss, "test_acc": t.test_acc,
            "delta_ratio": t.delta_ratio, "delta_ratio_init": t.delta_ratio_init, "steps": t.steps,
            "nonfinite": t.nonfinite, "seconds": round(t.seconds, 2), "run_id": t.run_id,
            "parameters": t.parameters, "findings": ", ".join(t.findings)}


def _decades(ratio: float) -> float:
    """Distance of a delta ratio from 1 in decades (|log10 r|); inf when missing or zero."""
    return abs(math.log10(ratio)) if ratio > 0 and math.isfinite(ratio) else math.inf


def _rank(results: dict[str, TrialResult], reasons: dict[str, str], order: list[str]) -> list[Prescription]:
    base = results[_BASELINE]
    measured, others = [], []
    for name in order:
        desc, why = FIXES[name]
        if name in reasons:
            others.append(Prescription(name, desc, 0, why, verified=False, applicable=False,
                                       reason=reasons[name]))
            continue
        t = results[name]
        if t.error:
            others.append(Prescription(name, desc, 0, why, verified=False, applicable=True,
                                       reason=f"the trial failed: {t.error}"))
            continue
        measured.append(t)
    # Lower loss first; a non-finite run last; ties (within 1%) by the delta ratio's distance from 1.
    measured.sort(key=lambda t: (t.nonfinite, round(t.loss, 2) if math.isfinite(t.loss) else math.inf,
                                 _decades(t.delta_ratio)))
    rows = []
    for i, t in enumerate(measured, start=1):
        gain = (base.loss - t.loss) / base.loss if base.loss and math.isfinite(base.loss) else math.nan
        if not math.isfinite(base.loss) and math.isfinite(t.loss):
            gain = 1.0
        improved = bool(math.isfinite(t.loss) and (gain >= _CLEAR_GAIN or not math.isfinite(base.loss)))
        numbers = {**_numbers(t), "loss_gain": gain, "improved": improved,
                   "decades_from_1": _decades(t.delta_ratio),
                   "baseline_decades_from_1": _decades(base.delta_ratio)}
        verdict = (f"loss {t.loss:.3g} after {t.steps} steps vs {base.loss:.3g} unchanged "
                   f"({-gain:+.0%}); first/last delta {t.delta_ratio:.2g} (unchanged {base.delta_ratio:.2g})")
        if not improved:
            verdict = "no clear improvement: " + verdict
        desc, why = FIXES[t.name]
        rows.append(Prescription(t.name, desc, i, why, verified=True, applicable=True, reason=verdict,
                                 measurements=numbers))
    return rows + others


def prescribe(
    model_factory: Callable[[], nn.Module] | nn.Module | str,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 3e-3,
    optimizer: str = "adam",
    batch_size: int = 64,
    seed: int = 0,
    trials: Sequence[str] | None = None,
    workers: int = 2,
    store: RunStore | str | os.PathLike | None = None,
    run_name: str | None = None,
    thresholds: Thresholds | None = None,
    progress: bool = True,
) -> PrescriptionTable:
    """Try each fix on fresh copies of the model, same data and seed; rank by measured loss.

    Every trial builds the model anew from ``model_factory`` (seeded, so all start from
    the same weights), applies one change, and trains it under :func:`gradwatch.watch`
    for ``steps`` optimizer steps on the same batches. Measured: the loss on the whole
    training set after the budget, the test accuracy, and the first/last delta ratio
    (median over logged steps; 1 means the gradient reaches the input at full strength).

    Args:
        model_factory: a callable returning a fresh ``nn.Module``, a
            ``"package.module:function"`` path to one, or a module (deep-copied).
        data: ``"digits"``, ``"mnist1d"``, a ``.npz``/``.csv`` path, a lab ``Dataset``, or ``(x, y)``.
        steps: optimizer steps per trial. Default: 200.
        lr: learning rate (the ``lower_lr`` trial uses a tenth). Default: 3e-3.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9). Default: ``"adam"``.
        batch_size: examples per step. Default: 64.
        seed: seeds the model's weights, re-initialisations and the batch order. Default: 0.
        trials: which changes to try (names from :data:`TRIALS`). Default: all.
        workers: processes running trials in parallel (one torch thread each). Default: 2.
        store: record every trial as a run there (``gradwatch show`` works on them), and
            the unchanged model's findings. Default: a temporary store, deleted afterwards.
        run_name: prefix of the trial runs' names. Default: ``"prescribe"``.
        thresholds: for the diagnosis of the unchanged model. Default: ``Thresholds()``.
        progress: show a progress bar on stderr. Default: True.

    Raises:
        ConfigError: a factory that cannot be imported or called or returns no module, or a
            bad setting.
        DataError: empty or unreadable data, or data whose features do not fit the model's
            first layer (the message gives both sizes).
    """
    start = time.perf_counter()
    _check_settings(steps, lr, optimizer, batch_size, workers)
    chosen = list(TRIALS) if trials is None else list(trials)
    unknown = [t for t in chosen if t not in TRIALS]
    if unknown:
        raise ConfigError(f"unknown trial(s) {', '.join(map(repr, unknown))}; known: {', '.join(TRIALS)}")
    factory = load_factory(model_factory) if isinstance(model_factory, str) else model_factory
    dataset = resolve_data(data, seed=seed)
    base = _build(factory, seed)
    mode = _input_mode(base, dataset)
    example = _inputs(dataset.x_train[: min(len(dataset.x_train), 64)], dataset, mode)

    jobs: list[tuple[str, nn.Module, dict]] = [(_BASELINE, base, {})]
    reasons: dict[str, str] = {}
    for name in chosen:
        try:
            model, reason, overrides = _make_trial(name, base, example, seed)
        except Exception as err:  # noqa: BLE001 - an odd model makes this change not applicable
            model, reason, overrides = None, f"cannot apply to this model: {type(err).__name__}: {err}", {}
        if reason is not None:
            reasons[name] = reason
        else:
            jobs.append((name, model, overrides))

    tmp = None
    if store is None:
        tmp = tempfile.mkdtemp(prefix="gradwatch-prescribe-")
        store_path = os.path.join(tmp, "gradwatch.db")
    else:
        store_path = os.fspath(store.path if isinstance(store, RunStore) else store)
    RunStore(store_path).close()  # create the file and schema once, before workers race to
    prefix = f"{run_name or 'prescribe'}-"
    settings = _Settings(steps, batch_size, float(lr), optimizer, seed, max(1, steps // 40), mode,
                         store_path, prefix)
    try:
        results = _run_all(jobs, dataset, settings, workers, progress)
        base_result = results[_BASELINE]
        if base_result.error:
            raise ConfigError(f"the unchanged model could not be trained: {base_result.error}")
        rows = _rank(results, reasons, chosen)
        with RunStore(store_path) as st:
            findings = diagnose(base_result.run_id, st, thresholds, save=False)
            findings = _attach(findings, rows)
            if tmp is None:
                st.add_findings(base_result.run_id, [f.to_dict() for f in findings])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return PrescriptionTable(base_result, rows, results, findings, steps, time.perf_counter() - start)


def _check_settings(steps: int, lr: float, optimizer: str, batch_size: int, workers: int) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("workers", workers)):
        check_int(name, value, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr!r}; expected a positive number such as 3e-3")
    if optimizer not in ("adam", "sgd"):
        raise ConfigError(f"optimizer={optimizer!r}; expected 'adam' or 'sgd'")


def _attach(findings: list[Finding], rows: list[Prescription]) -> list[Finding]:
    """Give each problem finding the measured fixes that beat the unchanged model."""
    winners = [p for p in rows if p.verified and p.measurements.get("improved")]
    out = []
    for f in findings:
        if f.severity == "info" or not winners:
            out.append(f)
        else:
            out.append(f.with_prescriptions(winners[:5]))
    return out


def _run_all(jobs: list[tuple[str, nn.Module, dict]], ds: Dataset, s: _Settings, workers: int,
             progress: bool) -> dict[str, TrialResult]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]what-if trials[/]"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.description}"),
                   console=Console(stderr=True), transient=True, disable=not progress)
    results: dict[str, TrialResult] = {}
    fork = "fork" in multiprocessing.get_all_start_methods()
    with bar:
        task = bar.add_task("", total=len(jobs))
        if workers == 1 or not fork or len(jobs) == 1:
            for name, model, overrides in jobs:
                results[name] = _train(name, model, overrides, ds, s)
                bar.update(task, advance=1, description=name)
            return results
        global _JOBS, _CONTEXT
        _JOBS, _CONTEXT = jobs, {"data": ds, "settings": s}
        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                                     initializer=_init_worker) as pool:
                futures = {pool.submit(_run_job, i): name for i, (name, _, _) in enumerate(jobs)}
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        results[name] = future.result()
                    except Exception as err:  # noqa: BLE001 - a crashed worker fails its trial only
                        results[name] = TrialResult(name=name, error=f"{type(err).__name__}: {err}")
                    bar.update(task, advance=1, description=name)
        finally:
            _JOBS, _CONTEXT = [], {}
    return results
