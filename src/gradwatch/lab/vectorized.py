"""Several seeds of one lab configuration trained at once, as one batched network.

K lab runs that differ only by seed (same model, training settings, data set and
store) train in one process: :func:`torch.func.stack_module_state` stacks the K
models' parameters into leaf tensors with a leading seed dimension, each layer of
the lab's MLP runs as one batched op over that dimension (``baddbmm`` for a Linear,
the activation module itself elementwise, one batch norm over K x width features),
``sum_k loss_k`` is back-propagated once (seed k's loss depends only on its own
slice, so each slice of the gradient is seed k's exact gradient), and one
``torch.optim`` optimizer steps the stacked leaves: Adam and SGD are elementwise,
so every seed gets the update it would get alone. Each seed keeps its own data
split and batch order, drawn exactly as :func:`gradwatch.lab.runner.run_task` draws
them.

Why batched ops and not ``vmap(functional_call(model, ...))``: on a CPU, for the
lab's width-64 layers, vmap turns each Linear into ten autograd-recorded ops
(transpose, expand, view, bmm, ...), and the per-op overhead is what batching is meant
to share (``bench/vectorized.py`` times the three ways). And a batched matmul's own
backward forms the weight gradient as ``(x^T g)^T``, which rounds differently from each
seed's ``F.linear`` for the 10-logit layer, and Adam amplifies that within a few steps
(see :class:`_BatchedLinear`); the batched Linear here is bitwise the per-seed one, so K
vectorized runs store the numbers K sequential runs store, not merely close ones.

The stacked parameters are views of one flat tensor and their gradients of another, so the
optimizer steps one tensor (Adam's update terms are a few ops for all seeds and layers, and
bitwise the per-parameter updates: Adam is elementwise).

Batching shares the per-op overhead, not the matrix products and elementwise work, so the
speed-up is largest for shallow and narrow configurations and smallest for deep ones and
for batch norm (over (N, K x width), which needs a transposed copy of each layer's output).
The measured ratios are in ``bench/results/vectorized.json`` and ``bench/README.md``.

What is recorded goes through :mod:`gradwatch.recorder`, as the watcher's does, with the
lab's settings (``every`` from the config, the default activation sample and tracked
weights, the gradient-norm window, no alerts): every stored number of the K runs equals the
number K sequential ``run_task`` calls store (the tests compare them all, to 1e-5;
on the CPU the trained weights agree bit for bit, and the stored values round
differently only where the reductions differ: the loss's batched mean, and the norms,
which the watcher takes as ``torch.dot`` on the CPU), and only
``config["gradwatch"]["vectorized"]`` tells them apart. What this module measures itself
are the raw quantities the recorder takes (sums, squared norms, per-parameter norms, the
kept activation inputs on the watcher's samples, ``sample_index(seed=layer_id)``), for all
seeds at once; everything derived from them is the recorder's, so a change to what is
recorded is made once.

Configurations it does not cover (the CNN) run one seed at a time:
:func:`vectorize_reason` says why.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state

from gradwatch.activations import Activation, activation_for_module
from gradwatch.config import WatchConfig
from gradwatch.errors import ConfigError
from gradwatch.lab.models import MLP, build_model
from gradwatch.lab.presets import GridEntry
from gradwatch.lab.tasks import (
    STOP_MESSAGE,
    Backend,
    InProcessBackend,
    LocalBackend,
    RunEvent,
    RunResult,
    RunTask,
    StoppedByUser,
    diagnose_run,
    make_optimizer,
    task_dataset,
    watch_settings,
)
from gradwatch.recorder import (
    ACTIVATION_METRICS,
    ActivationCalls,
    LayerRows,
    ParamLayout,
    Window,
    activation_stat_rows,
    gradwatch_config,
    step_scalars,
    tracked_columns,
    tracked_elements,
)
from gradwatch.stats import activation_inputs, sample_index, weight_block
from gradwatch.store import RunStore

__all__ = [
    "StackedMLP",
    "seed_losses",
    "SeedGroup",
    "GroupResult",
    "SeedGrouping",
    "vectorize_reason",
    "group_seeds",
    "plan_runs",
    "run_group",
]

def vectorize_reason(entry: GridEntry) -> str | None:
    """Why ``entry``'s seeds cannot train as one batched network; None when they can."""
    if entry.model.kind != "mlp":
        return (f"{entry.config_key}: a {entry.model.kind} configuration runs one seed at a time "
                "(the batched path covers the lab's MLP)")
    if entry.model.residual and entry.model.block != "simple":
        return (f"{entry.config_key}: a residual MLP with block={entry.model.block!r} runs one seed at a "
                "time (the batched path covers the one-layer residual block)")
    return None


# --- groups of tasks -----------------------------------------------------------------------------


def _group_key(task: RunTask) -> tuple:
    """Everything of a task but its seed."""
    return (task.preset, task.entry, task.dataset, task.store, task.cache_dir)


