import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import MixedLayouts, mlp, rel, resnet, train_steps
from torch import nn

import gradwatch
from gradwatch.errors import ConfigError, StoreError, WatchError
from gradwatch.store import RunStore


def hook_count(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for d in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
            m._state_dict_hooks,
            m._load_state_dict_pre_hooks,
        ):
            total += len(d)
    return total


# -- numbers against references ---------------------------------------------------


def test_grad_norms_match_torch(store):
    torch.manual_seed(0)
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, opt, every=1, store=store)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    expected, totals = [], []
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected.append(
            {
                name: torch.linalg.vector_norm(m.weight.grad).item()
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear)
            }
        )
        totals.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        opt.step()
    m = watcher.metrics()
    s = watcher.scalars()
    watcher.detach()
    for step in range(3):
        at = m[(m.step == step) & (m.kind == "param")].set_index("layer")
        for name, ref in expected[step].items():
            assert rel(at.loc[name, "grad_norm"], ref) < 1e-6
        assert rel(s.set_index("step").loc[step, "total_grad_norm"], totals[step]) < 1e-6


def test_norms_of_large_and_small_tensors_keep_their_order(store):
    # on the CPU tensors of >= 65,536 elements are normed by torch.dot, the others by one
    # _foreach_norm, and the order restored: interleave large and small parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 3))
    assert [p.numel() >= 65536 for p in model.parameters()] == [False, False, True, False, False, False]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with gradwatch.watch(model, opt, every=1, store=store, warn=False) as watcher:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: torch.linalg.vector_norm(m.weight.grad.double()).item() for n, m in model.named_children()
                 if isinstance(m, nn.Linear)}
        weights = {n: torch.linalg.vector_norm(m.weight.double()).item() for n, m in model.named_children()
                   if isinstance(m, nn.Linear)}
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        opt.step()
        at = watcher.metrics().set_index("layer")
        total_logged = watcher.scalars().total_grad_norm[0]
    for name in grads:
        assert rel(at.loc[name, "grad_norm"], grads[name]) < 1e-6, name
        assert rel(at.loc[name, "weight_norm"], weights[name]) < 1e-6, name
    assert rel(total_logged, total) < 1e-6


def test_delta_rms_matches_autograd(store):
    torch.manual_seed(1)
    model = mlp(depth=4, activation=nn.Sigmoid)
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    outputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out))
        for n, m in reference.named_modules()
        if isinstance(m, nn.Linear)
    ]
    loss = nn.functional.cross_entropy(reference(x), y)
    names = list(outputs)
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    expected = {n: g.pow(2).mean().sqrt().item() for n, g in zip(names, grads, strict=True)}
    for h in hooks:
        h.remove()

    with gradwatch.watch(model, every=1, store=store) as w:
        nn.functional.cross_entropy(model(x), y).backward()
        at = w.metrics().set_index("layer")
    for n, ref in expected.items():
        assert rel(at.loc[n, "delta_rms"], ref) < 1e-6, n


def test_update_ratio_and_lr(store):
    torch.manual_seed(2)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        expected = (
            torch.linalg.vector_norm(model[0].weight.detach() - before) / torch.linalg.vector_norm(before)
        ).item()
        m, s = w.metrics(), w.scalars()
    assert rel(m.set_index("layer").loc["0", "update_ratio"], expected) < 1e-5
    assert s.loc[0, "lr"] == pytest.approx(0.1)


# -- models people train ------------------------------------------------------------


def test_deep_sigmoid_shows_the_decay(store):
    torch.manual_seed(0)
    model = mlp(depth=20, width=32, activation=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        train_steps(model, opt, w, steps=1)
        m = w.metrics()
    deltas = m[m.kind == "param"].delta_rms.to_numpy()
    assert deltas[0] / deltas[-1] < 1e-8  # twenty factors of at most 0.25 each
    per_layer = np.exp(-np.mean(np.diff(np.log(deltas[:-1]))))  # factor per layer toward the input
    assert per_layer < 1 / 4  # backwards through one sigmoid layer: at most 1/4 per derivative


def test_resnet_with_inplace_relu_matches_out_of_place(tmp_path):
    torch.manual_seed(0)
    inplace = resnet(inplace=True)
    plain = resnet(inplace=False)
    plain.load_state_dict(inplace.state_dict())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    frames = []
    for i, model in enumerate((inplace, plain)):
        with gradwatch.watch(model, every=1, store=tmp_path / f"{i}.db") as w:
            nn.functional.cross_entropy(model(x), y).backward()
            frames.append(w.metrics())
    a, b = frames
    assert list(a.layer) == list(b.layer)
    assert a.delta_rms.notna().sum() == 1 + 4 * 2 + 1  # every conv, bn and the head
    cols = [
        "grad_norm",
        "delta_rms",
        "output_mean",
        "output_std",
        "green_frac",
        "dead_frac",
        "mean_derivative",
    ]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-5, atol=1e-7)


