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

``GuideCallback`` runs a :class:`~geffect_fast.guide.Guide` the same way, once per optimiser step:

    cb = GuideCallback(probes, policies=("stop", "layers"), log="out/guide.jsonl")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])

In ``on_pre_optimizer_step`` (after accumulation and clipping) it measures the accumulated gradient and scales
the chosen groups' ``.grad``; ``Trainer`` then calls ``optimizer.step()`` itself, so when the stop rule fires
the step cannot be skipped: the callback copies the trainable parameters there and puts them back in
``on_optimizer_step`` (the optimiser's state has still seen that gradient), and sets
``control.should_training_stop``. The ``samples`` policy needs the loss: call ``cb.guide.weighted(objective,
batch, ref)`` from your Trainer's ``compute_loss`` (the callback makes the guide at the first optimiser step,
or ``cb.setup(model)`` earlier).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from transformers import TrainerCallback

from .guide import Guide
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


class GuideCallback(TrainerCallback):
    def __init__(self, probes: Mapping[str, Any], **guide_kwargs: Any):
        self.probes = probes
        self.guide_kwargs = guide_kwargs
        self.guide: Guide | None = None
        self._restore: dict[str, Any] | None = None

    def setup(self, model) -> Guide:
        """The guide of ``model`` (made on first use)."""
        if self.guide is None:
            self.guide = Guide(model, self.probes, **self.guide_kwargs)
        return self.guide

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.setup(model).begin(optimizer):  # stop: the Trainer steps anyway, so undo it afterwards
            self._restore = {n: p.detach().clone() for n, p in self.guide.model.named_parameters() if p.requires_grad}

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        guide = self.setup(model)
        if self._restore is not None:
            with torch.no_grad():
                for n, p in guide.model.named_parameters():
                    if n in self._restore:
                        p.copy_(self._restore[n])
            self._restore = None
            control.should_training_stop = True
        guide.end()
