"""Mixture-of-experts layers of Hugging Face models (Mixtral, Qwen2-/Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, ...):
fused ``*Experts`` modules and top-k routers, measured per sample.

* **Top-k routers** compute ``logits = F.linear(x, W[, b])`` and, inside the same forward, the top-k weights from
  them (softmax or sigmoid, renormalisation, score-correction biases, group-limited choice). The tap sits on that
  ``F.linear`` call (as for a linear map whose forward is not ``nn.Linear``'s): the gradient it receives is the
  logits' own, through whatever the forward does with them, so G_b = Σ_{t∈b} g_t x_tᵀ is exact.
* **Fused experts** hold every expert's weights in stacked parameters ([E, out, in]: ``gate_up_proj``,
  ``down_proj``; [E, in, out] and [E, out] biases for gpt-oss) and run expert e, inside one forward, on the tokens
  its router sent it, ``x[token_idx_e]``. The adapter runs the class's eager forward (``grouped_mm`` and
  ``batched_mm`` compute the same map) under a :class:`RowTap`: the input's rows carry their samples
  (``PassState.rows``: the batch's tokens flattened in order), a gather ``x[idx]`` carries ``ids[idx]``, and
  row-wise calls carry their input's; ``W[e]`` is expert e's slice of a stacked parameter, and the calls that use
  a slice — ``F.linear(h, W[e], b[e])``, ``h @ W[e]``, ``y + b[e]`` — are tapped with the slot of expert e
  (:attr:`~geffect_fast.capture.base.Slot.part`): ⟨G_b, V⟩ = Σ_e Σ_{t∈b, t→e} g_{t,e}ᵀ V_e a_{t,e}, with g at the
  expert's own output rows. Any other use of a stacked parameter or a slice, or a slice applied to rows whose
  samples are not known, is refused (:class:`~geffect_fast.capture.base.NotPerSampleError`; ``strict=False``:
  autograd). No per-sample expert gradient is formed.

Consumers that take whole parameters (factored directions' capture, pairwise, sketches) leave the experts to
autograd (the plan says so); the G-effects of a dense direction take the slices.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import stacked_experts
from ..ops.contract import seg_tensor
from .base import Adapter, FunctionalTap, NotPerSampleError, PassState, Slot, Tap, first_input, linear_rows
from .linear import LinearAdapter
from .registry import register_recogniser

#: functions whose output rows are not their first argument's rows, even where the sizes agree (a product
#: ``x @ M`` with x's rows first keeps them: matmul, mm and bmm are not here)
_ROW_MIXING = frozenset(
    {
        "transpose", "t", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "flip", "fliplr", "flipud",
        "roll", "sort", "argsort", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "index_select",
        "gather", "take_along_dim", "scatter", "scatter_", "scatter_add", "scatter_add_", "index_add",
        "index_add_", "index_copy", "index_copy_", "index_put", "index_put_", "unfold", "__get__", "__rmatmul__",
        "einsum", "tensordot", "kron", "outer", "view_as", "reshape_as",
    }
)  # fmt: skip
_ADDS = frozenset({torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__})
_MATMULS = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm})


def _name(func: Any) -> str:
    return getattr(func, "__name__", "") or ""


class RowTap(FunctionalTap):
    """:class:`FunctionalTap` for a forward that gathers rows: knows which sample each row of its tensors belongs
    to (``self.ids``: id(tensor) -> sample ids [rows]), starting from the module's input, and which expert slice a
    tensor is (``self.slices``: id(slice) -> (local name, expert)). ``on_use(kind, out, args, slices, rows)`` taps
    the output of a call that uses a slice (kind "linear", "matmul" or "add")."""

    def __init__(self, params: dict[int, str], locals_: dict[int, str], module_name: str, on_use: Callable):
        super().__init__(params, None, module_name)
        self.locals = locals_  #: id(stacked parameter as the forward sees it) -> its local name
        self.ids: dict[int, Tensor] = {}
        self.slices: dict[int, tuple[str, int]] = {}
        self.on_use = on_use
        self.known = _known

    def track(self, t: Any, ids: Tensor) -> None:
        if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == ids.shape[0]:
            self.ids[id(t)] = ids
            self._held.append(t)

    def rows_of(self, t: Any) -> Tensor | None:
        return self.ids.get(id(t)) if isinstance(t, Tensor) else None

    def slice_of(self, t: Any) -> tuple[str, int] | None:
        return self.slices.get(id(self.origin(t))) if isinstance(t, Tensor) else None

    def refuse(self, why: str, name: str) -> None:
        raise NotPerSampleError(
            f"{why} inside the forward of {self.module_name!r}; pass strict=False to measure {name!r} by ordinary "
            "autograd (group 'uncovered')",
            {name: why},
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        ids = self.rows_of(args[0]) if args else None
        if ids is None or _name(func) in _ROW_MIXING:
            return out
        if func is Tensor.__getitem__:
            index = args[1]
            if isinstance(index, Tensor) and index.dim() == 1 and not index.is_floating_point():
                self.track(out, ids[index.long()] if index.dtype != torch.bool else ids[index])
                return out
            lead = index[0] if isinstance(index, tuple) and index else index
            if lead is not Ellipsis and lead != slice(None):
                return out
        if isinstance(out, (tuple, list)):
            for o in out:
                self.track(o, ids)
        elif isinstance(out, Tensor) and args[0].dim() == out.dim():
            self.track(out, ids)
        return out


def _expert_index(index: Any) -> int | None:
    """An expert index: an int or a 0-d integer tensor (one host read; the eager loop reads it anyway)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, Tensor) and index.dim() == 0 and not index.is_floating_point():
        return int(index)
    return None