def test_small_bert_from_config(store):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 100, (4, 12))
    labels = torch.randint(0, 3, (4,))
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for _ in range(2):
            opt.zero_grad()
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            grads = {
                n: torch.linalg.vector_norm(m.weight.grad).item()
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear)
            }
            opt.step()
            w.log(loss=out.loss)
        m = w.metrics()
    last = m[m.step == 1].set_index("layer")
    for layer in range(2):
        for part in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            name = f"bert.encoder.layer.{layer}.{part}"
            assert last.loc[name, "delta_rms"] > 0
            assert rel(last.loc[name, "grad_norm"], grads[name]) < 1e-5
    assert last.loc["bert.encoder.layer.0.intermediate.intermediate_act_fn", "kind"] == "activation"


class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.shared = nn.Linear(16, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.shared(h))
        h = self.act(self.shared(h))  # the same module, twice
        return self.out(h)


def test_module_called_twice_pools_both_calls(store):
    torch.manual_seed(0)
    model = SharedTwice()
    reference = copy.deepcopy(model)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    outs = []
    h = reference.shared.register_forward_hook(lambda m, a, o: outs.append(o))
    loss = nn.functional.cross_entropy(reference(x), y)
    g1, g2 = torch.autograd.grad(loss, outs)
    h.remove()
    expected = math.sqrt((g1.pow(2).sum() + g2.pow(2).sum()).item() / (g1.numel() + g2.numel()))
    o = torch.cat([outs[0], outs[1]]).detach()

    with gradwatch.watch(model, every=1, store=store) as w:
        nn.functional.cross_entropy(model(x), y).backward()
        at = w.metrics().set_index("layer")
    assert rel(at.loc["shared", "delta_rms"], expected) < 1e-6
    assert rel(at.loc["shared", "output_mean"], o.mean().item()) < 1e-5
    assert rel(at.loc["shared", "output_std"], o.std(correction=0).item()) < 1e-5


def test_gradient_accumulation_is_one_step(store):
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reference = copy.deepcopy(model)
    xs = [torch.randn(8, 8) for _ in range(4)]
    ys = [torch.randint(0, 3, (8,)) for _ in range(4)]
    # the reference: accumulated gradient and the RMS of the last layer's delta over all micro-batches
    outs = []
    h = reference[-1].register_forward_hook(lambda m, a, o: outs.append(o))
    sq, n = 0.0, 0
    for x, y in zip(xs, ys, strict=True):
        loss = nn.functional.cross_entropy(reference(x), y) / 4
        (g,) = torch.autograd.grad(loss, outs[-1], retain_graph=True)
        sq, n = sq + g.pow(2).sum().item(), n + g.numel()
        loss.backward()
    h.remove()
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        opt.zero_grad()
        for x, y in zip(xs, ys, strict=True):
            loss = nn.functional.cross_entropy(model(x), y) / 4
            loss.backward()
            w.log(loss=loss)
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        opt.step()
        m, s = w.metrics(), w.scalars()
    assert list(s.step) == [0] and list(m.step.unique()) == [0]
    assert rel(s.total_grad_norm[0], total) < 1e-6
    assert (
        rel(
            m.set_index("layer").loc["6", "grad_norm"],
            torch.linalg.vector_norm(reference[-1].weight.grad).item(),
        )
        < 1e-6
    )
    assert rel(m.set_index("layer").loc["6", "delta_rms"], math.sqrt(sq / n)) < 1e-6


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weights_and_frozen_parameters(store):
    torch.manual_seed(0)
    model = Tied()
    model.mid.bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 20, (6, 5))
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids).reshape(-1, 20), ids.reshape(-1)).backward()
        total = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]
        ).item()
        shared = torch.linalg.vector_norm(model.emb.weight.grad).item()
        opt.step()
        m, s = w.metrics().set_index("layer"), w.scalars()
    assert rel(s.total_grad_norm[0], total) < 1e-6  # the tied weight counts once
    assert rel(m.loc["emb", "grad_norm"], shared) < 1e-6 and rel(m.loc["head", "grad_norm"], shared) < 1e-6
    assert rel(m.loc["mid", "grad_norm"], torch.linalg.vector_norm(model.mid.weight.grad).item()) < 1e-6


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)
        self.use_b = False

    def forward(self, x):
        return self.b(x) if self.use_b else self.a(x)


