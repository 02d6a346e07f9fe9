"""Step-time overhead of watching, measured side by side.

Each round times every variant on its own copy of the same model, in an order
that rotates from round to round (interleaved), so slow drifts of a shared
machine hit all variants alike. Reported: the median over rounds of
(variant step time / unwatched step time), with min and max.

    python bench/overhead.py [--rounds 7] [--steps 60] [--threads 2] [--model mlp]

Writes bench/results/overhead-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradwatch

RESULTS = Path(__file__).parent / "results"


def tanh_mlp(depth: int = 20, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple]]] = {
    "mlp": (
        tanh_mlp,
        lambda g: (torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)),
    ),
}


class Variant:
    """How one row of the table watches (or does not watch) the model."""

    def __init__(self, name: str, attach: Callable[[nn.Module, torch.optim.Optimizer, Path], object] | None):
        self.name = name
        self.attach = attach


def _foreach_floor(model: nn.Module, opt: torch.optim.Optimizer, tmp: Path):
    """The floor for per-layer norms: one foreach_norm and one transfer per step."""
    params = [p for p in model.parameters()]

    def hook(optimizer, args, kwargs):
        torch.stack(torch._foreach_norm([p.grad for p in params])).cpu()

    return opt.register_step_pre_hook(hook)


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
            norms = torch._foreach_norm([p.grad for p in params])
            torch.stack([*norms, *self.values]).cpu()
            self.values.clear()

        self.handles.append(opt.register_step_pre_hook(step))

    def _forward(self, module, args, output):
        if output.requires_grad:
            output.register_hook(self._grad)

    def _grad(self, grad):
        self.values.append(grad.pow(2).mean().sqrt())

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


VARIANTS = [
    Variant("unwatched", None),
    Variant("torch._foreach_norm floor", _foreach_floor),
    Variant("naive delta floor (hooks + norms)", lambda m, o, tmp: _NaiveDeltaFloor(m, o)),
    Variant("gradwatch every step", lambda m, o, tmp: gradwatch.watch(m, o, every=1, store=tmp / "every.db")),
    Variant(
        f"gradwatch default (every {gradwatch.watch.__kwdefaults__['every']})",
        lambda m, o, tmp: gradwatch.watch(m, o, store=tmp / "default.db"),
    ),
]


def _detach(handle: object) -> None:
    if handle is None:
        return
    if hasattr(handle, "detach"):
        handle.detach()
    else:
        handle.remove()


def time_variant(variant: Variant, model_name: str, steps: int, warmup: int, tmp: Path, seed: int) -> float:
    """Seconds per training step (forward, backward, optimizer step) of one variant."""
    build, batch = MODELS[model_name]
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    handle = variant.attach(model, opt, tmp) if variant.attach else None
    g = torch.Generator().manual_seed(seed)
    x, y = batch(g)
    loss_fn = nn.CrossEntropyLoss()
    log = getattr(handle, "log", None)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if log is not None:
            log(loss=loss)
    if hasattr(handle, "flush"):
        handle.flush()  # the cost of writing is part of the cost
    elapsed = time.perf_counter() - start
    _detach(handle)
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    times: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            this_round = {}
            for v in order:
                this_round[v.name] = time_variant(v, args.model, args.steps, args.warmup, tmp, seed=r)
            for name, t in this_round.items():
                times[name].append(t)
                ratios[name].append(t / this_round["unwatched"])
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in this_round.items()),
                flush=True,
            )

    rows = []
    for v in VARIANTS:
        rs = ratios[v.name]
        rows.append(
            {
                "variant": v.name,
                "median_ratio": statistics.median(rs),
                "min_ratio": min(rs),
                "max_ratio": max(rs),
                "median_step_ms": statistics.median(times[v.name]) * 1e3,
            }
        )
    print(
        f"\n{args.model}: {args.rounds} interleaved rounds x {args.steps} steps, "
        f"{args.threads} threads, torch {torch.__version__}\n"
    )
    print("| variant | step (ms) | ratio to unwatched, median | min | max |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['median_step_ms']:.2f} | {row['median_ratio']:.3f}x | "
            f"{row['min_ratio']:.3f}x | {row['max_ratio']:.3f}x |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"overhead-{args.model}-{args.threads}threads.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "rounds": args.rounds,
                "steps": args.steps,
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.platform(),
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
