"""Memory and back-pressure over long watched runs.

Three runs of a small model (an 8-layer tanh MLP, width 128, batch 64), each in a fresh store:

1. ``every=1``: 10,000 steps, every step logged;
2. the default cadence: 10,000 steps;
3. a slow disk: ``every=1`` while another connection holds the store's SQLite write lock for
   ``--hold`` s out of every ``--hold + --gap`` s, so each of the store's commits waits (as on a
   slow or contended disk). The store's bounded write queue must fill and make training wait
   (steps get slower) instead of holding the rows in memory.

For each run the process's resident set size (RSS) and ``RunStore.pending_writes()`` are sampled
every ``--sample-every`` steps. Reported: RSS growth after warm-up,
``(RSS_end - RSS_warm) / RSS_warm`` and ``(max RSS after warm-up - RSS_warm) / RSS_warm``, where
``RSS_warm`` is the RSS at the end of the first ``--warmup`` steps (target: < 5%; the slow-disk
run warms up for ``min(--warmup, --slow-steps / 5)`` steps, before its queue fills, and also reports
its growth over the whole run); the largest number of pending writes seen (bound:
``RunStore.max_pending_writes``); the time per step, and once the queue first filled; and that
every logged step reached the store (no row dropped under back-pressure).

    python bench/soak.py [--steps 10000] [--slow-steps 1500] [--warmup 1000] [--threads 1]

Writes bench/results/soak.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import gradwatch
from gradwatch.errors import GradientWarning
from gradwatch.store import RunStore

RESULTS = Path(__file__).parent / "results"
RSS_BUDGET = 0.05


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def small_mlp(depth: int = 8, width: int = 128) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class LockHolder:
    """Holds the SQLite write lock of ``path`` for ``hold`` s out of every ``hold + gap`` s.

    A second connection's ``BEGIN IMMEDIATE`` ... ``COMMIT`` around a sleep: the store's writer
    then waits in SQLite's busy handler for up to ``hold`` s per commit, which is what a slow disk
    does to it, through nothing but SQLite's public locking.
    """

    def __init__(self, path: Path, hold: float, gap: float) -> None:
        self.path, self.hold, self.gap = path, hold, gap
        self.held_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-lock-holder", daemon=True)

    def __enter__(self) -> LockHolder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            while not self._stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                start = time.perf_counter()
                self._stop.wait(self.hold)
                conn.execute("COMMIT")
                self.held_s += time.perf_counter() - start
                self._stop.wait(self.gap)
        finally:
            conn.close()


@dataclass
class SoakResult:
    """One soak run: its samples and what they show."""

    name: str
    every: int
    steps: int
    warmup: int
    ms_per_step: float = 0.0
    ms_per_step_after_warmup: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_growth_end: float = 0.0
    rss_growth_max: float = 0.0
    rss_growth_whole_run: float = 0.0  # (max RSS - first sample) / first sample, warm-up included
    max_pending_writes: int = 0
    pending_bound: int = 0
    full_queue_steps: float = 0.0  # fraction of steps after which the queue was >= 90% full
    ms_per_step_full_queue: float | None = None  # after the queue first filled
    logged_steps_expected: int = 0
    logged_steps_stored: int = 0
    store_bytes: int = 0
    lock_held_fraction: float | None = None
    samples: list[tuple[int, float, int, float]] = field(default_factory=list)  # step, rss MB, pending, t

    @property
    def ok(self) -> bool:
        return (
            self.rss_growth_max < RSS_BUDGET
            and self.max_pending_writes <= self.pending_bound
            and self.logged_steps_stored == self.logged_steps_expected
        )


def soak(
    name: str,
    store_path: Path,
    steps: int,
    warmup: int,
    sample_every: int,
    every: int | None,
    lock: tuple[float, float] | None = None,
) -> SoakResult:
    """Train ``steps`` watched steps, sampling RSS and pending writes every ``sample_every`` steps."""
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    store = RunStore(store_path)
    kwargs = {} if every is None else {"every": every}
    watcher = gradwatch.watch(model, opt, store=store, run_name=name, **kwargs)
    cadence = every if every is not None else gradwatch.watch.__kwdefaults__["every"]
    result = SoakResult(name, cadence, steps, warmup, pending_bound=store.max_pending_writes)
    holder = LockHolder(store.path, *lock) if lock else None
    if holder:
        holder.__enter__()
    try:
        full_steps, first_full = 0, None
        start = time.perf_counter()
        for step in range(steps):
            if step == warmup:
                warm_t = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            watcher.log(loss=loss)
            pending = store.pending_writes()
            result.max_pending_writes = max(result.max_pending_writes, pending)
            if pending >= 0.9 * result.pending_bound:
                full_steps += 1
                if first_full is None:
                    first_full = (step + 1, time.perf_counter())
            if (step + 1) % sample_every == 0:
                result.samples.append((step + 1, rss_bytes() / 2**20, pending, time.perf_counter() - start))
        end = time.perf_counter()
    finally:
        if holder:
            holder.__exit__()
        watcher.detach()
    result.ms_per_step = (end - start) / steps * 1e3
    result.ms_per_step_after_warmup = (end - warm_t) / (steps - warmup) * 1e3
    if holder:
        result.lock_held_fraction = holder.held_s / (end - start)
    warm = next(s[1] for s in result.samples if s[0] >= warmup)
    after = [s[1] for s in result.samples if s[0] >= warmup]
    result.rss_warm_mb, result.rss_end_mb, result.rss_max_mb = warm, after[-1], max(after)
    result.rss_growth_end = (after[-1] - warm) / warm
    result.rss_growth_max = (max(after) - warm) / warm
    first = result.samples[0][1]
    result.rss_growth_whole_run = (max(s[1] for s in result.samples) - first) / first
    result.full_queue_steps = full_steps / steps
    if first_full is not None and first_full[0] < steps:  # from the queue's first filling: the disk's pace
        result.ms_per_step_full_queue = (end - first_full[1]) / (steps - first_full[0]) * 1e3
    result.logged_steps_expected = sum(1 for s in range(steps) if s % cadence == 0)
    result.logged_steps_stored = int(watcher.metrics(metrics=["grad_norm"])["step"].nunique())
    store.close()
    result.store_bytes = sum(
        Path(str(store_path) + suffix).stat().st_size
        for suffix in ("", "-wal")
        if Path(str(store_path) + suffix).exists()
    )
    return result


def _print(results: list[SoakResult], threads: int) -> None:
    print(f"\nsoak: 8-layer tanh MLP, width 128, batch 64, {threads} thread(s), torch {torch.__version__}\n")
    print(
        "| run | steps | ms/step | RSS after warm-up | RSS growth, end / max | pending writes, max "
        "(bound) | steps with a full queue | logged steps stored | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        paced = f" ({r.ms_per_step_full_queue:.1f} once the queue filled)" if r.ms_per_step_full_queue else ""
        print(
            f"| {r.name} | {r.steps:,} | {r.ms_per_step_after_warmup:.2f}{paced} | {r.rss_warm_mb:.0f} MB | "
            f"{r.rss_growth_end:+.1%} / {r.rss_growth_max:+.1%} | "
            f"{r.max_pending_writes} ({r.pending_bound}) | "
            f"{r.full_queue_steps:.0%} | {r.logged_steps_stored:,}/{r.logged_steps_expected:,} | "
            f"{'yes' if r.ok else 'NO'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10_000, help="steps of the every=1 and default runs")
    parser.add_argument("--slow-steps", type=int, default=1_500, help="steps of the slow-disk run (0: skip)")
    parser.add_argument("--warmup", type=int, default=1_000, help="steps before RSS_warm is taken")
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--hold", type=float, default=10.0, help="slow disk: seconds the lock is held")
    parser.add_argument("--gap", type=float, default=0.1, help="slow disk: seconds it is free")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=GradientWarning)

    results = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-soak-") as d:
        tmp = Path(d)
        plan: list[tuple[str, int, int | None, tuple[float, float] | None]] = [
            ("every=1", args.steps, 1, None),
            (f"default (every {gradwatch.watch.__kwdefaults__['every']})", args.steps, None, None),
        ]
        if args.slow_steps:
            plan.append(
                (
                    f"every=1, slow disk (lock {args.hold} s of {args.hold + args.gap:.2f} s)",
                    args.slow_steps,
                    1,
                    (args.hold, args.gap),
                )
            )
        for i, (name, steps, every, lock) in enumerate(plan):
            print(f"{name}: {steps:,} steps ...", flush=True)
            warmup = args.warmup if lock is None else min(args.warmup, steps // 5)  # before the queue fills
            r = soak(name, tmp / f"soak-{i}.db", steps, warmup, args.sample_every, every, lock)
            print(
                f"  {r.ms_per_step_after_warmup:.2f} ms/step, "
                f"RSS {r.rss_warm_mb:.0f} -> {r.rss_end_mb:.0f} MB "
                f"(max {r.rss_max_mb:.0f}), pending max {r.max_pending_writes}/{r.pending_bound}",
                flush=True,
            )
            results.append(r)
    _print(results, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "soak.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average": list(os.getloadavg()),
                "torch": torch.__version__,
                "threads": args.threads,
                "rss_budget": RSS_BUDGET,
                "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "runs": [asdict(r) | {"ok": r.ok} for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    slow = next((r for r in results if r.lock_held_fraction is not None), None)
    if slow is not None and slow.ms_per_step_full_queue is None:
        print("\nslow disk: the write queue never filled; raise --hold or --slow-steps to see back-pressure")
    elif slow is not None:
        factor = slow.ms_per_step_full_queue / results[0].ms_per_step_after_warmup
        verdict = "training waited, memory did not grow" if slow.ok else "NOT within the bounds above"
        print(
            f"\nslow disk (lock held {slow.lock_held_fraction:.0%} of the time): "
            f"{slow.ms_per_step_full_queue:.1f} ms/step once the queue filled, {factor:.1f}x the every=1 "
            f"step on a free disk; pending writes at most {slow.max_pending_writes} "
            f"(bound {slow.pending_bound}), RSS growth {slow.rss_growth_max:+.1%} after warm-up, "
            f"{slow.rss_growth_whole_run:+.1%} over the whole run: {verdict}"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
