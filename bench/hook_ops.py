"""What a small op costs inside a forward hook, against the same op alone.

The every-step watcher's cost is mostly small ops in hooks (a sum, a dot, a gather of
sampled inputs, a per-unit min). Alone, in a loop, each takes a few microseconds; inside a
training step they cost several times more. This times that, on the benchmark's 20-layer
tanh MLP (width 256, batch 128): copies of the model, each with forward hooks on the 19
hidden Linear layers of 256 outputs doing one kind of op (or nothing), trained step by step
in turn beside an unhooked copy (same seed, same batch, the order rotating), and reports the
median extra milliseconds per step of each against the same ops timed alone on a tensor of
the same shape (x 19).

    python bench/hook_ops.py [--steps 150] [--warmup 10] [--threads 2]

Prints a markdown table; writes bench/results/hook-ops-<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from overhead import MODELS, train_step
from torch import Tensor, nn

RESULTS = Path(__file__).parent / "results"
WIDTH, BATCH, SAMPLE = 256, 128, 2048


def _variants(keep: list) -> dict[str, Callable[[Tensor], None] | None]:
    """What each hooked copy does with a hidden Linear layer's output ``out``."""
    index = torch.randint(0, BATCH * WIDTH, (SAMPLE,), generator=torch.Generator().manual_seed(0))

    def sum_dot(out: Tensor) -> None:
        flat = out.detach().view(-1)
        keep.append((flat.sum(), torch.dot(flat, flat)))

    def grad_dot(out: Tensor) -> None:
        out.register_hook(lambda g: keep.append(torch.dot(g.reshape(-1), g.reshape(-1))))

    def gather(out: Tensor) -> None:
        keep.append(out.detach().view(-1).index_select(0, index))

    return {
        "nothing (an empty hook)": lambda out: None,
        "an empty tensor hook on the output": lambda out: out.register_hook(lambda g: None) and None,
        "sum and dot of the output": sum_dot,
        "dot of dL/d output (tensor hook)": grad_dot,
        "gather of 2,048 sampled elements": gather,
        "abs().amin(0) (per-unit extreme)": lambda out: keep.append(out.detach().abs().amin(0)),
    }


def _alone(op: Callable[[Tensor], None] | None, keep: list, repeats: int = 2000) -> float:
    """Milliseconds of ``op`` on a (batch, width) tensor in a loop, x 19 (the hooked layers)."""
    if op is None:
        return 0.0
    x = torch.randn(BATCH, WIDTH, requires_grad=True) * 1.0  # a non-leaf, as a layer's output
    for _ in range(100):
        op(x)
    keep.clear()
    start = time.perf_counter()
    for i in range(repeats):
        op(x)
        if i % 19 == 18:
            keep.clear()  # as the step does: what a step kept is dropped after it
    keep.clear()
    return (time.perf_counter() - start) / repeats * 19 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = MODELS["mlp"]
    keep: list = []
    variants = _variants(keep)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = spec.build()
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {"unhooked": fresh()}
    for name, op in variants.items():
        model, opt = runs[name] = fresh()
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.out_features == WIDTH:
                module.register_forward_hook(lambda m, a, out, op=op: op(out))
    batch = spec.batch(torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.warmup + args.steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            model, opt = runs[name]
            start = time.perf_counter()
            train_step(spec, model, opt, batch, None)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
            keep.clear()
    base = statistics.median(times["unhooked"])
    rows = []
    for name, op in variants.items():
        extra = statistics.median(times[name]) - base
        rows.append({"op": name, "in_hooks_ms": round(extra, 3), "alone_ms": round(_alone(op, keep), 3)})
    print(f"\n20-layer tanh MLP, {args.threads} thread(s), unhooked step {base:.2f} ms "
          f"(median of {args.steps})\n")
    print("| in a forward hook on 19 layers | extra ms per step, in the step | the same ops alone, x 19 |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['op']} | {row['in_hooks_ms']:+.2f} | {row['alone_ms']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hook-ops-{args.threads}threads.json"
    out.write_text(json.dumps({"threads": args.threads, "steps": args.steps, "unhooked_step_ms": base,
                               "load_average": os.getloadavg(), "torch": torch.__version__, "rows": rows},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
