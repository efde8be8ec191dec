"""A ``transformers.TrainerCallback`` that tracks G-effects during ``Trainer.train()`` — also for
open-unlearning-style trainers, which subclass ``Trainer``.

    cb = GEffectCallback(probes={"unlearn": forget_batch, "retain": retain_batch}, every=10,
                         direction="update", log="out/geffects.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.attach(trainer)          # optional: also log through trainer.log (TensorBoard, W&B, ...)
    trainer.train()

It measures in ``on_pre_optimizer_step`` / ``on_optimizer_step``, so it sees the gradient once per optimiser
step — after gradient accumulation and after the Trainer's gradient clipping — and the update the optimiser
really made. DDP-wrapped models are unwrapped (parameter names without ``module.``). Scalars go to
``trainer.log`` as ``geffect/<objective>/<risk>/total`` and ``.../cumulative`` (plus ``.../measured_dR``
and ``.../predicted_dR`` for the direction taken).
"""

from __future__ import annotations

from typing import Any, Mapping

from transformers import TrainerCallback

from .tracker import Tracker


class GEffectCallback(TrainerCallback):
    def __init__(self, probes: Mapping[str, Any], **tracker_kwargs: Any):
        self.probes = probes
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self.trainer = None

    def attach(self, trainer) -> GEffectCallback:
        """Register with ``trainer`` (if not yet) and log through ``trainer.log``."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _tracker(self, model) -> Tracker:
        if self.tracker is None:
            self.tracker = Tracker(model, self.probes, **self.tracker_kwargs)
        return self.tracker

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._tracker(model).begin(optimizer, loss=None)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        records = self._tracker(model).end()
        if records and self.trainer is not None:
            logs: dict[str, float] = {}
            for r in records:
                key = f"geffect/{r['objective']}/{r['risk']}"
                logs[f"{key}/total"] = r["total"]
                logs[f"{key}/cumulative"] = r["cumulative"]
                if r["measured_dR"] is not None:
                    logs[f"{key}/measured_dR"] = r["measured_dR"]
                    logs[f"{key}/predicted_dR"] = r["predicted_dR"]
            self.trainer.log(logs)