@dataclass(frozen=True)
class SeedGroup:
    """Two or more :class:`RunTask` s that differ only by seed, trained together.

    A backend runs it like a task (:meth:`run`, the :class:`~gradwatch.lab.tasks.Work`
    protocol), which returns a :class:`GroupResult`.
    """

    tasks: tuple[RunTask, ...]

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if len(tasks) < 2:
            raise ConfigError(f"a seed group needs at least 2 tasks; got {len(tasks)}")
        if len({_group_key(t) for t in tasks}) != 1:
            raise ConfigError("a seed group's tasks must differ only by seed (same preset, configuration, "
                              "data set and store); group them with group_seeds()")
        seeds = [t.seed for t in tasks]
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"a seed group's seeds must be distinct; got {seeds}")
        reason = vectorize_reason(tasks[0].entry)
        if reason is not None:
            raise ConfigError(f"cannot vectorize {reason}")

    @property
    def entry(self) -> GridEntry:  # noqa: D102
        return self.tasks[0].entry

    @property
    def seeds(self) -> tuple[int, ...]:  # noqa: D102
        return tuple(t.seed for t in self.tasks)

    @property
    def run_name(self) -> str:
        """``preset/config_key/seeds0,1,2``: the progress display's name for the group."""
        t = self.tasks[0]
        return f"{t.preset}/{t.entry.config_key}/seeds{','.join(map(str, self.seeds))}"

    def run(self, on_epoch: Callable[[int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> GroupResult:
        """Train the group's seeds as one batched network (:func:`run_group`): a backend's work item."""
        return run_group(self, on_epoch, should_stop)


@dataclass(frozen=True)
class GroupResult(RunResult):
    """A :class:`SeedGroup`'s outcome: ``runs`` holds one :class:`RunResult` per task, in order.

    ``status`` is ``finished`` when every run finished; ``test_acc`` is their mean.
    """

    runs: tuple[RunResult, ...] = ()


@dataclass
class SeedGrouping:
    """Tasks planned for a backend: seed groups where they help, single tasks elsewhere.

    Attributes:
        items: what the backend runs (:class:`RunTask` or :class:`SeedGroup`).
        members: for each item, the positions of its tasks in the planned list.
        fallbacks: configuration key -> why its seeds run one at a time.
    """

    items: list[RunTask | SeedGroup]
    members: list[tuple[int, ...]]
    fallbacks: dict[str, str] = field(default_factory=dict)

    def expand(self, event: RunEvent) -> list[RunEvent]:
        """A backend's event about item ``event.index`` as events about the planned tasks.

        A group's ``start`` and ``epoch`` events go to its first task (one progress row);
        its ``end`` becomes one ``end`` per task, each with that task's result.
        """
        positions = self.members[event.index]
        item = self.items[event.index]
        if not isinstance(item, SeedGroup) or event.kind != "end":
            return [replace(event, index=positions[0])]
        results = _split(event.result, item)
        return [RunEvent(p, "end", t.run_name, result=r)
                for p, t, r in zip(positions, item.tasks, results, strict=True)]


def _split(result: RunResult | None, group: SeedGroup) -> list[RunResult | None]:
    """One result per task of ``group`` (a backend that lost the worker returns a plain result)."""
    if isinstance(result, GroupResult) and len(result.runs) == len(group.tasks):
        return list(result.runs)
    if result is None:
        return [None] * len(group.tasks)
    share = result.seconds / len(group.tasks)
    return [RunResult(t, result.status, None, None, share, result.error) for t in group.tasks]


def group_seeds(tasks: Sequence[RunTask], *, vectorize: bool = True) -> SeedGrouping:
    """Plan ``tasks``: those sharing everything but the seed become one :class:`SeedGroup`.

    Args:
        tasks: the tasks to run.
        vectorize: False keeps every task on its own (the plan is then ``tasks`` as they are).

    Returns:
        The plan; groups stand where their first task stood.
    """
    if not vectorize:
        return SeedGrouping(list(tasks), [(i,) for i in range(len(tasks))])
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        by_key[_group_key(task)].append(i)
    plan = SeedGrouping([], [])
    for positions in by_key.values():
        first = tasks[positions[0]]
        reason = vectorize_reason(first.entry)
        if reason is not None and len(positions) > 1:
            plan.fallbacks[first.entry.config_key] = reason
        if reason is not None or len(positions) < 2:
            for p in positions:
                plan.items.append(tasks[p])
                plan.members.append((p,))
        else:
            plan.items.append(SeedGroup(tuple(tasks[p] for p in positions)))
            plan.members.append(tuple(positions))
    order = sorted(range(len(plan.items)), key=lambda i: plan.members[i][0])
    return SeedGrouping([plan.items[i] for i in order], [plan.members[i] for i in order], plan.fallbacks)


def plan_runs(tasks: Sequence[RunTask], *, vectorize: bool | None, backend: Backend | None) -> SeedGrouping:
    """What :func:`gradwatch.lab.runner.run_lab` hands its backend.

    Args:
        tasks: the tasks to run.
        vectorize: group seeds (True), never (False), or when it helps (None): on the
            default process pool (``backend`` None or a :class:`LocalBackend`), where K
            seeds of an MLP in one worker train several times faster than one by one.
            The in-process backend (debugging, tests) runs one task at a time unless asked.
        backend: the backend that will run them.

    Raises:
        ConfigError: ``vectorize`` is not a bool or None, or True with a backend that
            runs only single tasks (Ray: each run travels alone to its worker).
    """
    if vectorize is not None and not isinstance(vectorize, bool):
        raise ConfigError(f"vectorize={vectorize!r}; expected True, False or None (when it helps)")
    pool = backend is None or isinstance(backend, LocalBackend)
    if vectorize and not (pool or isinstance(backend, InProcessBackend)):
        raise ConfigError(
            f"vectorize=True needs the local backend; {type(backend).__name__} runs one seed per task. "
            "Leave vectorize out (or pass --no-vectorize) with this backend"
        )
    return group_seeds(tasks, vectorize=pool if vectorize is None else vectorize)


# --- the batched network ------------------------------------------------------------------------


@dataclass
class _Layer:
    """A layer the watcher would watch, in forward order (its index is its layer id)."""

    name: str
    type_name: str
    kind: str  # "param" | "activation"
    activation: Activation | None = None
    params: list[int] = field(default_factory=list)  # the weight (or all own parameters): indices


@dataclass
class _BlockPlan:
    """One hidden block: ``act(bn(linear(h)))``, plus ``h`` if residual; layer ids of its parts."""

    prefix: str
    bn: nn.BatchNorm1d | None
    act: nn.Module
    residual: bool
    linear_id: int = -1
    bn_id: int = -1
    act_id: int = -1


class _BatchedLinear(torch.autograd.Function):
    """K Linear layers at once, ``y[k] = x[k] @ W[k].T + b[k]`` for (K, N, in) inputs.

    Forward and backward use the products ``F.linear`` and its backward use for one seed
    (``x W^T + b``; ``grad_x = g W``, ``grad_W = g^T x``, ``grad_b = sum_n g``), batched:
    on the CPU each seed's slice is then bitwise what the seed's own Linear computes. The
    default backward of ``baddbmm`` forms ``grad_W`` as ``(x^T g)^T``, whose rounding
    differs for narrow outputs (the 10 logits), and Adam turns such last-bit differences in
    gradients near zero into visibly different updates within a few steps.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """K Linear layers at once: ``h[k] @ weight[k].T + bias[k]`` for (K, N, in) inputs."""
    return _BatchedLinear.apply(h, weight, bias)


class StackedMLP:
    """K lab MLPs of one configuration as stacked leaf tensors and a batched forward.

    Attributes:
        k: the number of stacked models (seeds).
        params: parameter name -> its stacked leaf ``(K, *shape)``, seed k's slice seed k's values.
        flat: one tensor holding every leaf's values (the leaves are views of it), which the
            optimizer of :meth:`optimizer` steps as one tensor.
        flat_grad: likewise every leaf's ``.grad``.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        template = models[0]
        if not isinstance(template, MLP):
            raise ConfigError(f"the batched path trains the lab's MLP; got {type(template).__name__}")
        self.k = len(models)
        stacked, self.buffers = stack_module_state(list(models))
        self.names = list(stacked)  # model.parameters() order: the watcher's parameter indices
        # All stacked parameters live in one flat tensor, and their gradients in another: the
        # optimizer steps the flat tensor, one op per update term instead of one per parameter.
        # Each stacked parameter is a leaf sharing the flat tensor's storage, its .grad a view of
        # the flat gradient (autograd adds into an existing .grad in place, so backward fills it).
        # Parameters of one size sit side by side, so the per-seed norms of all of them are one
        # reduction over a (count, K, size) view (:meth:`row_norms`).
        values = list(stacked.values())
        total = sum(p.numel() for p in values)
        self.flat = torch.empty(total, dtype=values[0].dtype, device=values[0].device)
        self.flat_grad = torch.zeros_like(self.flat)
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(values):
            by_size[p[0].numel()].append(i)
        self._groups: list[tuple[int, int, int]] = []  # (offset, parameters, elements of one seed's)
        leaves: dict[int, Tensor] = {}
        offset = 0
        for size, members in by_size.items():
            self._groups.append((offset, len(members), size))
            for i in members:
                p = values[i]
                view = self.flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p.detach())
                leaves[i] = view.detach().requires_grad_()
                leaves[i].grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        self.params: dict[str, Tensor] = {name: leaves[i] for i, name in enumerate(self.names)}
        # row_norms' rows come out grouped by size; this puts them back in parameter order
        grouped = [i for members in by_size.values() for i in members]
        self._order = torch.tensor(sorted(range(len(grouped)), key=grouped.__getitem__))
        self.flat.requires_grad_()
        self.flat.grad = self.flat_grad
        index = {name: i for i, name in enumerate(self.names)}
        modules = dict(template.named_modules())
        self.layers: list[_Layer] = []

        def add(name: str, kind: str) -> int:
            module = modules[name]
            layer = _Layer(name, type(module).__name__, kind)
            if kind == "param":
                own = [n for n, _ in module.named_parameters(prefix=name, recurse=False)]
                weight = f"{name}.weight"
                layer.params = [index[weight]] if weight in index else [index[n] for n in own]
            else:
                layer.activation = activation_for_module(module)
            self.layers.append(layer)
            return len(self.layers) - 1

        self.blocks: list[_BlockPlan] = []
        for i, block in enumerate(template.hidden):
            plan = _BlockPlan(f"hidden.{i}", block._modules.get("bn"), block.act, block.residual)
            plan.linear_id = add(f"{plan.prefix}.linear", "param")
            if plan.bn is not None:
                plan.bn_id = add(f"{plan.prefix}.bn", "param")
            if activation_for_module(block.act) is not None:
                plan.act_id = add(f"{plan.prefix}.act", "activation")
            self.blocks.append(plan)
        self.out_id = add("out", "param")

    def parameters(self) -> list[Tensor]:
        """The stacked leaves, in the models' parameter order."""
        return list(self.params.values())

    def optimizer(self, train: Any) -> torch.optim.Optimizer:
        """The lab's optimizer (:func:`gradwatch.lab.tasks.make_optimizer`) over the flat tensor.

        Adam and SGD with momentum are elementwise, so stepping the flat tensor gives each
        element the update its own parameter would get, in a few ops for all of them.
        """
        return make_optimizer(train, [self.flat])

    def row_norms(self, flat: Tensor) -> Tensor:
        """Each seed's L2 norm of each parameter (K, P), of ``flat`` or ``flat_grad``.

        The same per-row reduction as ``vector_norm(p.reshape(K, -1), dim=1)`` for each
        parameter, taken for all the parameters of one size at once.
        """
        k = self.k
        parts = [torch.linalg.vector_norm(flat[start : start + count * k * size].view(count, k, size), dim=2)
                 for start, count, size in self._groups]
        return torch.cat(parts).index_select(0, self._order).t()

    def zero_grad(self) -> None:
        """Zero every gradient at once (they are views of one flat tensor, never set to None)."""
        self.flat_grad.zero_()

    def forward(self, x: Tensor, *, training: bool, tap: _Tap | None = None) -> Tensor:
        """Logits (K, N, classes) of inputs (K, N, ...); ``tap`` sees what the watcher's hooks see."""
        p = self.params
        h = x.flatten(2)
        for blk in self.blocks:
            z = _linear(h, p[f"{blk.prefix}.linear.weight"], p.get(f"{blk.prefix}.linear.bias"))
            if tap is not None:
                tap.output(blk.linear_id, z)
            if blk.bn is not None:
                z = self._batch_norm(blk, z, training)
                if tap is not None:
                    tap.output(blk.bn_id, z)
            if tap is not None and blk.act_id >= 0:
                tap.activation(blk.act_id, z)
            a = blk.act(z)
            h = h + a if blk.residual else a
        logits = _linear(h, p["out.weight"], p["out.bias"])
        if tap is not None:
            tap.output(self.out_id, logits)
        return logits

    def _batch_norm(self, blk: _BlockPlan, z: Tensor, training: bool) -> Tensor:
        """K BatchNorm1d at once: one batch norm over K x width features of (N, K * width).

        Each feature's mean and variance are over the N examples of its own seed, and the
        running statistics are views of the stacked buffers (updated in place), exactly
        what each seed's BatchNorm1d computes.
        """
        bn, (k, n, width) = blk.bn, z.shape
        assert bn is not None
        name = f"{blk.prefix}.bn"
        flat = z.transpose(0, 1).reshape(n, k * width)
        out = F.batch_norm(
            flat, self.buffers[f"{name}.running_mean"].view(-1), self.buffers[f"{name}.running_var"].view(-1),
            self.params[f"{name}.weight"].reshape(-1), self.params[f"{name}.bias"].reshape(-1),
            training, bn.momentum, bn.eps,
        )
        if training:  # as BatchNorm1d.forward (momentum is set, so the count only counts)
            self.buffers[f"{name}.num_batches_tracked"].add_(1)
        return out.reshape(n, k, width).transpose(0, 1)


class _Tap:
    """What the watcher's hooks record on a logged step, for K seeds at once."""

    def __init__(self, net: StackedMLP, samples: dict[tuple, Tensor | None], sample_size: int) -> None:
        self.net = net
        self.samples = samples
        self.sample_size = sample_size  # activation inputs sampled per layer (WatchConfig.activation_sample)
        self.moments: dict[int, Tensor] = {}  # layer id -> (K, 2): sum, norm of the output
        self.counts: dict[int, int] = {}  # layer id -> elements of one seed's output
        self.delta_sq: dict[int, Tensor] = {}  # layer id -> (K,) ||dL/d output||^2
        self.kept: list[tuple[int, list[tuple[Tensor, Tensor, bool]]]] = []  # activation calls

    def output(self, lid: int, out: Tensor) -> None:
        """A parameterised layer's output: its moments, and a hook for dL/d(output)."""
        k = out.shape[0]
        with torch.no_grad():
            flat = out.detach().reshape(k, -1)
            # stats.output_moments of each seed's output: [sum(x), ||x||_2] in float32
            total = flat.sum(1, dtype=torch.float32)
            norm = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
            self.moments[lid] = torch.stack([total, norm], 1)
        self.counts[lid] = flat.shape[1]
        if out.requires_grad:
            out.register_hook(lambda grad, lid=lid: self._delta(lid, grad))

    def _delta(self, lid: int, grad: Tensor) -> None:
        with torch.no_grad():  # stats.squared_norm of each seed's gradient
            flat = grad.reshape(grad.shape[0], -1)
            self.delta_sq[lid] = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32).square()

    def activation(self, lid: int, x: Tensor) -> None:
        """An activation's input (K, N, width): what stats.activation_inputs keeps of it, per seed.

        Seed k keeps its sampled inputs and, per unit, the input where phi' peaks: with a
        ``peak`` rule that is a max or min over the batch, which is exact in any order.
        So for such an activation one call keeps all K seeds: their inputs side by side as
        (N, K * width), each seed's sample mapped into it (the kept inputs are copies of the
        same elements, the per-unit extremes the same numbers). An activation without a
        peak rule (phi' itself) is kept one seed at a time, as the watcher computes it.
        """
        activation = self.net.layers[lid].activation
        assert activation is not None
        k, n, width = x.shape
        key = ("activation", lid, n * width)
        if key not in self.samples:
            self.samples[key] = sample_index(n * width, self.sample_size, x.device, seed=lid)
        sample = self.samples[key]
        # (N, width): units along the last dimension, as the watcher's pre-hook after a Linear
        if activation.peak is None:
            self.kept.append((lid, [activation_inputs(xs, activation, sample=sample)
                                    for xs in x.detach().unbind(0)]))
            return
        side = ("side by side", lid, n * width, k)
        if side not in self.samples:
            index = sample if sample is not None else torch.arange(n * width, device=x.device)
            row, unit = index // width, index % width  # seed k's element (row, unit) of its (N, width)
            self.samples[side] = torch.cat([row * (k * width) + seed * width + unit for seed in range(k)])
        wide = x.detach().transpose(0, 1).reshape(n, k * width)  # wide[i, seed * width + u] = x[seed, i, u]
        inputs, per_unit, is_derivative = activation_inputs(wide, activation, sample=self.samples[side])
        self.kept.append((lid, [(i, u, is_derivative) for i, u in zip(inputs.chunk(k), per_unit.chunk(k),
                                                                       strict=True)]))


# --- recording ---------------------------------------------------------------------------------


def _host(tensor: Tensor) -> np.ndarray:
    """A CPU tensor as float64 (float32 -> float64 is exact)."""
    return tensor.numpy().astype(np.float64)


class _Recorder:
    """Writes K runs through :mod:`gradwatch.recorder`, as K watchers would."""

    def __init__(self, net: StackedMLP, store: RunStore, tasks: Sequence[RunTask],
                 settings: WatchConfig, optimizer: torch.optim.Optimizer) -> None:
        self.net, self.store, self.optimizer = net, store, optimizer
        self.settings = settings
        assert isinstance(settings.every, int)  # a lab configuration's cadence
        self.every = settings.every
        self.k = len(tasks)
        self.step = 0
        self.samples: dict[tuple, Tensor | None] = {}
        self.tracked_index: dict[int, list[int]] = {}
        self.tracked_columns: tuple[list[int], list[int]] | None = None
        self.window: Window | None = None
        self.chosen = sorted({i for layer in net.layers for i in layer.params})
        position = {i: j for j, i in enumerate(self.chosen)}  # parameter index -> slot in chosen
        entries = [(i, lid, position[i]) for lid, layer in enumerate(net.layers) if layer.kind == "param"
                   for i in layer.params]
        table = np.array(entries, dtype=np.int64).reshape(-1, 3)
        self.layout = ParamLayout(table[:, 0], table[:, 1], table[:, 2])
        self.run_ids: list[int] = []
        parameters = sum(p[0].numel() for p in net.params.values())
        for task in tasks:
            config = task.config()
            # what watch() stores, and how this run was recorded: the one difference from run_task's
            config["gradwatch"] = gradwatch_config(self.every, "MLP", parameters, type(optimizer).__name__,
                                                   vectorized=True)
            self.run_ids.append(store.create_run(task.run_name, config))
        for run_id in self.run_ids:
            store.add_layers(run_id, [
                (lid, layer.name, layer.type_name, layer.kind,
                 layer.activation.name if layer.activation else None)
                for lid, layer in enumerate(net.layers)
            ])
        self.losses: list[Tensor] = []  # this epoch's (K,) losses, one per step
        self.epoch_first_step = 0
        self.pending: dict[str, Any] | None = None  # the logged step being recorded

    def logged(self) -> bool:
        """Whether the current step is logged (``step % every == 0``)."""
        return self.step % self.every == 0

    # -- a step ----------------------------------------------------------------

    def after_backward(self, tap: _Tap | None) -> None:
        """Gradient norms of every parameter (the window); on logged steps the weight statistics."""
        with torch.no_grad():
            params = self.net.parameters()
            # (K, P), float32: the watcher's _foreach_norm of each seed's gradients
            norms = self.net.row_norms(self.net.flat_grad)
            if self.window is None:
                self.window = Window((self.k, len(params)))
            self.window.add(self.step, norms)
            if tap is None:
                return
            self.pending = {
                "tap": tap, "norms": norms,
                "applied": torch.linalg.vector_norm(norms, dim=1),  # the lab does not clip
                "weight_norms": self.net.row_norms(self.net.flat.detach())[:, self.chosen],
                "tracked": [(lid, self._tracked(lid, params)) for lid, layer in enumerate(self.net.layers)
                            if layer.params],
                "blocks": [self._update_sample(i, params) for i in self.chosen],  # before the step
                "lr": self.optimizer.param_groups[0].get("lr"),
            }

    def _tracked(self, lid: int, params: list[Tensor]) -> Tensor:
        """The watcher's tracked weight elements of layer ``lid``, per seed (K, count)."""
        layer = self.net.layers[lid]
        i = layer.params[0]
        flat = params[i].detach().reshape(self.k, -1)
        key = ("tracked", layer.name, flat.shape[1])
        if key not in self.samples:
            start, where = tracked_elements(layer.name, flat.shape[1], i, self.settings.weight_samples)
            index = torch.tensor([start + q for q in where], dtype=torch.int64)
            self.samples[key] = index
            self.tracked_index[lid] = index.tolist()  # flat element indices, as the store keeps them
        return flat[:, self.samples[key]]

    def _update_sample(self, i: int, params: list[Tensor]) -> Tensor:
        """The watcher's fixed block of parameter ``i``'s elements, per seed (K, count), copied."""
        flat = params[i].detach().reshape(self.k, -1)
        start, length = weight_block(flat.shape[1], i)  # as Watcher._spans
        return flat[:, start : start + length].clone()

    def after_step(self, loss: Tensor) -> None:
        """After ``optimizer.step()``: update ratios, then the step's rows; the next step begins."""
        self.losses.append(loss)
        pending = self.pending
        if pending is not None:
            with torch.no_grad():
                params = self.net.parameters()
                after = [self._update_sample(i, params) for i in self.chosen]
                before = pending["blocks"]
                # ||w_after - w_before|| and ||w_before||, both on the same block of elements
                pending["moved"] = torch.stack([torch.linalg.vector_norm(a - b, dim=1)
                                                for a, b in zip(after, before, strict=True)], 1)
                pending["before"] = torch.stack([torch.linalg.vector_norm(b, dim=1) for b in before], 1)
            assert self.window is not None
            self.window.fold()
            pending["window"], self.window = self.window, None
            self._write_logged(self.step, pending)
            self.pending = None
        self.step += 1

    def end_epoch(self, epoch: int, test_loss: list[float], test_acc: list[float]) -> None:
        """Write the epoch's per-step losses and its closing values at its last step."""
        losses = torch.stack(self.losses)  # (steps, K)
        train_loss = losses.mean(0).tolist()
        per_step = losses.t().tolist()
        last = self.step - 1
        for k, run_id in enumerate(self.run_ids):
            rows = [(self.epoch_first_step + s, "loss", v) for s, v in enumerate(per_step[k])]
            rows += [(last, "epoch", float(epoch)), (last, "train_loss", train_loss[k]),
                     (last, "test_loss", test_loss[k]), (last, "test_acc", test_acc[k])]
            self.store.add_scalars(run_id, rows)
        self.losses = []
        self.epoch_first_step = self.step

    # -- one logged step's rows ------------------------------------------------------------------

    def _write_logged(self, step: int, pending: dict[str, Any]) -> None:
        """Bring a logged step's values to the host and queue each run's rows."""
        window: Window = pending["window"]
        rows = self._layer_rows(pending, pending["tap"], window)
        grads = _host(pending["norms"])
        scalars = step_scalars(step, grad=grads, applied=pending["applied"].tolist(),
                               window=_host(window.totals()), window_steps=window.steps,
                               lr=pending["lr"], wall_time=time.time())
        if self.tracked_columns is None:  # the layer ids and element indices of the values' columns
            lids = [lid for lid, _ in pending["tracked"]]
            self.tracked_columns = tracked_columns({lid: self.tracked_index[lid] for lid in lids})
        tracked_values = torch.cat([values for _, values in pending["tracked"]], 1).numpy()  # (K, weights)
        for k, run_id in enumerate(self.run_ids):
            self.store.add_layer_array(run_id, step, *rows.rows(k))
            self.store.add_weight_array(run_id, step, *self.tracked_columns, tracked_values[k])
            self.store.add_scalars(run_id, scalars[k])

    def _layer_rows(self, pending: dict[str, Any], tap: _Tap, window: Window) -> LayerRows:
        """Every seed's per-layer values of a logged step, from the tap's and the step's sums."""
        rows = LayerRows(self.k, len(self.net.layers))
        runs = np.arange(self.k)[:, None]
        if tap.delta_sq:
            lids = list(tap.delta_sq)
            squares = _host(torch.stack([tap.delta_sq[lid] for lid in lids], 1))  # (K, layers)
            counts = np.broadcast_to(np.array([tap.counts[lid] for lid in lids], dtype=np.float64),
                                     squares.shape)
            rows.add_deltas(runs, lids, counts, squares)
        if tap.moments:
            lids = list(tap.moments)
            sums = _host(torch.stack([tap.moments[lid] for lid in lids], 1))  # (K, layers, [sum, norm])
            counts = np.broadcast_to(np.array([tap.counts[lid] for lid in lids], dtype=np.float64),
                                     sums.shape[:2])
            rows.add_moments(runs, lids, counts, sums[..., 0], sums[..., 1] ** 2)
        seeds, lids, stats = self._activation_stats(tap)
        if len(lids):
            rows.add_activations(seeds, lids, stats)
        rows.add_params(self.layout, _host(pending["norms"]), np.ones(pending["norms"].shape, dtype=bool),
                        _host(pending["weight_norms"]), _host(pending["moved"]), _host(pending["before"]))
        rows.add_window(self.layout, _host(window.max), _host(window.min))
        return rows

    def _activation_stats(self, tap: _Tap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seeds, layer ids, :func:`activation_stat_rows`): one batch per activation kind."""
        groups: dict[tuple, list[tuple[int, int, tuple[Tensor, Tensor, bool]]]] = defaultdict(list)
        layers = self.net.layers
        for lid, per_seed in tap.kept:
            activation = layers[lid].activation
            assert activation is not None
            groups[activation.key].extend((k, lid, kept) for k, kept in enumerate(per_seed))
        seeds: list[int] = []
        lids: list[int] = []
        rows: list[Tensor] = []
        for members in groups.values():
            activation = layers[members[0][1]].activation
            assert activation is not None
            kept = [kept for _, _, kept in members]
            calls = ActivationCalls(activation, [x for x, _, _ in kept], [u for _, u, _ in kept],
                                    [d for _, _, d in kept])
            rows.append(activation_stat_rows(calls))
            seeds += [k for k, _, _ in members]
            lids += [lid for _, lid, _ in members]
        stats = torch.cat(rows).numpy().astype(np.float64) if rows else np.zeros((0, len(ACTIVATION_METRICS)))
        return np.array(seeds, dtype=np.int64), np.array(lids, dtype=np.int64), stats

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        """Mark every run ``finished`` (or ``failed`` with ``error``); flushes the store."""
        for run_id in self.run_ids:
            self.store.finish_run(run_id, status, error)


# --- one group -----------------------------------------------------------------------------------


def _stack(tensors: Sequence[Tensor], what: str, group: SeedGroup) -> Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ConfigError(
            f"{group.run_name}: the seeds' {what} differ in shape ({sorted(shapes)}); a seed group needs "
            f"splits of one size: run these seeds one at a time (vectorize=False)"
        )
    return torch.stack(list(tensors))


def _epoch_batches(x: Tensor, y: Tensor, orders: Sequence[torch.Generator], batch_size: int):
    """Each seed's shuffled epoch, stacked: (K, batch, ...) pairs.

    Drawn as :func:`gradwatch.lab.data.iterate_minibatches` draws one seed's epoch:
    ``randperm(n, generator)``, then consecutive batches of that order.
    """
    n = x.shape[1]
    perms = torch.stack([torch.randperm(n, generator=g) for g in orders])
    xs = torch.stack([x[k, perms[k]] for k in range(x.shape[0])])
    ys = torch.gather(y, 1, perms)
    for start in range(0, n, batch_size):
        yield xs[:, start : start + batch_size], ys[:, start : start + batch_size]


def seed_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each seed's mean cross-entropy: (K,) from logits (K, N, C) and labels (K, N)."""
    k, n, c = logits.shape
    return F.cross_entropy(logits.reshape(k * n, c), y.reshape(k * n), reduction="none").view(k, n).mean(1)


def run_group(
    group: SeedGroup,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GroupResult:
    """Train a :class:`SeedGroup`'s K seeds as one batched network; never raises.

    Writes K runs, each as :func:`gradwatch.lab.runner.run_task` writes its run (the
    same config but for ``config["gradwatch"]["vectorized"]``, names, scalars, per-layer
    metrics, tracked weights and findings), and returns one result per run.

    Args:
        group: the tasks.
        on_epoch: called with ``(epoch, mean test accuracy over the seeds)`` after each epoch.
        should_stop: polled after each epoch; True ends every run as ``stopped`` (marked
            failed in the store, so a resume runs them again).
    """
    start = time.perf_counter()
    tasks = group.tasks
    recorder: _Recorder | None = None

    def results(status: str, accs: Sequence[float | None], error: str | None,
                notes: Sequence[str | None] | None = None) -> GroupResult:
        seconds = time.perf_counter() - start
        ids = recorder.run_ids if recorder is not None else [None] * len(tasks)
        runs = tuple(RunResult(t, status, rid, acc, seconds / len(tasks), notes[i] if notes else error)
                     for i, (t, rid, acc) in enumerate(zip(tasks, ids, accs, strict=True)))
        done = [a for a in accs if a is not None]
        return GroupResult(group, status, None, sum(done) / len(done) if done else None, seconds, error, runs)

    if should_stop is not None and should_stop():
        return results("stopped", [None] * len(tasks), STOP_MESSAGE)
    try:
        data = [task_dataset(t.dataset, t.seed, t.cache_dir) for t in tasks]
        entry, train = group.entry, group.entry.train
        x_train = _stack([d.x_train for d in data], "training splits", group)
        y_train = _stack([d.y_train for d in data], "training labels", group)
        x_test = _stack([d.x_test for d in data], "test splits", group)
        y_test = _stack([d.y_test for d in data], "test labels", group)
        models = [build_model(entry.model, d.input_shape, d.n_classes, seed=t.seed)
                  for d, t in zip(data, tasks, strict=True)]
        net = StackedMLP(models)
        optimizer = net.optimizer(train)
        orders = [torch.Generator().manual_seed(t.seed) for t in tasks]
        with RunStore(tasks[0].store) as store:
            recorder = _Recorder(net, store, tasks, watch_settings(train), optimizer)
            try:
                accs = _train(net, optimizer, recorder, train, (x_train, y_train, x_test, y_test), orders,
                              on_epoch, should_stop)
            except BaseException as err:
                recorder.finish("failed", f"{type(err).__name__}: {err}")
                raise
            recorder.finish()
            notes = [diagnose_run(store, rid) for rid in recorder.run_ids]
        return results("finished", accs, None, notes)
    except StoppedByUser:
        return results("stopped", [None] * len(tasks), STOP_MESSAGE)
    except Exception as err:  # noqa: BLE001 - one broken group must not end the grid
        return results("failed", [None] * len(tasks), f"{type(err).__name__}: {err}")


def _train(net: StackedMLP, optimizer: torch.optim.Optimizer, recorder: _Recorder, train: Any,
           data: tuple[Tensor, Tensor, Tensor, Tensor], orders: Sequence[torch.Generator],
           on_epoch: Callable[[int, float], None] | None, should_stop: Callable[[], bool] | None
           ) -> list[float]:
    """The epochs of :func:`run_group`; returns the last test accuracy of each seed."""
    x_train, y_train, x_test, y_test = data
    accs: list[float] = []
    for epoch in range(1, train.epochs + 1):
        for xb, yb in _epoch_batches(x_train, y_train, orders, train.batch_size):
            net.zero_grad()
            logged = recorder.logged()
            tap = _Tap(net, recorder.samples, recorder.settings.activation_sample) if logged else None
            losses = seed_losses(net.forward(xb, training=True, tap=tap), yb)
            losses.sum().backward()  # seed k's slice of each gradient is dL_k / d(its parameters)
            recorder.after_backward(tap)
            optimizer.step()
            recorder.after_step(losses.detach())
        with torch.no_grad():
            logits = net.forward(x_test, training=False)
            test_loss = seed_losses(logits, y_test).tolist()
            accs = (logits.argmax(2) == y_test).float().mean(1).tolist()
        recorder.end_epoch(epoch, test_loss, accs)
        if on_epoch is not None:
            on_epoch(epoch, sum(accs) / len(accs))
        if should_stop is not None and should_stop() and epoch < train.epochs:
            raise StoppedByUser(STOP_MESSAGE)
    return accs
