"""Shared fixtures and helpers: a temporary store, small models, relative error, headless Chromium,
one thread for torch. Test modules import helpers from here, never from each other."""

from __future__ import annotations

import os
import shutil

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


def rel(a: float, b: float) -> float:
    """|a - b| / |b|, with |b| floored at 1e-30 so that a zero reference does not divide by zero."""
    return abs(a - b) / max(abs(b), 1e-30)


class BasicBlock(nn.Module):
    """A ResNet basic block with in-place ReLUs (as torchvision's)."""

    def __init__(self, channels: int, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet(inplace: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        BasicBlock(8, inplace),
        BasicBlock(8, inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


class MixedLayouts(nn.Module):
    """Outputs of both of _square_sum's paths in one step: contiguous float32 (torch.dot on the
    CPU), a transposed (non-contiguous) view (the norm kernel, squared on the host), float64."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.t = TransposedLinear(12, 12)
        self.d = nn.Linear(12, 4).double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.t(h).t())  # back to (batch, features)
        return self.d(h.double()).float()


class TransposedLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x).t()  # a non-contiguous output, and its gradient


def chrome(tmp_path, width: int = 1280, height: int = 1600):
    """A headless Chromium driven by Selenium, its profile under tmp_path, its console logs kept.

    Skips when selenium, Debian's chromium or chromium-driver is missing, and fails instead under
    CI, where `make test` installs them. The caller quits the browser.
    """
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Debian's chromium and chromium-driver are needed (make test installs them)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))