def test_unused_branch_is_missing_not_zero(store):
    model = TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        for step in range(2):
            model.use_b = step == 1
            opt.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
        m = w.metrics()
    step0 = m[m.step == 0].set_index("layer")
    assert "b" not in step0.index or math.isnan(step0.loc["b", "delta_rms"])
    assert step0.loc["a", "grad_norm"] > 0
    step1 = m[m.step == 1].set_index("layer")
    assert "a" not in step1.index  # set_to_none zero_grad: no gradient, no row


def test_eval_and_no_grad_record_nothing(store):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        train_steps(model, opt, w, steps=2)
        model.eval()
        with torch.no_grad():
            model(torch.randn(4, 8))
        model(torch.randn(4, 8))  # eval mode with grad: not a training step either
        model.train()
        train_steps(model, opt, w, steps=1)
        m = w.metrics()
    assert sorted(m.step.unique()) == [0, 1, 2]
    assert w.step == 3


def test_cadence_skips_hook_work(store):
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(len(self._forward_hooks))
            return super().forward(x)

    model = nn.Sequential(Probe(8, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=3, store=store) as w:
        train_steps(model, opt, w, steps=7)
        m, s = w.metrics(), w.scalars()
    assert sorted(m.step.unique()) == [0, 3, 6]
    assert seen == [1, 0, 0, 1, 0, 0, 1]  # per-layer hooks exist on logged steps only
    assert list(s.step) == list(range(7)) and s.loss.notna().all()  # logged values kept every step
    assert s.total_grad_norm.notna().tolist() == [True, False, False, True, False, False, True]


def test_watch_without_optimizer_counts_forwards(store):
    model = mlp(depth=2)
    with gradwatch.watch(model, every=2, store=store) as w:
        for _ in range(4):
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
        m, s = w.metrics(), w.scalars()
    assert sorted(m.step.unique()) == [0, 2]
    assert m.grad_norm.notna().any() and s.total_grad_norm.notna().sum() == 2


# -- detach and lifecycle -----------------------------------------------------------


def test_detach_restores_hooks_and_numbers_are_bit_identical(store):
    torch.manual_seed(0)
    watched = resnet(inplace=True)
    plain = copy.deepcopy(watched)
    before = [
        (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for m in watched.modules()
    ]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (watched, plain)]
    w = gradwatch.watch(watched, opts[0], every=1, store=store)
    assert hook_count(watched) == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        results = []
        for model, opt in zip((watched, plain), opts, strict=True):
            opt.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out, y).backward()
            results.append((out.detach().clone(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
        assert torch.equal(results[0][0], results[1][0])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    w.detach()
    assert hook_count(watched) == 0
    after = [
        (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for m in watched.modules()
    ]
    assert after == before
    assert len(opts[0]._optimizer_step_pre_hooks) == 0 and len(opts[0]._optimizer_step_post_hooks) == 0
    w.detach()  # a second detach is a no-op
    assert store.run(w.run_id)["status"] == "finished"


def test_watch_again_after_detach(store):
    model = mlp(depth=2)
    w1 = gradwatch.watch(model, store=store)
    w1.detach()
    w2 = gradwatch.watch(model, store=store)
    assert w2.run_id != w1.run_id
    w2.detach()


def test_exception_inside_context_marks_run_failed_and_keeps_rows(store):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with gradwatch.watch(model, opt, every=1, store=store) as w:
            train_steps(model, opt, w, steps=3)
            model(torch.randn(2, 8))  # a half-done step
            raise RuntimeError("boom")
    info = store.run(w.run_id)
    assert info["status"] == "failed" and "boom" in info["error"]
    assert sorted(store.metrics(w.run_id).step.unique()) == [0, 1, 2]
    assert hook_count(model) == 0


@pytest.mark.integration
def test_memory_flat_over_5000_steps(store):
    import gc
    import tracemalloc

    model = mlp(depth=3, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with gradwatch.watch(model, opt, every=5, store=store) as w:

        def run(n):
            for _ in range(n):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                w.log(loss=loss)

        run(500)
        w.flush()
        # gc.collect() empties Python's free lists (tuples, lists, floats): bounded caches that
        # tracemalloc counts as allocated, not memory the watcher keeps
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        run(4500)
        w.flush()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert w.step == 5000
    # Python-level allocations still alive after 4,500 more watched steps
    assert grown < 256 * 1024, f"{grown} bytes retained"
    assert store.pending_writes() <= store.max_pending_writes


# -- bad input ------------------------------------------------------------------------


def test_not_a_module():
    with pytest.raises(WatchError, match=r"needs a torch.nn.Module; got function"):
        gradwatch.watch(lambda x: x)


def test_no_parameters(store):
    with pytest.raises(WatchError, match="has no parameters"):
        gradwatch.watch(nn.ReLU(), store=store)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(WatchError, match="no parameter that requires grad"):
        gradwatch.watch(frozen, store=store)


@pytest.mark.parametrize("every", [0, -3, 1.5, True, "10"])
def test_bad_every(every, store):
    with pytest.raises(ConfigError, match="every="):
        gradwatch.watch(mlp(), every=every, store=store)


def test_bad_optimizer(store):
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        gradwatch.watch(mlp(), "adam", store=store)


def test_already_watched(store):
    model = mlp()
    w = gradwatch.watch(model, store=store)
    with pytest.raises(WatchError, match=rf"already watched by run {w.run_id}; call detach\(\)"):
        gradwatch.watch(model, store=store)
    w.detach()


def test_unwritable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the store directory"):
        gradwatch.watch(mlp(), store=blocker / "sub" / "runs.db")


def test_corrupt_store(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a readable gradwatch store"):
        gradwatch.watch(mlp(), store=bad)


def test_nonfinite_gradients_recorded_and_flagged(store):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        with pytest.warns(RuntimeWarning, match="non-finite gradients"):
            for step in range(3):
                opt.zero_grad()
                loss = model(torch.randn(4, 8)).sum()
                if step == 1:
                    loss = loss * float("nan")
                loss.backward()
                opt.step()
                w.log(loss=loss)
            w.flush()
        m, s = w.metrics(), w.scalars().set_index("step")
    assert s.loc[1, "nonfinite_grads"] == 6 and s.loc[0, "nonfinite_grads"] == 0
    assert m[m.step == 1].query("kind == 'param'").nonfinite.all()
    assert math.isnan(s.loc[1, "loss"])
    assert w.step == 3  # training went on


def test_log_rejects_non_scalars(store):
    with gradwatch.watch(mlp(), store=store) as w:
        with pytest.raises(ConfigError, match=r"log\(loss=...\) got a tensor of shape \(3,\)"):
            w.log(loss=torch.ones(3))
        with pytest.raises(ConfigError, match="got str"):
            w.log(loss="high")


def test_no_warning_on_healthy_run(store):
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradwatch.watch(model, opt, every=1, store=store) as w:
            train_steps(model, opt, w, steps=2)


def test_include_and_exclude_pick_layers(store):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store, include=nn.Linear, exclude=["6"]) as w:
        train_steps(model, opt, w, steps=1)
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        m, s = w.metrics(), w.scalars()
    assert sorted(m.layer.unique()) == ["0", "2", "4"]
    assert rel(s.total_grad_norm[0], total) < 1e-6  # still the whole model's norm
    with pytest.raises(ConfigError, match=r"include='encoder\.\*' matches no module"):
        gradwatch.watch(model, include="encoder.*", store=store)
    with pytest.raises(ConfigError, match="module-name patterns"):
        gradwatch.watch(model, exclude=[3], store=store)


def test_relu_saturation_is_missing_not_nonfinite(store):
    model = mlp(depth=2, activation=nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, every=1, store=store) as w:
        train_steps(model, opt, w, steps=1)
        m = w.metrics()
    acts = m[m.kind == "activation"]
    assert len(acts) == 2 and acts.saturated_frac.isna().all() and not acts.nonfinite.any()


def test_live_warning_once_per_kind(store):
    from gradwatch.errors import GradientWarning

    torch.manual_seed(0)
    model = mlp(depth=15, width=16, activation=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, opt, every=1, store=store) as w:
            train_steps(model, opt, w, steps=4)
    ours = [c for c in caught if issubclass(c.category, GradientWarning)]
    assert len(ours) == 1
    assert "vanishing gradients" in str(ours[0].message) and f"gradwatch show {w.run_id}" in str(
        ours[0].message
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradwatch.watch(
            mlp(depth=15, width=16, activation=nn.Sigmoid), every=1, store=store, warn=False
        ) as w2:
            train_steps(w2.model, torch.optim.SGD(w2.model.parameters(), lr=0.1), None, steps=1)


def test_weight_samples_follow_the_same_elements(store):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradwatch.watch(model, opt, every=1, store=store, weight_samples=5) as w:
        for _ in range(3):
            seen.append(model[2].weight.detach().clone().reshape(-1))
            train_steps(model, opt, w, steps=1)
        run = w.run_id
    ws = store.weight_samples(run)
    layer = ws[ws.layer == "2"]
    assert (
        sorted(layer["index"].unique()) == sorted(layer["index"].unique()[:5])
        and layer["index"].nunique() == 5
    )
    for step in range(3):
        at = layer[layer.step == step]
        expected = seen[step][torch.tensor(at["index"].to_numpy())]
        np.testing.assert_allclose(at.value.to_numpy(), expected.numpy(), rtol=1e-6)
    assert gradwatch.watch(mlp(), store=store, weight_samples=0).detach() is None
    with pytest.raises(ConfigError, match="weight_samples=-1"):
        gradwatch.watch(mlp(), store=store, weight_samples=-1)


_SHARDED_AND_NOT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradwatch

tmp = Path(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
for sharded in (False, True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10))  # 10,000 > 4096
    if sharded:  # FSDP2: every parameter a DTensor, so the watcher samples weight by weight
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(model)
    assert (type(next(model.parameters())).__name__ == "DTensor") == sharded
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    x, y = torch.randn(32, 100), torch.randint(0, 10, (32,))
    with gradwatch.watch(model, opt, every=1, store=tmp / f"{int(sharded)}.db", warn=False):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
dist.destroy_process_group()
"""


def test_the_sampled_weight_path_reads_what_the_one_buffer_path_reads(tmp_path):
    """Sharded (DTensor) weights take per-weight samples, not one shared buffer: the same
    block elements, so update ratios and tracked weights equal the one-buffer path's."""
    import subprocess
    import sys

    script = tmp_path / "sampled.py"
    script.write_text(_SHARDED_AND_NOT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for name in ("0.db", "1.db"):
        with RunStore(tmp_path / name, create=False) as st:
            results.append((st.metrics(1), st.weight_samples(1)))
    (m1, s1), (m2, s2) = results
    assert m1["update_ratio"].notna().sum() == 6
    np.testing.assert_allclose(m2["update_ratio"], m1["update_ratio"], rtol=1e-6)
    assert s2["index"].tolist() == s1["index"].tolist() and len(s1) == 3 * 2 * 8
    np.testing.assert_allclose(s2["value"], s1["value"], rtol=0, atol=0)


def test_output_moments_and_deltas_exact_on_every_layout(store):
    torch.manual_seed(0)
    model = MixedLayouts()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    outs = {}
    handles = [
        getattr(reference, n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
        for n in "atd"
    ]
    loss = nn.functional.cross_entropy(reference(x), y)
    grads = dict(zip("atd", torch.autograd.grad(loss, [outs[n] for n in "atd"]), strict=True))
    for h in handles:
        h.remove()
    assert not outs["t"].is_contiguous() and outs["d"].dtype == torch.float64

    with gradwatch.watch(model, every=1, store=store, warn=False) as w:
        nn.functional.cross_entropy(model(x), y).backward()
        at = w.metrics().set_index("layer")
    for n in "atd":
        o, g = outs[n].detach().double(), grads[n].double()
        assert rel(at.loc[n, "output_mean"], o.mean().item()) < 1e-5, n
        assert rel(at.loc[n, "output_std"], o.std(correction=0).item()) < 1e-5, n
        assert rel(at.loc[n, "delta_rms"], g.pow(2).mean().sqrt().item()) < 1e-5, n
        weight_grad = getattr(model, n).weight.grad
        assert rel(at.loc[n, "grad_norm"], torch.linalg.vector_norm(weight_grad.double()).item()) < 1e-6, n
