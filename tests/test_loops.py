"""The training loops people really run: AMP, accumulation, clipping, spikes, NaN stops, compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import mlp, rel
from torch import nn

import gradwatch
from gradwatch.alerts import Alert
from gradwatch.errors import ConfigError, TrainingStopped


def batches(n: int, batch: int = 32, d_in: int = 8, d_out: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g))
        for _ in range(n)
    ]


def layer_norms(model: nn.Sequential) -> dict[str, float]:
    return {
        name: torch.linalg.vector_norm(m.weight.grad).item()
        for name, m in model.named_children()
        if isinstance(m, nn.Linear)
    }


# -- AMP ------------------------------------------------------------------------------


def test_grad_scaler_records_unscaled_norms_and_deltas(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    twin = mlp(depth=3)
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = []
    with gradwatch.watch(model, opt, every=1, store=store, scaler=scaler) as w, \
            gradwatch.watch(twin, twin_opt, every=1, store=store) as plain:
        for x, y in batches(3):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)  # unscales the grads in place, then steps
            scaler.update()
            expected.append(layer_norms(model))
            twin_opt.zero_grad()
            nn.functional.cross_entropy(twin(x), y).backward()
            twin_opt.step()
        m, s = w.metrics(), w.scalars()
        p = plain.metrics()
    for step, norms in enumerate(expected):
        at = m[m.step == step].set_index("layer")
        for name, value in norms.items():
            assert rel(at.loc[name, "grad_norm"], value) < 1e-6
    # deltas with a scale of 1024 equal the deltas of the unscaled twin (a power of two: exact)
    merged = m[m.kind == "param"].merge(p, on=["step", "layer"], suffixes=("", "_plain"))
    assert merged.delta_rms.notna().all()
    assert ((merged.delta_rms - merged.delta_rms_plain).abs() <= 1e-6 * merged.delta_rms_plain).all()
    assert (s.grad_scale == 1024.0).all()


def test_bfloat16_autocast_records_the_grads_norms(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for x, y in batches(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        norms = layer_norms(model)
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        m, s = w.metrics(), w.scalars()
    last = m[m.step == 1].set_index("layer")
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-6
    assert rel(s.total_grad_norm.iloc[-1], total) < 1e-6
    params = last[last.kind == "param"]
    assert params.delta_rms.notna().all() and params.output_std.notna().all()


def test_skipped_scaler_steps_are_recorded_as_skipped(store):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with gradwatch.watch(model, opt, every=1, store=store, scaler=scaler, window=True) as w:
        for step, (x, y) in enumerate(batches(5)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if step == 2:
                loss = loss * math.inf  # overflow: the scaler skips this step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            w.log(loss=loss.detach())
        assert w.step == 5  # a skipped step still counts: steps are iterations
        m, s = w.metrics(), w.scalars()
    assert s.set_index("step").skipped_step.fillna(0).tolist() == [0, 0, 1, 0, 0]
    assert sorted(m.step.unique()) == [0, 1, 3, 4]  # no layer data for the skipped step
    scales = s.set_index("step").grad_scale
    assert scales[3] == scales[2] / 2  # the scaler backed off after the overflow
    assert s.total_grad_norm_max.dropna().map(math.isfinite).all()  # the window skipped it too
    assert scaler.__dict__.get("update") is None  # our wrapper is gone after detach


def test_scaler_found_without_being_passed(store):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for x, y in batches(2):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        norms = layer_norms(model)
        m = w.metrics()
    last = m[m.step == 1].set_index("layer")
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-6
    first = m[m.step == 0]
    assert first.grad_norm.max() < 100  # step 0, taken before the scaler was found, is unscaled too


# -- accumulation and clipping -----------------------------------------------------------


def test_accumulation_records_one_step_with_the_accumulated_norm(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(8)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for step in range(2):
            opt.zero_grad()
            for x, y in data[4 * step : 4 * step + 4]:
                (nn.functional.cross_entropy(model(x), y) / 4).backward()
            total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
            norms = layer_norms(model)
            opt.step()
        m, s = w.metrics(), w.scalars()
    assert list(s.step) == [0, 1]
    assert rel(s.total_grad_norm.iloc[-1], total) < 1e-6
    last = m[m.step == 1].set_index("layer")
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-6


def test_pre_and_post_clip_norms(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    returned, clipped = [], []
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for x, y in batches(3):
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x), y) * 50).backward()
            returned.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5).item())
            clipped.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
            opt.step()
        s = w.scalars()
    assert all(r > 0.5 for r in returned)  # clipping happened
    for step in range(3):
        assert rel(s.total_grad_norm[step], returned[step]) < 1e-6
        assert rel(s.clipped_grad_norm[step], clipped[step]) < 1e-6
    assert rel(clipped[0], 0.5) < 1e-5


def test_closure_optimizer_takes_norms_after_the_closure(store):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = batches(1)[0]
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for _ in range(2):
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        s = w.scalars()
    assert list(s.step) == [0, 1]
    assert s.total_grad_norm.notna().all() and (s.total_grad_norm > 0).all()


# -- windowed extremes ---------------------------------------------------------------------


def test_a_spike_between_logged_steps_is_in_the_window(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    totals, per_layer = [], []
    with gradwatch.watch(model, opt, every=5, store=store, window=True) as w:
        for step, (x, y) in enumerate(batches(11)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) * (1000.0 if step == 3 else 1.0)
            loss.backward()
            totals.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
            per_layer.append(layer_norms(model))
            opt.step()
        m, s = w.metrics(), w.scalars()
    s = s.set_index("step")
    assert list(s.total_grad_norm.dropna().index) == [0, 5, 10]
    assert s.window_steps[5] == 5  # steps 1-5
    assert rel(s.total_grad_norm_max[5], max(totals[1:6])) < 1e-6
    assert rel(s.total_grad_norm_max[5], totals[3]) < 1e-6  # the spike, at unlogged step 3
    assert rel(s.total_grad_norm_min[5], min(totals[1:6])) < 1e-6
    assert s.total_grad_norm_max[10] < s.total_grad_norm_max[5] / 100  # the next window is quiet
    at5 = m[(m.step == 5) & (m.kind == "param")].set_index("layer")
    for name in per_layer[0]:
        assert rel(at5.loc[name, "grad_norm_max"], max(n[name] for n in per_layer[1:6])) < 1e-6
        assert rel(at5.loc[name, "grad_norm_min"], min(n[name] for n in per_layer[1:6])) < 1e-6


def test_window_default_is_off_on_the_cpu_and_on_for_a_stop_rule(store):
    """window=None: no per-step norms for CPU parameters (2-5% of a small model's step), unless a
    non-finite rule must see every step."""
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert "total_grad_norm_max" not in _train_without_window_work(model, opt, store).columns
    with gradwatch.watch(model, opt, every=3, store=store, alerts={"nonfinite": "stop"}) as w:
        for x, y in batches(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert w.scalars().set_index("step").window_steps[3] == 3
    with pytest.raises(ConfigError, match="window='yes'"):
        gradwatch.watch(model, store=store, window="yes")


def test_window_off_does_no_work_on_unlogged_steps(store):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert "total_grad_norm_max" not in _train_without_window_work(model, opt, store, window=False).columns


def _train_without_window_work(model, opt, store, **options):
    """4 steps at every=3, asserting that no unlogged step's output gets a hook; the scalars."""
    with gradwatch.watch(model, opt, every=3, store=store, **options) as w:
        for x, y in batches(4):
            opt.zero_grad()
            out = model(x)
            assert out._backward_hooks is None or w.step % 3 == 0  # no hook on unlogged outputs
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
        return w.scalars()


# -- alerts ---------------------------------------------------------------------------


def poison_grad_at(module: nn.Module, when) -> None:
    """Make the gradient reaching ``module``'s output NaN on the steps ``when`` picks."""

    def hook(mod, args, out):
        if when():
            out.register_hook(lambda g: g * math.nan)

    module.register_forward_hook(hook)


@pytest.mark.parametrize("every", [1, 10])
def test_nan_at_layer_k_stops_training_naming_layer_k(store, every):
    torch.manual_seed(0)
    model = mlp(depth=5)  # Linear layers at 0, 2, 4, 6, 8, 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = {"n": 0}
    poison_grad_at(model[4], lambda: step["n"] == 3)
    w = gradwatch.watch(model, opt, every=every, store=store, alerts={"nonfinite": "stop"})
    with pytest.raises(TrainingStopped) as stopped:
        for x, y in batches(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()  # raised here, before the update
            opt.step()
            step["n"] += 1
    assert stopped.value.layer == "4" and stopped.value.step == 3 and stopped.value.kind == "nonfinite"
    assert "layer '4'" in str(stopped.value)
    assert torch.isfinite(model[4].weight).all()  # stopped before the optimizer applied it
    assert not w.attached
    run = store.runs().set_index("id").loc[w.run_id]
    assert run.status == "stopped"
    m = store.metrics(w.run_id)
    assert set(m.step) >= {0, 3}
    w.detach()  # no-op


def test_nan_in_weights_names_that_layer(store):
    torch.manual_seed(0)
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(TrainingStopped) as stopped:
        with gradwatch.watch(model, opt, every=1, store=store, alerts={"nonfinite": "stop"}):
            for n, (x, y) in enumerate(batches(4)):
                if n == 2:
                    with torch.no_grad():
                        model[2].weight[0, 0] = math.nan
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    assert stopped.value.layer == "2" and stopped.value.step == 2


def test_callback_alert_gets_the_alert_and_training_goes_on(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: list[Alert] = []
    step = {"n": 0}
    poison_grad_at(model[2], lambda: step["n"] == 2)
    with gradwatch.watch(model, opt, every=4, store=store, alerts={"nonfinite": seen.append}):
        for x, y in batches(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step["n"] += 1
    assert seen and seen[0].kind == "nonfinite" and seen[0].step == 2 and seen[0].layer == "2"


def test_bad_alert_rules():
    model = mlp(depth=2)
    with pytest.raises(ConfigError, match="unknown kind 'nan'"):
        gradwatch.watch(model, alerts={"nan": "stop"})
    with pytest.raises(ConfigError, match="expected one of warn, stop, ignore"):
        gradwatch.watch(model, alerts={"nonfinite": "explode"})
    with pytest.raises(ConfigError, match="GradScaler"):
        gradwatch.watch(model, scaler=object())


# -- lifecycle --------------------------------------------------------------------------


def test_model_moved_to_another_dtype_keeps_working(store):
    torch.manual_seed(0)
    model = mlp(depth=2)
    with gradwatch.watch(model, every=1, store=store) as w:
        for x, y in batches(2):
            nn.functional.cross_entropy(model(x), y).backward()
        model.double()
        for p in model.parameters():
            p.grad = None
        x, y = batches(1, seed=5)[0]
        nn.functional.cross_entropy(model(x.double()), y).backward()
        norms = layer_norms(model)
        m = w.metrics()
    last = m[m.step == m.step.max()].set_index("layer")
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-6


# -- torch.compile ----------------------------------------------------------------------


def compiled_run(store, backend: str):
    torch.manual_seed(0)
    eager = mlp(depth=3)
    model = mlp(depth=3)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = gradwatch.watch(compiled, opt, every=1, store=store)
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    norms = layer_norms(model)
    w.detach()
    return w, caught, norms


def test_compiled_model_records_parameter_metrics_with_one_warning(store):
    torch._dynamo.reset()
    w, caught, norms = compiled_run(store, "aot_eager")
    mine = [c for c in caught if "compiled" in str(c.message)]
    assert len(mine) == 1 and "delta_rms" in str(mine[0].message)
    assert not torch._dynamo.utils.counters["graph_break"]  # nothing broke the graph
    m = store.metrics(w.run_id)
    last = m[m.step == 2].set_index("layer")
    assert set(last.index) == set(norms)  # names without the _orig_mod prefix
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-6
    assert last.update_ratio.notna().all() and last.delta_rms.isna().all()
    assert store.scalars(w.run_id).total_grad_norm.notna().all()


@pytest.mark.integration
def test_compiled_model_with_inductor(store):
    torch._dynamo.reset()
    w, _, norms = compiled_run(store, "inductor")
    assert not torch._dynamo.utils.counters["graph_break"]
    last = store.metrics(w.run_id)
    last = last[last.step == 2].set_index("layer")
    for name, value in norms.items():
        assert rel(last.loc[name, "grad_norm"], value) < 1e-5
