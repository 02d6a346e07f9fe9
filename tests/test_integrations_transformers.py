"""Hugging Face: a real Trainer.train of a tiny BERT built from a config (no download)."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch import RunStore  # noqa: E402
from gradwatch.errors import WatchError  # noqa: E402
from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

LAYERS = 3
STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def _bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                                     num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**base, **kw})


def test_train_records_deltas_of_every_encoder_layer(tmp_path):
    callback = GradwatchCallback(every=1, store=tmp_path / "runs.db", run_name="bert")
    trainer = transformers.Trainer(model=_bert(), args=_args(tmp_path, gradient_accumulation_steps=2),
                                   train_dataset=Tokens(), callbacks=[callback])
    trainer.train()

    with RunStore(tmp_path / "runs.db") as store:
        run = store.run("bert")
        assert run["status"] == "finished"
        assert run["config"]["model_config"]["num_hidden_layers"] == LAYERS
        metrics = store.metrics("bert")
        # optimizer steps, not micro-batches: 4 steps of 2 accumulated batches each
        assert sorted(metrics["step"].unique()) == list(range(STEPS))
        for i in range(LAYERS):
            layer = metrics[metrics["layer"].str.startswith(f"bert.encoder.layer.{i}.")
                            & (metrics["kind"] == "param")]
            names = {name.split(f"layer.{i}.", 1)[1] for name in layer["layer"]}
            assert {"attention.self.query", "attention.output.dense", "intermediate.dense",
                    "output.dense"} <= names
            for step in range(STEPS):
                deltas = layer[layer["step"] == step]["delta_rms"]
                assert len(deltas) >= 6 and deltas.map(lambda v: math.isfinite(v) and v > 0).all(), (i, step)
        scalars = store.scalars("bert")
        assert list(scalars["step"]) == list(range(STEPS))
        assert scalars["loss"].notna().all() and scalars["preclip_grad_norm"].notna().all()
        # lr: linear decay from 1e-3, the value each step used
        assert list(scalars["lr"]) == pytest.approx([1e-3 * (1 - s / STEPS) for s in range(STEPS)])
        assert (scalars["total_grad_norm"] <= 1.0 + 1e-5).all()  # the Trainer clips before the step
        assert not store.findings("bert").empty
    assert not callback.watcher.attached


def test_model_without_parameters_is_a_clear_error(tmp_path):
    class Empty(torch.nn.Module):
        def forward(self, input_ids=None, labels=None, **kw):
            return {"loss": torch.zeros((), requires_grad=True)}

    with pytest.raises(WatchError, match="Empty given to the Trainer has no parameters"):
        transformers.Trainer(model=Empty(), args=_args(tmp_path), train_dataset=Tokens(),
                             callbacks=[GradwatchCallback(store=tmp_path / "runs.db")])
