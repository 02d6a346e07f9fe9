"""Lightning: a real Trainer.fit records what Lightning's own grad_norm utility measures."""

import importlib
import math

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradwatch import RunStore  # noqa: E402
from gradwatch.errors import WatchError  # noqa: E402
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

STEPS = 6


def _module_class(namespace):
    """A small classifier whose training_step calls its submodule (``self.net``) or ``self``."""

    class Classifier(namespace.LightningModule):
        def __init__(self, call_self: bool = False):
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                     nn.Linear(16, 3))
            self.call_self = call_self
            self.norms = {}  # global_step -> Lightning's grad_norm
            self.losses = {}

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x) if self.call_self else self.net(x)
            loss = nn.functional.cross_entropy(logits, y)
            self.losses[self.global_step] = loss.item()
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.norms[self.global_step] = {k: float(v) for k, v in
                                            namespace.utilities.grad_norm(self, norm_type=2).items()}

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Classifier


def _loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(namespace, tmp_path, callback, steps=STEPS):
    return namespace.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)


@pytest.mark.parametrize(
    ("namespace", "call_self"),
    [pytest.param("lightning.pytorch", False, id="lightning-submodule"),
     pytest.param("lightning.pytorch", True, id="lightning-self"),
     pytest.param("pytorch_lightning", False, id="pytorch_lightning")],
)
def test_fit_records_lightning_grad_norms(tmp_path, namespace, call_self):
    ns = pytest.importorskip(namespace)
    model = _module_class(ns)(call_self=call_self)
    callback = GradwatchCallback(every=1, store=tmp_path / "runs.db", run_name="fit")
    _trainer(ns, tmp_path, callback).fit(model, _loader())

    with RunStore(tmp_path / "runs.db") as store:
        run = store.run("fit")
        assert run["status"] == "finished" and run["config"]["hparams"] == {"call_self": call_self}
        metrics = store.metrics("fit")
        params = metrics[metrics["kind"] == "param"]
        assert sorted(params["step"].unique()) == list(range(STEPS))
        assert set(params["layer"]) == {"net.0", "net.2", "net.4"}
        for row in params.itertuples():
            expected = model.norms[row.step][f"grad_2.0_norm/{row.layer}.weight"]
            assert row.grad_norm == pytest.approx(expected, rel=1e-5, abs=1e-7), (row.step, row.layer)
            # the update ratio spans this step's update: the closure ran before the watcher's hook
            assert row.update_ratio > 0 and math.isfinite(row.delta_rms) and row.delta_rms > 0
        scalars = store.scalars("fit")
        for step in range(STEPS):
            total = model.norms[step]["grad_2.0_norm_total"]
            assert scalars.loc[step, "total_grad_norm"] == pytest.approx(total, rel=1e-5)
            assert scalars.loc[step, "loss"] == pytest.approx(model.losses[step], rel=1e-6)
        assert list(scalars["lr"]) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
        assert not store.findings("fit").empty  # diagnosed at the end of fit
    # nothing left behind on the model or the optimizer
    assert "training_step" not in model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert callback.watcher is not None and not callback.watcher.attached


def test_module_without_parameters_is_a_clear_error(tmp_path):
    class Empty(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    callback = GradwatchCallback(store=tmp_path / "runs.db")
    with pytest.raises(WatchError, match="Empty given to the Trainer has no parameters"):
        _trainer(pl, tmp_path, callback).fit(Empty(), _loader())


def test_exception_marks_the_run_failed(tmp_path):
    class Failing(_module_class(pl)):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(pl, tmp_path, GradwatchCallback(every=1, store=tmp_path / "runs.db", run_name="bad")).fit(
            model, _loader())
    with RunStore(tmp_path / "runs.db") as store:
        run = store.run("bad")
        assert run["status"] == "failed" and "boom" in run["error"]
        assert sorted(store.metrics("bad")["step"].unique()) == [0, 1]
    assert "training_step" not in model.__dict__ and not model._forward_pre_hooks


def test_the_module_imports_without_lightning_only_with_a_clear_error(monkeypatch):
    import sys

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[lightning\]'"):
        importlib.import_module("gradwatch.integrations.lightning")
