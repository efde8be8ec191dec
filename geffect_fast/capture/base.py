"""What every layer adapter shares: the tap that hands a layer's output gradient to its adapter.

The tap is an identity autograd function placed on a layer's own output — inside the module's call,
before any forward hook a user registered sees it (``CaptureSession.wrap``). Its forward saves what the
adapter needs later (the layer input, or the token ids) with ``ctx.save_for_backward``; its backward
receives the output gradient g, lets the adapter contract it with the direction (the ops of
:mod:`geffect_fast.ops`, with autocast off, so a pass under ``torch.autocast`` accumulates in the
session's dtype), and passes g on unchanged. Saving through autograd's own mechanism is what makes the
pass correct under gradient checkpointing of both kinds: the non-reentrant kind drops and recomputes saved
tensors (ours included) and the reentrant kind re-runs the forward, wrappers and all, with grad enabled.
Nothing is kept from a forward that ran without grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:  # pragma: no cover
    from .session import CaptureSession


class UnsupportedModuleError(ValueError):
    """A module cannot be handled by the adapter that claimed it, or by any adapter."""


class NotPerSampleError(UnsupportedModuleError):
    """Found during a pass: some covered parameters' per-sample gradients cannot be formed by their taps —
    the parameter is used outside its module's forward, or the module's rows cannot be attributed to samples.
    ``params`` maps each such parameter to the reason; with ``strict=False`` ``measure`` measures them by
    ordinary autograd instead (group ``uncovered``)."""

    def __init__(self, message: str, params: dict[str, str]):
        super().__init__(message)
        self.params = params


@dataclass
class Slot:
    """One parameter of a module whose direction is nonzero: its direction and its group column."""

    name: str  #: canonical parameter name
    v: Tensor  #: [K, *param.shape]; a sharded DTensor under FSDP2 (see CaptureSession.direction)
    group: int


class _TapFn(torch.autograd.Function):
    """Identity on ``y``; on the way back calls ``fn(g, saved)`` and returns g unchanged."""

    @staticmethod
    def forward(ctx, y: Tensor, fn: Callable[[Tensor, Sequence[Tensor]], None], *saved: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*saved)
        # an alias, not a view: the model may modify a layer's output in place (Falcon's `mlp_output +=
        # attention_output`), which autograd forbids on a custom Function's view outputs. The alias shares y's
        # version counter, so an in-place change that plain autograd would refuse is refused here too.
        return y.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        saved = ctx.saved_tensors  # unpack once: non-reentrant checkpointing allows a single unpack
        # the contraction is ours, not the model's: under a user's autocast it must not drop to half precision
        with torch.autocast(g.device.type, enabled=False):
            ctx.fn(g, saved)
        return (g, None) + (None,) * len(saved)


def tap(y: Tensor, fn: Callable[[Tensor, Sequence[Tensor]], None], *saved: Tensor) -> Tensor:
    """Return ``y`` with ``fn(g, saved)`` called on its gradient g during backward.

    With every parameter frozen, a layer whose input carries no gradient would have an output that carries
    none either; such an output becomes a fresh leaf that requires grad (a *root* of the pass), so its
    gradient is still computed.
    """
    if not y.requires_grad:
        y = y.detach().requires_grad_(True)
    return _TapFn.apply(y, fn, *saved)


def first_input(args: tuple, kwargs: dict, name: str) -> Tensor:
    """The module's first positional argument, or the keyword ``name``."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    if kwargs:
        return next(iter(kwargs.values()))
    raise UnsupportedModuleError("module was called without an input tensor")


OutputFn = Callable[[nn.Module, tuple, dict, Any], Any]


class Adapter:
    """The rule for one layer kind: which parameters it covers and how their per-sample dot is computed.

    Subclasses register themselves with :func:`geffect_fast.capture.register` and implement
    :meth:`attach`, which installs the hooks on one module and returns their handles. The session owns the
    handles and removes them when the pass ends, also on error. Tap through ``session.on_output(module, fn)``
    (or ``session.wrap``) rather than ``register_forward_hook``: the session runs ``fn`` on the module's own
    output inside its call, whatever forward hooks users add, and it watches the covered parameters for uses
    outside the module's forward.
    """

    #: local parameter names this adapter covers (e.g. ``("weight", "bias")``)
    param_names: tuple[str, ...] = ("weight", "bias")
    #: whether a subclass that overrides ``forward`` is still covered (true only for adapters that
    #: intercept the functional call inside the forward, as the embedding adapter does)
    covers_subclass_forward: bool = False
    #: whether the adapter hands a slot's per-sample gradient factors to ``session.factor_sink`` when
    #: ``session.wants_factors(slot)`` (factored directions need it; the built-in adapters do)
    gives_factors: bool = False

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this adapter cannot handle ``module`` (None if it can)."""
        return None

    def attach(self, module: nn.Module, slots: dict[str, Slot], session: CaptureSession) -> list[RemovableHandle]:
        raise NotImplementedError
