"""The measuring pass's hook owner: installs the adapters' hooks, accumulates their contributions, and
removes every hook when the pass ends (also on error)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..distributed import gather_async, is_dtensor
from ..ops.dispatch import Backend
from .base import Adapter, Slot, UnsupportedModuleError


@dataclass
class ModulePlan:
    """One module to tap: its adapter and the slots (parameters with a nonzero direction) it fills."""

    name: str
    module: nn.Module
    adapter: Adapter
    slots: dict[str, Slot] = field(default_factory=dict)


def _root_hook(module: nn.Module, args: tuple, output):
    """Make an embedding's output a leaf that requires grad, so gradients flow with frozen parameters."""
    if (
        torch.is_grad_enabled()
        and isinstance(output, Tensor)
        and output.is_floating_point()
        and not output.requires_grad
    ):
        return output.detach().requires_grad_(True)
    return None


class CaptureSession:
    """Accumulates ``out[k, b, group] += Σ_{t∈b} (contribution of token t)`` from every tapped layer.

    Backpropagating a weighted sum L = Σ_b s_b ℓ_b makes each tap's gradient rows belong to one sample
    each (samples are independent in the batch), so ``out[:, b]`` ends as s_b·⟨∇ℓ_b, v⟩ per group.
    """

    def __init__(self, plans: list[ModulePlan], roots: list[nn.Module], ops: Backend, K: int, G: int, acc: torch.dtype):
        self.plans = plans
        self.roots = roots
        self.ops = ops
        self.K = K
        self.G = G
        self.acc = acc
        self.B = 0
        self.out: Tensor | None = None
        self._seg: dict[tuple[int, torch.device], Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._names = {id(p.module): p.name for p in plans}
        #: when set, adapters hand over the factors of each per-sample gradient, G_b = Σ_{t∈b} L_t R_tᵀ, as
        #: ``factor_sink(slot, L, R, seg, pad)`` instead of contracting them with the direction (pairwise, sketches)
        self.factor_sink = None
        # FSDP2: modules whose direction is sharded, in module (≈ forward) order, for gathering ahead
        self._sharded = [p for p in plans if any(is_dtensor(s.v) for s in p.slots.values())]
        self._index = {id(s): j for j, p in enumerate(self._sharded) for s in p.slots.values()}
        self._inflight: dict[int, Tensor] = {}
        self._done: set[int] = set()

    # -- lifetime --------------------------------------------------------------------------------------
    def __enter__(self) -> CaptureSession:
        try:
            for plan in self.plans:
                self._handles.extend(plan.adapter.attach(plan.module, plan.slots, self))
            for m in self.roots:
                self._handles.append(m.register_forward_hook(_root_hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start(self, B: int, device: torch.device) -> None:
        """Begin one risk batch of B samples."""
        self.B = B
        self.out = torch.zeros(self.K, B, self.G, dtype=self.acc, device=device)
        self._seg.clear()
        self._inflight.clear()
        self._done.clear()

    # -- used by adapters ------------------------------------------------------------------------------
    def module_name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def rows(self, x: Tensor, features: int, module: nn.Module) -> Tensor:
        """Sample id of each row of ``x`` viewed as [rows, features].

        Activations are laid out batch-major: [B, ...] (or [B·T, f] when flattened). Anything else cannot be
        attributed to samples and is an error naming the module.
        """
        B = self.B
        rows = x.numel() // features if features else 0
        ok = (x.dim() >= 3 and x.shape[0] == B) or (x.dim() == 2 and rows % B == 0) or (x.dim() == 1 and B == 1)
        if not ok or x.shape[-1] != features:
            raise UnsupportedModuleError(
                f"module {self.module_name(module)!r} ({type(module).__name__}) saw an activation of shape "
                f"{tuple(x.shape)} that cannot be split into the batch's {B} samples (batch dim first expected)"
            )
        key = (rows, x.device)
        seg = self._seg.get(key)
        if seg is None:
            seg = torch.arange(B, device=x.device).repeat_interleave(rows // B)
            self._seg[key] = seg
        return seg

    def direction(self, slot: Slot) -> Tensor:
        """The slot's direction [K, *shape], whole.

        A sharded one (FSDP2) is all-gathered — a collective, so adapters call this only inside the backward,
        where every rank reaches the same layer in the same order — and, as FSDP does for parameters, the
        gathers of the module's other slots and of the module before it (next in the backward) are started
        ahead, asynchronously. At most two modules' directions are alive; the caller frees what it gets.
        """
        if not is_dtensor(slot.v):
            return slot.v
        j = self._index[id(slot)]
        self._start(j)
        if j > 0:
            self._start(j - 1)
        t = self._inflight.pop(id(slot), None)
        if t is None:  # used again in this backward (a module called twice): gather once more
            t = gather_async(slot.v)
        self._done.add(id(slot))
        return t.wait() if hasattr(t, "wait") else t

    def _start(self, j: int) -> None:
        for s in self._sharded[j].slots.values():
            k = id(s)
            if is_dtensor(s.v) and k not in self._inflight and k not in self._done:
                self._inflight[k] = gather_async(s.v)

    def add(self, slot: Slot | None, contrib: Tensor | None) -> None:
        """Add a [K, B] contribution to ``slot``'s group column."""
        if slot is None or contrib is None:
            return
        self.out[:, :, slot.group] += contrib.to(self.acc)


__all__ = ["CaptureSession", "ModulePlan", "UnsupportedModuleError"]
