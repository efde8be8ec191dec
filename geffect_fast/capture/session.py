"""A plan's taps at pass time: built once per plan, armed for each pass, disarmed after (also on error,
``KeyboardInterrupt`` included).

Building binds every tap's adapter (:meth:`~geffect_fast.capture.base.Adapter.bind`) and makes the function
that stands in for each tapped module's ``forward``; arming installs them as the modules' instance ``forward``
(wrapping whatever instance forward a user set), disarming puts back what was there. Between passes nothing of
the session is left on the model. Three guards make a wrong number impossible where the taps alone could not
see the whole gradient:

* **Own output.** The tap runs inside the module's ``forward``, so it sees what the module itself returned,
  before any forward hook — registered before or during the pass, prepended or not — transforms it; the
  gradient the tap receives is then exactly ∂L/∂(module output).
* **Outside uses.** Inside its module's forward a covered parameter is swapped for a detached alias, and the
  parameter itself requires grad for the pass: a use anywhere else (``F.linear(x, self.dense.weight)`` in
  a parent, as Bloom's ``slow_but_exact`` path does) then leaves a gradient in ``.grad``, which
  :meth:`CaptureSession.check_outside_uses` reports after the backward. Cost: two dict writes per module call and
  one look at each covered parameter's ``.grad`` per pass.
* **Row layout.** A module's rows are attributed to samples only where the layout is known (batch first,
  or the batch's B·T tokens flattened in order); rows gathered by index (MoE experts run on ``x[idx]``)
  are an error naming the module. Checked in the forward, where the row → sample map is fixed for the tap's
  backward.

One pass at a time per module: arming on modules that another armed session holds (a nested call, or another
thread that bypassed :func:`geffect_fast.state.preserved`'s per-model lock) raises instead of mixing taps.

Per batch (:meth:`start`) the session holds what the consumers read — B, the directions ``V`` in slot order,
the ops, the accumulation dtype — and the contributions they add (:meth:`add`, summed by :meth:`result`).
"""

from __future__ import annotations

import threading
from operator import itemgetter
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor
from ..ops.contract import Seg
from ..ops.dispatch import Backend
from .base import NotPerSampleError, Tap, UnsupportedModuleError, tap_apply

#: grad_fn names of ops that gather rows by index: their output rows are not the batch's rows in order
_GATHERING = frozenset({"IndexBackward0", "IndexSelectBackward0", "GatherBackward0", "TakeBackward0"})

_GROUP = itemgetter(0)
_VALUE = itemgetter(1)
_DETACH = Tensor.detach


class _Install:
    """One module's stand-in forward: the wrapper for the module's own forward, the forward it calls (``box[0]``),
    the module's own class forward, the wrapper for an instance forward set by a user (made when first needed),
    and what was in the module's ``__dict__`` before arming (``saved``: a user's instance forward, or None)."""

    __slots__ = ("module", "wrapper", "box", "own", "saved", "foreign", "make_foreign")

    def __init__(self, module: nn.Module, wrapper: Callable, box: list, own: Callable, make_foreign: Callable | None):
        self.module, self.wrapper, self.box, self.own, self.saved = module, wrapper, box, own, None
        self.foreign: Callable | None = None
        self.make_foreign = make_foreign


