"""The TrainerCallback in a real transformers.Trainer run: gradient accumulation, clipping, trainer.log."""

import json

import torch
from helpers import Rows, make_batch, make_model
from transformers import Trainer, TrainingArguments

from geffect_fast.hf import GEffectCallback


def test_callback_in_trainer(tmp_path):
    model = make_model("llama", dtype=torch.float32)
    train = make_batch(model, B=8, seed=3)
    probes = {"unlearn": make_batch(model, seed=1), "retain": make_batch(model, seed=2)}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    cb = GEffectCallback(probes, direction="update", log=tmp_path / "g.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=Rows(train), callbacks=[cb])
    cb.attach(trainer)
    trainer.train()
    recs = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in recs}) == [1, 2, 3]  # once per optimiser step, not per micro-batch
    assert {r["risk"] for r in recs} == {"unlearn", "retain"}
    assert all(r["measured_dR"] is not None for r in recs)
    logged = [h for h in trainer.state.log_history if "geffect/update/unlearn/total" in h]
    assert len(logged) == 3
    assert logged[-1]["geffect/update/unlearn/cumulative"] == sum(r["total"] for r in recs if r["risk"] == "unlearn")
