"""The measuring pass's hook owner: installs the adapters' taps, accumulates their contributions, and
removes every tap when the pass ends (also on error, ``KeyboardInterrupt`` included).

Three guards make a wrong number impossible where the taps alone could not see the whole gradient:

* **Own output.** A tap wraps the module's ``forward`` (:meth:`CaptureSession.wrap`), so it sees what the
  module itself returned, before any forward hook — registered before or during the pass, prepended or
  not — transforms it; the gradient the tap receives is then exactly ∂L/∂(module output).
* **Outside uses.** Inside its module's forward a covered parameter is swapped for a detached alias, and the
  parameter itself requires grad for the pass: a use anywhere else (``F.linear(x, self.dense.weight)`` in
  a parent, as Bloom's ``slow_but_exact`` path does) then leaves a gradient in ``.grad``, which
  :meth:`CaptureSession.check_outside_uses` reports after the backward. Cost: two dict writes per module call and
  one look at each covered parameter's ``.grad`` per pass; no work at all when nothing is misused.
* **Row layout.** A module's rows are attributed to samples only where the layout is known (batch first,
  or the batch's B·T tokens flattened in order); rows gathered by index (MoE experts run on ``x[idx]``)
  are an error naming the module.

One pass at a time per module: a session on modules another open session holds (a nested call, or another
thread that bypassed :func:`geffect_fast.state.preserved`'s per-model lock) raises instead of mixing hooks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..distributed import gather_async, is_dtensor
from ..ops.dispatch import Backend
from .base import Adapter, NotPerSampleError, OutputFn, Slot, UnsupportedModuleError

#: grad_fn names of ops that gather rows by index: their output rows are not the batch's rows in order
_GATHERING = frozenset({"IndexBackward0", "IndexSelectBackward0", "GatherBackward0", "TakeBackward0"})

_ACTIVE: dict[int, str] = {}  #: id(module) -> the thread whose open session taps it
_ACTIVE_LOCK = threading.Lock()


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


class _Unwrap:
    """Handle of :meth:`CaptureSession.wrap`: puts the module's own ``forward`` back."""

    def __init__(self, module: nn.Module, wrapper: Callable, own: Callable | None):
        self.module, self.wrapper, self.own = module, wrapper, own

    def remove(self) -> None:
        m = self.module
        if m.__dict__.get("forward") is not self.wrapper:
            return  # someone wrapped it after us: leave theirs; ours passes through once the session is closed
        if self.own is None:
            del m.forward
        else:
            m.forward = self.own


