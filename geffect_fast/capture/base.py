"""What every layer adapter shares: the tap, the slots it fills, and what it hands a layer's gradient to.

* :class:`Adapter` — the rule for one layer kind (one file per kind in this package): which parameters it
  covers and how a module's per-sample gradient factors are reached from its forward and backward.
* :class:`Tap` — one module tapped in one plan: its slots (the parameters with a nonzero direction, each with
  its group column) split into *parts*, each part the slots one :class:`Consumer` takes.
* :class:`Consumer` — what the factors feed, chosen per parameter when the plan is made
  (:mod:`geffect_fast.engine.consumers`: the dense dot with V, the factored pairing, the pairwise and factor
  collectors, the sketcher). An adapter hands over what its layer kind has — a linear map its input a and
  output gradient g, an embedding its ids and g, a norm x̂ and g — and knows nothing of which consumer runs.
  Every form reduces to factors of the per-sample gradient, G_b = Σ_{t∈b} L_t R_tᵀ
  (:meth:`Consumer.factors`), which is all a consumer must implement; the dense dot takes the layer forms
  as they are, so that its fused ops read each tensor once.
* :class:`TapFn` — the identity autograd function placed on a layer's own output. Its forward saves what the
  adapter needs with ``ctx.save_for_backward`` (correct under gradient checkpointing of both kinds: the
  non-reentrant kind drops and recomputes saved tensors, the reentrant kind re-runs the forward); its backward
  hands the output gradient g to the adapter and passes g on unchanged.
* :class:`PassState` — what an adapter may ask of the pass at forward time (the session implements it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..ops.contract import Seg


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


@dataclass(eq=False)
class Slot:
    """One parameter use of a tapped module: the parameter's canonical name, its name in the module, its group
    column, and the position of its direction in the pass's list (``PassState.V``). ``part``: for a stacked
    parameter used one slice at a time (an MoE layer's [E, ...] expert weights), the slice this slot stands for
    (its direction is ``V[index][:, part]``); None for a whole parameter. ``part_groups``: where the grouping
    splits such a parameter (``groups="module"``: one group per expert), the group column of each slice."""

    name: str
    local: str
    group: int
    index: int = -1
    part: int | None = None
    part_groups: tuple[int, ...] | None = None


class Consumer:
    """What a tapped module's per-sample gradient feeds. Subclasses implement :meth:`factors`; the layer forms
    default to it. ``seg`` is the row -> sample map of the ops (an int T: sample b owns rows [b·T, (b+1)·T)).
    Where a slot is None its parameter is not this consumer's."""

    #: whether it takes slots that stand for one slice of a stacked parameter (``Slot.part``: MoE experts);
    #: a parameter whose adapter hands over slices is left to autograd for the consumers that do not
    takes_parts: bool = False

    def factors(self, slot: Slot, L: Tensor, R: Tensor, seg: Seg, pad: int | None) -> None:
        """G_b = Σ_{t∈b} L_t R_tᵀ for the slot's parameter (L [N, d_L], or ids [N] standing for one-hot rows of
        the table, with rows at ``pad`` giving nothing; R [N, d_R]; d_L·d_R the parameter's size)."""
        raise NotImplementedError

    def linear(self, w: Slot | None, b: Slot | None, a: Tensor, g: Tensor, seg: Seg, transposed: bool) -> None:
        """A linear map y = a Wᵀ + b (W [o, i]; ``transposed``: stored [i, o], y = a W + b): G_W = Σ g aᵀ (Σ a gᵀ
        transposed), G_b = Σ g."""
        if w is not None:
            self.factors(w, *((a, g) if transposed else (g, a)), seg, None)
        if b is not None:
            self.factors(b, g, g.new_ones(g.shape[0], 1), seg, None)

    def embedding(self, w: Slot, ids: Tensor, g: Tensor, seg: Seg, pad: int | None) -> None:
        """A table lookup y_t = E[x_t]: G_E = Σ e_{x_t} g_tᵀ (rows at ``pad`` get no gradient)."""
        self.factors(w, ids, g, seg, pad)

    def norm(self, w: Slot | None, b: Slot | None, xhat: Tensor, g: Tensor, seg: Seg) -> None:
        """An affine normalisation y = γ ⊙ x̂ (+ β): G_γ = Σ g ⊙ x̂, G_β = Σ g (vectors: R = 1)."""
        ones = g.new_ones(g.shape[0], 1)
        if w is not None:
            self.factors(w, g.to(xhat.dtype) * xhat, ones, seg, None)
        if b is not None:
            self.factors(b, g, ones, seg, None)


@dataclass(eq=False)
class Tap:
    """One module tapped by one plan. ``slots``: local parameter name -> :class:`Slot`; ``parts``: the consumers
    and the slots each takes (most taps have one part)."""

    name: str
    module: nn.Module
    adapter: Adapter
    slots: dict[str, Slot] = field(default_factory=dict)
    parts: list[tuple[Consumer, dict[str, Slot]]] = field(default_factory=list)


class PassState(Protocol):
    """What adapters ask of the pass (implemented by :class:`geffect_fast.capture.session.CaptureSession`)."""

    B: int  #: samples of the batch being measured (its packed samples, for a packed batch)
    R: int  #: rows of the batch being measured
    pooled: bool  #: whether every row counts as one sample (an objective's gradient, not per-sample values)
    apply: Callable[..., Tensor]  #: ``TapFn``'s apply for this pass (:func:`tap_apply`)
    expanded: list  #: (module, tap) of the outputs shared by the batch that were expanded in this forward

    def rows(self, y: Tensor, features: int, module: nn.Module) -> Seg:
        """Which sample each row of ``y`` (viewed as [rows, features]) belongs to; an error naming ``module``
        where its layout cannot be attributed to samples."""

    def check_rows(self, a: Tensor, module: nn.Module) -> None:
        """Refuse an input whose rows were gathered by index (routed tokens)."""

    def module_name(self, module: nn.Module) -> str: ...

    def watch_shared(self, g: Tensor, module: nn.Module, tap: Tap) -> None:
        """In the backward of an expanded shared output: note, on the device, whether some labelled sample's row got
        no gradient (the model used one row for all); read after the backward."""


#: ``on_output(args, kwargs, out)`` -> the output to return (the tapped one); ``around(inner, args, kwargs)``
OnOutput = Callable[[tuple, dict, Any], Any]
Around = Callable[[Callable, tuple, dict], Any]


class Adapter:
    """The rule for one layer kind: which parameters it covers and how their factors are reached.

    Subclasses register themselves with :func:`geffect_fast.capture.register` and implement :meth:`bind`,
    which returns the function the session runs on the module's own output inside its forward, once per call
    while a pass is armed — ``on_output(args, kwargs, out)``, returning the output with a tap on it (see
    :func:`tap`) — or, with ``around = True``, ``around(forward, args, kwargs)`` in place of the forward. The
    tap's backward hands the layer's factors to ``part[0]`` for every ``part in tap.parts``. Bound once per
    plan; the session installs and removes it for every pass, also on error.
    """

    #: local parameter names this adapter covers (e.g. ``("weight", "bias")``)
    param_names: tuple[str, ...] = ("weight", "bias")
    #: whether a subclass that overrides ``forward`` is still covered (true only for adapters that
    #: intercept the functional call inside the forward, as the embedding adapter does)
    covers_subclass_forward: bool = False
    #: whether :meth:`bind` returns ``around(forward, args, kwargs)`` rather than ``on_output(args, kwargs, out)``
    around: bool = False
    #: whether it hands over its parameters one slice at a time (``Slot.part``: an MoE layer's experts)
    sliced: bool = False

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this adapter cannot handle ``module`` (None if it can)."""
        return None

    def bind(self, tap: Tap, state: PassState) -> OnOutput | Around:
        raise NotImplementedError

    def bind_foreign(self, tap: Tap, state: PassState) -> Around | None:
        """The stand-in for a forward this adapter did not write — one set on the instance (``module.forward =
        ...``) — as ``around(forward, args, kwargs)``: it must vouch for what the forward computes (tap the
        parameter's own functional call and refuse other uses, :class:`FunctionalTap`; or check the output), or
        return None: such a module is then refused (an error naming it; ``strict=False``: autograd)."""
        return None


#: calls that change a tensor's dtype or device only: a cast of a watched parameter stands for the parameter
_CASTS = frozenset(
    {Tensor.type, Tensor.to, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.contiguous}
)


class FunctionalTap(TorchFunctionMode):
    """Inside one module's forward (live only while it runs): every torch function call that takes one of the
    module's covered parameters — as the forward sees them, ``params`` (id -> canonical name) — is either a call the
    adapter knows how to measure or a use the tap cannot vouch for.

    ``known(tap, func, args, kwargs)`` returns a handler for a known call (``F.linear(x, W, b)`` for a linear map,
    ``F.embedding(ids, E, ...)`` for a table, one expert's slice of a fused weight), or None. A handled call runs
    and ``handler(out, args, kwargs)`` returns its output — with a tap on it where the call is a parameter's use:
    the gradient the tap receives is then exactly that of the call's own output, whatever the forward does before
    or after it, and a parameter used in two known calls adds both contributions. A cast of a watched parameter
    (``W.float()``, ``W.type(torch.float32)``) stands for the parameter (:meth:`origin`). Any other call that takes
    a parameter and returns a tensor (``W[ids]``, ``0.5 * W``, ``W.T``, a transform) is an error naming the
    parameter and the function (:class:`NotPerSampleError`, so that ``strict=False`` measures the parameter by
    autograd instead); reading metadata (``W.shape``, ``W.dtype``) is fine. This is how a forward the adapter did
    not write — a subclass's own, or one set on the instance — is measured exactly or refused, never taken on
    trust."""

    def __init__(self, params: dict[int, str], known: Callable, module_name: str):
        super().__init__()
        self.params = params
        self.known = known
        self.module_name = module_name
        self._origin: dict[int, Tensor] = {}  #: id(cast) -> the watched tensor it stands for
        self._held: list[Tensor] = []  #: what ids refer to, alive while the mode is (no id reused meanwhile)

    def origin(self, x: Any) -> Any:
        """The watched tensor ``x`` stands for (``x`` itself unless it is a cast of one)."""
        return self._origin.get(id(x), x)

    def watch(self, x: Tensor, name: str, origin: Tensor | None = None) -> None:
        """Watch ``x`` too (a slice or a cast of a watched parameter, as a known call's handler made it)."""
        self.params[id(x)] = name
        if origin is not None:
            self._origin[id(x)] = origin
        self._held.append(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.known(self, func, args, kwargs)
        if handler is not None:
            return handler(func(*args, **kwargs), args, kwargs)
        out = func(*args, **kwargs)
        if func in _CASTS and args and id(args[0]) in self.params and isinstance(out, Tensor):
            if out is not args[0]:
                self.watch(out, self.params[id(args[0])], self.origin(args[0]))
            return out
        if isinstance(out, Tensor) or (isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out)):
            used = self.used(args, kwargs)
            if used:
                why = (
                    f"{used!r} is used inside the forward of {self.module_name!r} by "
                    f"{getattr(func, '__qualname__', None) or getattr(func, '__name__', repr(func))}, not only by the "
                    "call its adapter measures, so the tap cannot vouch for its gradient"
                )
                raise NotPerSampleError(
                    why + ". Give the parameter a zero direction, register an adapter that knows this forward, or "
                    "(measure) pass strict=False to measure it by ordinary autograd (group 'uncovered')",
                    {used: why},
                )
        return out

    def used(self, args: tuple, kwargs: dict) -> str | None:
        """The canonical name of a watched parameter among the call's arguments (one level into lists), or None."""
        ids = self.params
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                for b in a:
                    if id(b) in ids:
                        return ids[id(b)]
            elif id(a) in ids:
                return ids[id(a)]
        return None


def linear_rows(g: Tensor, o: int, saved: Sequence[Tensor]) -> tuple[Tensor | None, Tensor]:
    """A linear map's tap in its backward: (input a as [rows, i] — None when nothing was saved —, output gradient g
    as [rows, o]), in one dtype (under autocast the layer ran in half and its input is wider)."""
    g2 = g.reshape(-1, o)
    if not saved:
        return None, g2
    a2 = saved[0].reshape(-1, saved[0].shape[-1])
    if a2.dtype != g2.dtype:
        dt = torch.promote_types(a2.dtype, g2.dtype)
        a2, g2 = a2.to(dt), g2.to(dt)
    return a2, g2


def first_input(args: tuple, kwargs: dict, name: str) -> Tensor:
    """The module's first positional argument, or the keyword ``name``."""
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    if kwargs:
        return next(iter(kwargs.values()))
    raise UnsupportedModuleError("module was called without an input tensor")


#: ``(None,) * n`` for the saved tensors' gradients (TapFn.backward returns one None per saved tensor)
_NONES = tuple((None,) * n for n in range(8))


class TapFn(torch.autograd.Function):
    """Identity on ``y``; on the way back calls ``fn(g, seg, saved)`` and returns g unchanged."""

    @staticmethod
    def forward(ctx, y: Tensor, fn: Callable[[Tensor, Seg, Sequence[Tensor]], None], seg: Seg, *saved: Tensor):
        ctx.fn = fn
        ctx.seg = seg
        ctx.n = len(saved)
        ctx.save_for_backward(*saved)
        # an alias, not a view: the model may modify a layer's output in place (Falcon's `mlp_output +=
        # attention_output`), which autograd forbids on a custom Function's view outputs. The alias shares y's
        # version counter, so an in-place change that plain autograd would refuse is refused here too.
        return y.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        ctx.fn(g, ctx.seg, ctx.saved_tensors)  # unpacked once: non-reentrant checkpointing allows a single unpack
        return (g, None, None) + _NONES[ctx.n]


#: TapFn's C-level apply, without ``Function.apply``'s Python wrapper (which handles functorch transforms and
#: ``setup_context``, neither of which a tap uses): 5 interpreter calls per tap instead of 20. A pass uses it
#: unless functorch transforms are active (:func:`tap_apply`).
try:
    _FAST_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, TapFn)
except (AttributeError, KeyError, TypeError):  # pragma: no cover - a torch without the C base class
    _FAST_APPLY = TapFn.apply


def tap_apply() -> Callable[..., Tensor]:
    """``TapFn``'s apply for a pass starting now: the C one, or ``TapFn.apply`` under functorch transforms."""
    return TapFn.apply if torch._C._are_functorch_transforms_active() else _FAST_APPLY


def tap(y: Tensor, fn: Callable[[Tensor, Seg, Sequence[Tensor]], None], seg: Seg, *saved: Tensor) -> Tensor:
    """Return ``y`` with ``fn(g, seg, saved)`` called on its gradient g during backward.

    With every parameter frozen, a layer whose input carries no gradient would have an output that carries
    none either; such an output becomes a fresh leaf that requires grad (a *root* of the pass), so its
    gradient is still computed. (The built-in adapters inline this with the pass's ``apply``.)
    """
    if not y.requires_grad:
        y = y.detach().requires_grad_(True)
    return tap_apply()(y, fn, seg, *saved)