def _known(ft: RowTap, func, args: tuple, kwargs: dict):
    """The calls :class:`RowTap` handles: a stacked parameter indexed by one expert, and the uses of a slice."""
    if func is Tensor.__getitem__ and id(args[0]) in ft.locals:
        e = _expert_index(args[1])
        if e is None:
            return None  # any other indexing: refused as an unknown use

        key = id(args[0])
        local, name = ft.locals[key], ft.params[key]

        def sliced(out, a, kw):
            ft.slices[id(out)] = (local, e)
            ft.watch(out, name)
            return out

        return sliced
    if func is F.linear:
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        ws = ft.slice_of(w)
        if ws is not None:
            bs = None if b is None else ft.slice_of(b)
            return lambda out, a, kw: ft.on_use("linear", out, x, ws, bs)
    elif func in _MATMULS and len(args) == 2:
        ws = ft.slice_of(args[1])
        if ws is not None:
            return lambda out, a, kw: ft.on_use("matmul", out, args[0], ws, None)
    elif func in _ADDS and len(args) == 2:
        for y, b in ((args[0], args[1]), (args[1], args[0])):
            bs = ft.slice_of(b)
            if bs is not None and ft.rows_of(y) is not None:
                return lambda out, a, kw, y=y, bs=bs: ft.on_use("add", out, y, None, bs)
    return None


class ExpertsAdapter(Adapter):
    """Fused MoE experts (see the module docstring): every stacked parameter [E, ...] of the module."""

    around = True
    sliced = True
    covers_subclass_forward = True

    def __init__(self, param_names: tuple[str, ...]):
        self.param_names = param_names

    def bind(self, tap: Tap, state: PassState):
        module = tap.module
        #: (kind, weight slice, bias slice, out features) -> (backward, whether the weight is measured, any part):
        #: made at a call's first use in the first pass, reused at every later one
        made: dict[tuple, tuple[Callable, bool, bool]] = {}

        def slot(sl: dict[str, Slot], local: str | None, e: int) -> Slot | None:
            if local is None or local not in sl:
                return None
            base = sl[local]
            return Slot(base.name, local, base.part_groups[e] if base.part_groups else base.group, base.index, e)

        def backward_for(kind: str, w: tuple[str, int] | None, b: tuple[str, int] | None, o: int):
            key = (kind, w, b, o)
            if key in made:
                return made[key]
            e = (w or b)[1]
            parts = [(c, slot(sl, w and w[0], e), slot(sl, b and b[0], e)) for c, sl in tap.parts]
            parts = [p for p in parts if p[1] is not None or p[2] is not None]
            transposed = kind == "matmul"

            def backward(g: Tensor, seg, saved: Sequence[Tensor]) -> None:
                a2, g2 = linear_rows(g, o, saved)
                for c, ws, bs in parts:
                    c.linear(ws, bs, a2 if ws is not None else None, g2, seg, transposed)

            made[key] = backward, any(p[1] is not None for p in parts), bool(parts)
            return made[key]

        def on_use(kind: str, out: Tensor, x: Tensor, w, b) -> Tensor:
            ft: RowTap = box[0]
            ids = ft.rows_of(x)
            if ids is None:
                name = tap.slots[(w or b)[0]].name
                ft.refuse(f"an expert slice of {name!r} is applied to rows whose samples are not known", name)
            if w is not None and b is not None and w[1] != b[1]:
                ft.refuse("a weight and a bias of different experts are used in one call", tap.slots[w[0]].name)
            fn, with_w, any_part = backward_for(kind, w, b, out.shape[-1])
            if any_part:
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                out = state.apply(out, fn, ids, x) if with_w else state.apply(out, fn, ids)
            ft.track(out, ids)
            return out

        eager = getattr(type(module).forward, "__wrapped__", None)

        def around(inner, args, kwargs):
            params = module._parameters  # as the forward sees them: the guard's aliases
            watched = {id(params[k]): s.name for k, s in tap.slots.items()}
            locals_ = {id(params[k]): k for k in tap.slots}
            ft = box[0] = RowTap(watched, locals_, state.module_name(module), on_use)
            x = first_input(args, kwargs, "hidden_states")
            if x.dim() != 2:
                ft.refuse(f"its input has shape {tuple(x.shape)}, not [tokens, hidden]", next(iter(watched.values())))
            ft.track(x, seg_tensor(state.rows(x, x.shape[-1], module), x.shape[0], state.B, x.device))
            own = getattr(inner, "__func__", None) is type(module).forward
            fwd = eager.__get__(module) if own and eager is not None else inner  # grouped/batched_mm: the same map
            with ft:
                return fwd(*args, **kwargs)

        box: list = [None]
        return around


class RouterAdapter(LinearAdapter):
    """A top-k router's ``weight`` (and ``bias``): the tap on the ``F.linear`` inside its forward."""

    around = True
    covers_subclass_forward = True

    def bind(self, tap: Tap, state: PassState):
        return self.bind_foreign(tap, state)


_ROUTER = RouterAdapter()


@register_recogniser
def _recognise_moe(module: nn.Module) -> Adapter | None:
    stacked = stacked_experts(module)
    if stacked:
        return ExpertsAdapter(stacked)
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    router = type(module).__name__.lower().endswith("topkrouter")
    if router and w is not None and w.dim() == 2 and set(params) <= {"weight", "bias"}:
        return _ROUTER
    return None