class CaptureSession:
    """Installs a plan's taps for each pass and collects ``out[k, b, group] += Σ_{t∈b} (contribution of token
    t)`` from its consumers.

    Backpropagating a weighted sum L = Σ_b s_b ℓ_b makes each tap's gradient rows belong to one sample
    each (samples are independent in the batch), so ``out[:, b]`` ends as s_b·⟨∇ℓ_b, v⟩ per group.
    ``guard`` watches the covered parameters for uses outside their modules (see the module docstring); it is
    off where parameters are sharded (FSDP2 swaps them itself).
    """

    def __init__(self, taps: list[Tap], roots: list[nn.Module], guard: bool = True):
        self.taps = taps
        self.roots = roots
        # -- per pass / batch: what adapters and consumers read --------------------------------------------
        self.B = 0  #: samples of the batch (packed samples for a packed batch)
        self.R = 0  #: rows of the batch
        self.T: int | None = None
        self.pooled = False
        self.packed: Tensor | None = None
        self._packed_seg: dict[tuple, Tensor] = {}
        self.expanded: list = []
        self._shared: list = []
        self.labelled: Tensor | None = None
        self.apply = tap_apply()
        self.V: list[Any] = []  #: each slot's direction, by Slot.index
        self.ops: Backend | None = None  #: the unchecked kernels
        self.K = 1
        self.G = 1
        self.acc = torch.float32
        self.device = torch.device("cpu")
        self.pending: list[tuple[int, Tensor]] = []  #: (group column, [K, B] contribution), summed by result()
        #: whether a disarm found another wrapper over ours (ours then stays inside it, passing through): the
        #: session must not be armed again (a plan cache drops it)
        self.broken = False
        self._armed = [False]
        self._thread = ""
        #: id(module) -> "batch" or "time": each module's row layout as seen where B ≠ T (or probed), shared with the
        #: model's map so that it outlives the plan
        self.layouts: dict[int, str] = {}
        self._seg: dict[tuple, Tensor] = {}
        self._names = {id(t.module): t.name for t in taps}
        self._slots = {id(t.module): t.slots for t in taps}
        # the outside-use guard: (local name, alias, parameter) cells per module, and the watched parameters
        self._cells: list[list] = []
        self._watched: dict[int, tuple[nn.Parameter, str, str]] = {}  # id(p) -> (p, canonical name, module)
        self._installs = [self._install(t, guard) for t in taps] + [self._root(m) for m in roots]
        self._guarded = [c[2] for c in self._cells]

    # -- building --------------------------------------------------------------------------------------------
    def _install(self, t: Tap, guard: bool) -> _Install:
        m = t.module
        swaps: list[list] = []
        if guard:
            for local, slot in t.slots.items():
                p = m._parameters.get(local)
                if p is None or is_dtensor(p):
                    continue
                cell = [local, None, p]  # the alias is made at every arm (p.data may have been replaced since)
                swaps.append(cell)
                self._cells.append(cell)
                self._watched.setdefault(id(p), (p, slot.name, t.name))
        box: list = [None]
        wrapper = self._wrapper(m, t.adapter.bind(t, self), t.adapter.around, swaps, box)
        make_foreign = None
        if not t.adapter.around:  # an around adapter is handed whatever forward the module has

            def make_foreign() -> Callable:
                fn = t.adapter.bind_foreign(t, self) or self._refusal(t)
                return self._wrapper(m, fn, True, swaps, box)

        return _Install(m, wrapper, box, type(m).forward.__get__(m), make_foreign)

    def _wrapper(self, m: nn.Module, fn: Callable, around: bool, swaps: list[list], box: list) -> Callable:
        """The stand-in forward: while armed (and grad is enabled), ``fn`` on the module's own output (or in place of
        its forward, ``around``), with the covered parameters swapped for their aliases inside the call."""
        armed = self._armed
        is_grad = torch.is_grad_enabled
        if around:

            def forward(*args, **kwargs):
                inner = box[0]
                if not armed[0] or not is_grad():
                    return inner(*args, **kwargs)
                if not swaps:
                    return fn(inner, args, kwargs)
                params = m._parameters
                for c in swaps:
                    params[c[0]] = c[1]
                try:
                    return fn(inner, args, kwargs)
                finally:
                    for c in swaps:
                        params[c[0]] = c[2]

        else:

            def forward(*args, **kwargs):
                inner = box[0]
                if not armed[0] or not is_grad():
                    return inner(*args, **kwargs)
                if not swaps:
                    return fn(args, kwargs, inner(*args, **kwargs))
                params = m._parameters
                for c in swaps:
                    params[c[0]] = c[1]
                try:
                    out = inner(*args, **kwargs)
                finally:
                    for c in swaps:
                        params[c[0]] = c[2]
                return fn(args, kwargs, out)

        forward._geffect_session = self
        return forward

    def _refusal(self, t: Tap) -> Callable:
        """The stand-in for a forward set on the instance that the module's adapter cannot vouch for: an error
        naming the module (``strict=False``: its parameters by autograd)."""

        def refuse(inner, args, kwargs):
            why = (
                f"the forward of {t.name!r} ({type(t.module).__name__}) was replaced on the instance (module.forward = "
                "...), and its adapter cannot vouch for what that forward computes"
            )
            raise NotPerSampleError(
                why + ". Restore the module's own forward, register an adapter that knows it, or (measure) pass "
                "strict=False to measure its parameters by ordinary autograd",
                {s.name: why for s in t.slots.values()},
            )

        return refuse

    def _root(self, m: nn.Module) -> _Install:
        """A module whose output becomes a leaf that requires grad, so gradients flow with frozen parameters."""
        box: list = [None]
        armed = self._armed
        is_grad = torch.is_grad_enabled

        def forward(*args, **kwargs):
            out = box[0](*args, **kwargs)
            if armed[0] and is_grad() and isinstance(out, Tensor) and not out.requires_grad and out.is_floating_point():
                return out.detach().requires_grad_(True)
            return out

        forward._geffect_session = self
        return _Install(m, forward, box, type(m).forward.__get__(m), None)

    # -- lifetime ------------------------------------------------------------------------------------------
    def arm(self) -> None:
        """Install the taps for a pass (the caller has frozen the parameters; the guarded ones are made to require
        grad here). Raises if another armed session holds any of the modules (then nothing is left installed)."""
        if self._armed[0] or self.broken:
            self._refuse(self.taps[0].module if self.taps else None, self._thread or "?")
        self.apply = tap_apply()
        done = []
        try:
            for inst in self._installs:
                d = inst.module.__dict__
                wrapper = inst.wrapper
                if "forward" in d:  # a forward set on the instance: another pass's, or a user's
                    cur = d["forward"]
                    owner = getattr(cur, "_geffect_session", None)
                    if owner is not None:
                        self._refuse(inst.module, owner._thread)
                    inst.saved = inst.box[0] = cur
                    if inst.make_foreign is not None:
                        if inst.foreign is None:
                            inst.foreign = inst.make_foreign()
                        wrapper = inst.foreign
                else:
                    inst.saved, inst.box[0] = None, inst.own
                d["forward"] = wrapper
                done.append(inst)
        except BaseException:
            self._uninstall(done)
            raise
        for cell, alias in zip(self._cells, map(_DETACH, self._guarded)):
            cell[1] = alias
        for p in self._guarded:
            p.requires_grad = True
        self._thread = threading.current_thread().name
        self._armed[0] = True

    def disarm(self) -> None:
        """Remove the taps (the caller restores the parameters' flags and grads); clear the watched grads."""
        self._armed[0] = False
        self._uninstall(self._installs)
        for p in self._guarded:
            p.grad = None
        for cell in self._cells:
            cell[1] = None

    def _uninstall(self, installs: list[_Install]) -> None:
        for inst in installs:
            d = inst.module.__dict__
            cur = d.get("forward")
            if cur is not inst.wrapper and (cur is None or cur is not inst.foreign):
                self.broken = True  # someone wrapped it after us: leave theirs; ours passes through from now on
                continue
            if inst.saved is None:
                del d["forward"]
            else:
                d["forward"] = inst.saved
            inst.saved = None

    def _refuse(self, module: nn.Module | None, who: str) -> None:
        me = threading.current_thread().name
        where = "this thread (a nested call)" if who == me else f"thread {who!r}"
        name = self.module_name(module) if module is not None else "?"
        raise RuntimeError(
            f"another G-effect pass ({where}) is running on this model (e.g. {name!r}); its taps would fire in this "
            "one and mix both results. Measure one model from one pass at a time (measure() waits for another "
            "thread's pass on the same model), or give each thread its own copy of the model"
        )

    def start(self, B: int, T: int | None = None, packed: Tensor | None = None, labelled: Tensor | None = None) -> None:
        """Begin one risk batch of B rows of T positions (T known: flattened [B·T, ...] rows are allowed). A packed
        batch (``packed``: [B, T] the sample of every position, ``loss.packed_samples``) holds P samples in its B
        rows: every per-sample value is per packed sample, and rows go to samples by ``packed``."""
        self.R = B
        self.B = B if packed is None else int(packed[-1, -1]) + 1
        self.T = T
        self.pooled = False
        self.pending = []
        self.packed = packed
        self._packed_seg = {}
        self.expanded = []
        self._shared = []
        self.labelled = labelled

    def start_pooled(self) -> None:
        """Begin a pass whose rows all count as one sample, whatever the batches' shapes (an objective that runs
        the model on several batches: its gradient's factors are wanted, not per-sample values)."""
        self.start(1)
        self.pooled = True

    # -- used by adapters ------------------------------------------------------------------------------
    def module_name(self, module: nn.Module) -> str:
        return self._names.get(id(module), type(module).__name__)

    def check_rows(self, a: Tensor, module: nn.Module) -> None:
        """At forward time: refuse an input whose rows were gathered by index (routed tokens)."""
        if a.ndim == 2 and self.R > 1:
            fn = a.grad_fn
            if fn is not None and type(fn).__name__ in _GATHERING:
                self._unattributable(
                    module, a, "its rows were gathered by index (routed tokens, e.g. an MoE expert run on x[idx])"
                )

    def rows(self, y: Tensor, features: int, module: nn.Module) -> Seg:
        """Which sample each row of ``y`` viewed as [rows, features] belongs to, as the ops take it: an int T
        (uniform segments: sample b owns rows [b·T, (b+1)·T)) for batch-first rows, or sample ids for time-first
        ones ([T, B, ...]: row t·B + b is sample b's).

        Known layouts only: batch first ([B, ...]), time first ([T, B, ...], T the batch's positions), the batch's
        B·T tokens flattened in order ([B·T, f]), or any rows when B = 1. Where B = T the first two look alike:
        the module's layout is then the one recorded for it — from a pass where they differ, or from the probe
        the engine runs first (``engine.run.start_batch``) — never guessed from a size that can coincide.
        Anything else (e.g. the tokens an MoE router sent to one expert) cannot be attributed to samples and is
        an error naming the module.
        """
        B, T, shape, nd = self.R, self.T, y.shape, y.ndim
        n = 1
        for s in shape[:-1]:
            n *= s
        layout = None
        if nd == 0 or shape[-1] != features:
            pass
        elif self.pooled or B == 1:
            layout = "batch"
        elif nd >= 3:
            first, time = shape[0] == B, shape[0] == T and shape[1] == B
            if first and not time:
                layout = self.layouts[id(module)] = "batch"
            elif time and not first:
                layout = self.layouts[id(module)] = "time"
            elif first and time:  # B = T: only what is known about the module tells
                layout = self.layouts.get(id(module))
                if layout is None:
                    self._unattributable(
                        module,
                        y,
                        f"with B = T = {B} its rows could be batch first or time first, and its layout is "
                        "not known (the engine's probe did not see it: a module that runs only on some batches?)",
                    )
        elif nd == 2 and T is not None and n == B * T:
            layout = "batch"  # the batch's tokens flattened in order
        if layout is None:
            self._unattributable(
                module,
                y,
                f"its rows are neither batch first, nor time first, nor the batch's {B}×{self.T} tokens in order",
            )
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=y.device)
        if self.packed is not None and not self.pooled:
            return self._packed_rows(layout, shape, y.device)
        if layout == "time":
            return self._interleaved(n, B, y.device)
        return n // B

    def _packed_rows(self, layout: str, shape: torch.Size, device: torch.device) -> Tensor:
        """The packed sample of each row of a module's output of ``shape`` (its rows: every index but the last):
        time first [T, B, ...], batch first [B, ..., T, ...] with other dims (heads) before or after the
        positions', or the batch's B·T tokens flattened in order."""
        key = (layout, tuple(shape), device)
        seg = self._packed_seg.get(key)
        if seg is None:
            p, rows = self.packed, tuple(shape[:-1])
            B, T = p.shape
            if layout == "time":
                view = p.T.reshape(T, B, *([1] * (len(rows) - 2)))
            elif rows == (B * T,):
                view = p.reshape(-1)
            else:
                t = next((i for i in range(1, len(rows)) if rows[i] == T), None)
                if t is None:
                    raise NotPerSampleError(
                        f"a packed batch of {tuple(p.shape)} positions reached a module with rows {rows}: none of "
                        f"their dims is the {T} positions, so they cannot be mapped to the packed samples",
                        {},
                    )
                view = p.reshape(B, *([1] * (t - 1)), T, *([1] * (len(rows) - t - 1)))
            seg = self._packed_seg[key] = view.to(device).expand(rows).reshape(-1)
        return seg

    def _interleaved(self, n: int, B: int, device: torch.device) -> Tensor:
        """Sample ids of time-first rows: row r is sample r mod B (kept per shape)."""
        key = (n, B, device)
        seg = self._seg.get(key)
        if seg is None:
            seg = self._seg[key] = torch.arange(n, device=device) % B
        return seg

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

    def watch_shared(self, g: Tensor, module: nn.Module, tap: Tap) -> None:
        """See :class:`~geffect_fast.capture.base.PassState`: a labelled row with no gradient at all while another
        row has some means the model did not broadcast the shared output over the batch."""
        if self.labelled is None or g.shape[0] != self.labelled.shape[0]:
            return
        live = g.reshape(g.shape[0], -1).abs().amax(1) > 0
        self._shared.append((module, tap, (self.labelled.to(live.device) & ~live).any() & live.any()))

    def failed_forward(self, error: BaseException) -> BaseException:
        """The error to raise for a forward that failed: where an output shared by the batch was expanded in it and
        the failure is torch's size mismatch (the model repeats or concatenates the rows over the batch itself), one
        naming the embedding (strict=False: autograd), else ``error`` itself."""
        text = str(error).lower()
        if not self.expanded or type(error) is not RuntimeError or not any(w in text for w in ("size", "shape")):
            return error  # not torch's size mismatch: the model's own error
        module, tap = self.expanded[0]
        why = (
            f"{self.module_name(module)!r} was called with ids shared by the batch ([1, n]); its output was expanded "
            f"to the batch's {self.R} rows so that each sample gets its own gradient, and the model's forward then "
            f"failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}): it does not broadcast the shared "
            "rows over the batch, so their per-sample gradients cannot be told apart"
        )
        return NotPerSampleError(
            why + ". Give the table a zero direction or (measure) pass strict=False to measure it by ordinary autograd",
            {s.name: why for s in tap.slots.values()},
        )

    # -- after a backward ------------------------------------------------------------------------------
    def check_outside_uses(self) -> None:
        """After a backward: raise :class:`NotPerSampleError` naming the covered parameters that received a
        gradient from a use outside their module's forward (their ``.grad`` is cleared first), or whose output,
        shared by the batch, the model used otherwise than broadcast over it (:meth:`watch_shared`)."""
        for module, tap, flag in self._shared:
            if bool(flag):
                why = (
                    f"{self.module_name(module)!r} was called with ids shared by the batch ([1, n]) and the model did "
                    "not broadcast its output over the batch (it took one row of it for every sample, e.g. "
                    "pos(ids)[0]), so the per-sample gradients of the table cannot be told apart"
                )
                self._shared = []
                raise NotPerSampleError(
                    why + ". Give the table a zero direction or (measure) pass strict=False to measure it by ordinary "
                    "autograd",
                    {s.name: why for s in tap.slots.values()},
                )
        self._shared = []
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

    def add(self, group: int, contrib: Tensor) -> None:
        """Add a [K, B] contribution to group column ``group`` (kept until :meth:`result` sums them all)."""
        self.pending.append((group, contrib))

    def result(self) -> Tensor:
        """[K, B, G] with every contribution of this batch added: one product with the one-hot group matrix
        instead of one indexed add per tap (deterministic on every device)."""
        K, B, G, acc = self.K, self.B, self.G, self.acc
        pending = self.pending
        if not pending:
            return torch.zeros(K, B, G, dtype=acc, device=self.device)
        vals = torch.stack(list(map(_VALUE, pending)), dim=-1).to(acc).reshape(K * B, -1)
        cols = torch.tensor(list(map(_GROUP, pending)), device=vals.device)
        self.pending = []
        return (vals @ torch.nn.functional.one_hot(cols, G).to(acc)).reshape(K, B, G)


__all__ = ["CaptureSession", "NotPerSampleError", "UnsupportedModuleError"]