class CaptureSession:
    """Accumulates ``out[k, b, group] += Σ_{t∈b} (contribution of token t)`` from every tapped layer.

    Backpropagating a weighted sum L = Σ_b s_b ℓ_b makes each tap's gradient rows belong to one sample
    each (samples are independent in the batch), so ``out[:, b]`` ends as s_b·⟨∇ℓ_b, v⟩ per group.
    ``guard`` watches the covered parameters for uses outside their modules (see the module docstring); it is
    off where parameters are sharded (FSDP2 swaps them itself).
    """

    def __init__(
        self,
        plans: list[ModulePlan],
        roots: list[nn.Module],
        ops: Backend,
        K: int,
        G: int,
        acc: torch.dtype,
        guard: bool = True,
    ):
        self.plans = plans
        self.roots = roots
        self.ops = ops
        self.K = K
        self.G = G
        self.acc = acc
        self.B = 0
        self.T: int | None = None
        self.out: Tensor | None = None
        self._pending: list[tuple[int, Tensor]] = []  # (group column, [K, B] contribution), summed by result()
        self._handles: list[RemovableHandle | _Unwrap] = []
        self._names = {id(p.module): p.name for p in plans}
        self._slots = {id(p.module): p.slots for p in plans}
        self._closed = True
        self._claimed: list[int] = []
        #: when set, adapters hand over the factors of each per-sample gradient, G_b = Σ_{t∈b} L_t R_tᵀ, as
        #: ``factor_sink(slot, L, R, seg, pad)`` instead of contracting them with the direction (pairwise, sketches,
        #: factored directions) — for every slot, or only for the slots whose parameter ``factor_slots`` names
        self.factor_sink = None
        self.factor_slots: frozenset[str] | None = None
        #: one pooled batch (:meth:`start_pooled`): rows are not attributed to samples (all are sample 0)
        self.pooled = False
        # FSDP2: modules whose direction is sharded, in module (≈ forward) order, for gathering ahead
        self._sharded = [p for p in plans if any(is_dtensor(s.v) for s in p.slots.values())]
        self._index = {id(s): j for j, p in enumerate(self._sharded) for s in p.slots.values()}
        self._inflight: dict[int, Tensor] = {}
        self._done: set[int] = set()
        # the outside-use guard: per module, (local name, detached alias, parameter); and what each watches
        self._swaps: dict[int, list[tuple[str, Tensor, nn.Parameter]]] = {}
        self._watched: dict[int, tuple[nn.Parameter, str, str]] = {}  # id(p) -> (p, canonical name, module)
        self._flags: list[tuple[nn.Parameter, bool]] = []
        if guard:
            for plan in plans:
                for local, slot in plan.slots.items():
                    p = plan.module._parameters.get(local)
                    if p is None or is_dtensor(p) or is_dtensor(slot.v):
                        continue
                    self._swaps.setdefault(id(plan.module), []).append((local, p.detach(), p))
                    self._watched.setdefault(id(p), (p, slot.name, plan.name))

    # -- lifetime --------------------------------------------------------------------------------------
    def __enter__(self) -> CaptureSession:
        self._claim()
        try:
            self._closed = False
            for plan in self.plans:
                self._handles.extend(plan.adapter.attach(plan.module, plan.slots, self))
            for m in self.roots:
                self._handles.append(m.register_forward_hook(_root_hook))
            for p, _, _ in self._watched.values():
                self._flags.append((p, p.requires_grad))
                p.requires_grad_(True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, f in self._flags:
            p.grad = None
            p.requires_grad_(f)
        self._flags.clear()
        with _ACTIVE_LOCK:
            for k in self._claimed:
                _ACTIVE.pop(k, None)
        self._claimed.clear()

    def _claim(self) -> None:
        """Mark this session's modules as tapped; raise if another open session taps any of them."""
        mods = [p.module for p in self.plans] + list(self.roots)
        me = threading.current_thread().name
        with _ACTIVE_LOCK:
            busy = [m for m in mods if id(m) in _ACTIVE]
            if busy:
                who = _ACTIVE[id(busy[0])]
                where = "this thread (a nested call)" if who == me else f"thread {who!r}"
                raise RuntimeError(
                    f"another G-effect pass ({where}) is running on this model (e.g. "
                    f"{self.module_name(busy[0])!r}); its hooks would fire in this one and mix both results. "
                    "Measure one model from one pass at a time (measure() waits for another thread's pass on the "
                    "same model), or give each thread its own copy of the model"
                )
            for m in mods:
                _ACTIVE[id(m)] = me
            self._claimed = [id(m) for m in mods]

    def start(self, B: int, device: torch.device, T: int | None = None) -> None:
        """Begin one risk batch of B samples of T positions (T known: flattened [B·T, ...] rows are allowed)."""
        self.B = B
        self.T = T
        self.pooled = False
        self.out = torch.zeros(self.K, B, self.G, dtype=self.acc, device=device)
        self._pending.clear()
        self._inflight.clear()
        self._done.clear()

    def start_pooled(self, device: torch.device) -> None:
        """Begin a pass whose rows all count as one sample, whatever the batches' shapes (an objective that runs
        the model on several batches: its gradient's factors are wanted, not per-sample values)."""
        self.start(1, device)
        self.pooled = True

    # -- used by adapters ------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, around: Callable[[Callable, tuple, dict], Any]) -> _Unwrap:
        """Run ``around(forward, args, kwargs)`` in place of ``module``'s forward while the session is open
        and grad is enabled; returns the handle that undoes it.

        Inside the call the module's covered parameters are detached aliases (the outside-use guard). Forward
        hooks run after ``forward`` returns, so ``around`` sees the module's own output whatever they do.
        """
        inner = module.forward
        own = module.__dict__.get("forward")
        swap = self._swaps.get(id(module))
        session = self

        def forward(*args, **kwargs):
            if session._closed or not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            if swap is None:
                return around(inner, args, kwargs)
            params = module._parameters
            for local, alias, _ in swap:
                params[local] = alias
            try:
                return around(inner, args, kwargs)
            finally:
                for local, _, p in swap:
                    params[local] = p

        module.forward = forward
        return _Unwrap(module, forward, own)

    def on_output(self, module: nn.Module, fn: OutputFn) -> _Unwrap:
        """Call ``fn(module, args, kwargs, out)`` on the module's own output; a non-None result replaces it."""

        def around(inner, args, kwargs):
            out = inner(*args, **kwargs)
            new = fn(module, args, kwargs, out)
            return out if new is None else new

        return self.wrap(module, around)

    def wants_factors(self, slot: Slot) -> bool:
        """Whether an adapter hands ``slot``'s factors to :attr:`factor_sink` (else it contracts them itself)."""
        return self.factor_sink is not None and (self.factor_slots is None or slot.name in self.factor_slots)

    def module_name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def check_rows(self, a: Tensor, module: nn.Module) -> None:
        """At forward time: refuse an input whose rows were gathered by index (routed tokens)."""
        fn = a.grad_fn
        if a.dim() == 2 and self.B > 1 and fn is not None and type(fn).__name__ in _GATHERING:
            self._unattributable(
                module, a, "its rows were gathered by index (routed tokens, e.g. an MoE expert run on x[idx])"
            )

    def rows(self, x: Tensor, features: int, module: nn.Module) -> int | Tensor:
        """Which sample each row of ``x`` viewed as [rows, features] belongs to, as the ops take it: an int T
        (uniform segments: sample b owns rows [b·T, (b+1)·T)), which every known layout is.

        Known layouts only: batch first ([B, ...]), the batch's B·T tokens flattened in order ([B·T, f]), or
        any rows when B = 1. Anything else (e.g. the tokens an MoE router sent to one expert) cannot be
        attributed to samples and is an error naming the module.
        """
        B = self.B
        rows = x.numel() // features if features else 0
        if x.shape[-1] != features:
            ok = False
        elif self.pooled:
            ok = True
        elif x.dim() >= 3:
            ok = x.shape[0] == B
        elif x.dim() == 2:
            ok = B == 1 or (self.T is not None and rows == B * self.T)
        else:
            ok = x.dim() == 1 and B == 1
        if not ok:
            self._unattributable(
                module, x, f"its rows are neither batch first nor the batch's {B}×{self.T} tokens in order"
            )
        if rows == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return rows // B

    def _unattributable(self, module: nn.Module, x: Tensor, why: str) -> None:
        name = self.module_name(module)
        reason = (
            f"module {name!r} ({type(module).__name__}) saw an activation of shape {tuple(x.shape)} that cannot be "
            f"split into the batch's {self.B} samples: {why}"
        )
        params = {s.name: reason for s in self._slots.get(id(module), {}).values()}
        raise NotPerSampleError(
            reason + ". Register an adapter that knows the layout, give these parameters a zero direction, or "
            "(measure) pass strict=False to measure them by ordinary autograd (aggregate only)",
            params,
        )

    def check_outside_uses(self) -> None:
        """After a backward: raise :class:`NotPerSampleError` naming the covered parameters that received a
        gradient from a use outside their module's forward (their ``.grad`` is cleared first)."""
        found: dict[str, str] = {}
        for p, pname, mname in self._watched.values():
            if p.grad is not None:
                p.grad = None
                found[pname] = (
                    f"{pname!r} is used outside the forward of its module {mname!r} (e.g. F.linear(x, "
                    "module.weight) in a parent's forward, as Bloom's slow_but_exact path does), so its taps see "
                    "only part of its gradient"
                )
        if found:
            raise NotPerSampleError(
                "the taps of these parameters do not see their whole gradient: "
                + "; ".join(found.values())
                + ". Call the module instead of using its parameter directly, leave the parameter out of the "
                "direction, or (measure) pass strict=False to measure it by ordinary autograd (group 'uncovered', "
                "aggregate only)",
                found,
            )

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
        """Add a [K, B] contribution to ``slot``'s group column (kept until :meth:`result` sums them all)."""
        if slot is None or contrib is None:
            return
        self._pending.append((slot.group, contrib))

    def result(self) -> Tensor:
        """``out`` [K, B, G] with every contribution of this batch added: one product with the one-hot group
        matrix instead of one indexed add per tap (deterministic on every device)."""
        if self._pending:
            K, B, G = self.out.shape
            vals = torch.stack([c.to(self.acc) for _, c in self._pending], dim=-1).reshape(K * B, -1)
            cols = torch.tensor([g for g, _ in self._pending], device=self.out.device)
            onehot = torch.nn.functional.one_hot(cols, G).to(self.acc)
            self.out += (vals @ onehot).reshape(K, B, G)
            self._pending.clear()
        return self.out


__all__ = ["CaptureSession", "ModulePlan", "NotPerSampleError", "UnsupportedModuleError"]
