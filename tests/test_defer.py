"""Statistics deferred to the end of the forward (gradwatch._defer) equal the hooks' own.

A layer is measured in its hook on its first logged step and, unless its tensor was changed
in place after the hook, batched with the others of its shape from the next one on. With the
weights fixed (lr = 0) and one batch, every step's statistics must equal the first step's.
"""

import numpy as np
import torch
from conftest import MixedLayouts, mlp, resnet
from torch import nn

import gradwatch
from gradwatch.stats import ACTIVATION_STATS, INPUT_QUANTILES

# what is measured on the tensors the hooks see: output moments, the activations' inputs, deltas
COLUMNS = [
    "output_mean",
    "output_std",
    *ACTIVATION_STATS,
    *(f"input_q{round(q * 100)}" for q in INPUT_QUANTILES),
    "delta_rms",
]


def run(model, x, y, store, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, every=1, store=store, warn=False) as w:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        # by layer id (forward order), from the watcher's public account of where each is measured
        by_name = w.deferred_layers()
        metrics = w.metrics()
        ids = dict(zip(metrics.layer, metrics.layer_id, strict=True))
        return metrics, {int(ids[name]): ok for name, ok in by_name.items()}


def same(a, b, rtol=2e-6):
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=rtol, atol=1e-7)


def by_step(metrics, step):
    return metrics[metrics.step == step].set_index("layer")[COLUMNS].sort_index()


def test_deferred_equal_the_first_step_measured_in_the_hooks(store):
    torch.manual_seed(0)
    model = nn.Sequential(
        mlp(depth=6, width=32), nn.Sigmoid(), nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3)
    )
    x, y = torch.randn(64, 8) * 3, torch.randint(0, 3, (64,))  # wide inputs: some saturation
    metrics, deferrable = run(model, x, y, store)
    assert deferrable and all(deferrable.values())  # every layer was batched from step 1 on
    first = by_step(metrics, 0)
    # 9 Linear layers, 8 activations
    assert first.output_mean.notna().sum() == 9 and first.input_q50.notna().sum() == 8
    for step in (1, 2):
        same(by_step(metrics, step), first)


def test_deferred_on_every_layout_match_the_reference(store):
    # non-contiguous outputs, float64, layers that are alone of their shape
    torch.manual_seed(0)
    model = MixedLayouts()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    metrics, deferrable = run(model, x, y, store, steps=2)
    assert deferrable[0] and deferrable[1]
    same(by_step(metrics, 1), by_step(metrics, 0))


def test_changed_in_place_after_the_hook_stays_in_the_hook(tmp_path):
    # nn.ReLU(inplace=True) after BatchNorm and `out += identity` change the layers' outputs
    # after their hooks: those layers must stay measured in the hook, and equal the same
    # network without in-place ops (whose layers are all deferred)
    torch.manual_seed(0)
    inplace, plain = resnet(inplace=True), resnet(inplace=False)
    plain.load_state_dict(inplace.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    a, deferrable_a = run(inplace, x, y, tmp_path / "a.db")
    b, deferrable_b = run(plain, x, y, tmp_path / "b.db")
    assert not deferrable_a[0] and deferrable_b[0]  # the stem: ReLU in place or not
    assert sum(deferrable_b.values()) > sum(deferrable_a.values()) > 0
    for step in (0, 1, 2):
        same(by_step(a, step), by_step(b, step), rtol=1e-5)


class ShiftFrom(nn.Module):
    """Adds 1 to its input in place from step ``start`` on: a layer's output changed after its hook."""

    def __init__(self, start: int):
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, x):
        self.calls += 1
        return x.add_(1.0) if self.calls > self.start else x


def test_a_deferred_call_changed_in_place_is_dropped_not_wrong(store):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), ShiftFrom(2), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    metrics, deferrable = run(model, x, y, store, steps=4)
    assert deferrable[0] is False  # learnt at step 2
    mean = metrics[metrics.layer == "0"].set_index("step").output_mean
    assert np.isnan(mean[2])  # step 2: its output had changed by the end of the forward: no value
    # step 1 deferred, step 3 in the hook again
    np.testing.assert_allclose([mean[1], mean[3]], [mean[0], mean[0]], rtol=1e-6)
    reference = model[0](x).mean().item()
    assert abs(mean[0] - reference) < 1e-6
