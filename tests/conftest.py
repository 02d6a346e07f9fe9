"""Shared fixtures: a temporary store, small models, one thread for torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # oversubscribed OpenMP pools make small ops 100x slower on 2 cores


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "runs.db"


@pytest.fixture
def store(store_path):
    from gradwatch import RunStore

    s = RunStore(store_path)
    yield s
    s.close()


def mlp(
    depth: int = 4, width: int = 16, activation: type[nn.Module] = nn.Tanh, d_in: int = 8, d_out: int = 3
):
    layers: list[nn.Module] = []
    n = d_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), activation()]
        n = width
    layers.append(nn.Linear(n, d_out))
    return nn.Sequential(*layers)


def train_steps(
    model,
    optimizer,
    watcher=None,
    steps: int = 3,
    batch: int = 32,
    d_in: int = 8,
    d_out: int = 3,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g)
        y = torch.randint(0, d_out, (batch,), generator=g)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if watcher is not None:
            watcher.log(loss=loss)
        losses.append(loss.item())
    return losses
