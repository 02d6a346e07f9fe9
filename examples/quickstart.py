"""Quick start: watch a deep sigmoid network and a ReLU network train on digits.

Run it with `python examples/quickstart.py`; then `gradwatch runs` and
`gradwatch show RUN` read what it recorded.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import gradwatch


def make_mlp(depth: int, activation: type[nn.Module], he_init: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    width_in = 64
    for _ in range(depth):
        linear = nn.Linear(width_in, 64)
        if he_init:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
        width_in = 64
    layers.append(nn.Linear(width_in, 10))
    return nn.Sequential(*layers)


def train(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> int:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, optimizer, every=10, run_name=name) as watcher:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=generator)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            watcher.log(loss=loss)
        metrics = watcher.metrics()
        scalars = watcher.scalars()
    last = metrics[(metrics.step == metrics.step.max()) & (metrics.kind == "param")]
    first_delta, last_delta = last.delta_rms.iloc[0], last.delta_rms.iloc[-1]
    print(
        f"{name:>22}: loss {scalars.loss.iloc[0]:.3f} -> {scalars.loss.iloc[-1]:.3f}, "
        f"first/last layer delta {first_delta / last_delta:.2e} "
        f"(run {watcher.run_id}, {len(metrics)} layer rows)"
    )
    return watcher.run_id


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    sigmoid_run = train("sigmoid-depth20", make_mlp(20, nn.Sigmoid, he_init=False), x, y)
    train("relu-he-depth20", make_mlp(20, nn.ReLU, he_init=True), x, y)
    print(f"\nSee a run layer by layer: gradwatch show {sigmoid_run}")


if __name__ == "__main__":
    main()
