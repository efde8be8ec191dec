"""What a model's module tree says, whatever the direction — kept per model while the tree is unchanged.

Walking the tree and matching adapters was most of a small call's host time; a :class:`ModuleMap` is made
once per model and reused while every module keeps its children and parameters (the same objects under the
same names), every parameter its shape, dtype and device, and the adapter registry is the same. That check
(:meth:`ModuleMap.current`) compares the kept lists with the live ones in C loops (``map``): about twenty
interpreter calls whatever the model's size. The plans made for the model (:mod:`geffect_fast.engine.plan`)
are kept in it, so they go with it when the tree changes.
"""

from __future__ import annotations

import threading
import weakref
from itertools import chain
from operator import attrgetter, is_
from typing import Any, Iterable

import torch
from torch import nn

from .. import groups as groups_mod
from ..capture import find_adapter, registry
from ..distributed import sharded_mesh
from ..state import check_not_inference, is_inference
from .model import input_device, input_embeddings

_MODULES = attrgetter("_modules")
_PARAMS = attrgetter("_parameters")
_META = attrgetter("shape", "dtype", "device")
_REQUIRES_GRAD = attrgetter("requires_grad")


class ModuleMap:
    """One model's parameters (canonical names, in order), every parameter's uses (module name, module, local
    name), each owning module's adapter, the embeddings and the input embedding, where batches go, the
    groupings and plans asked for so far, and which parameters are trainable now (:meth:`trainable`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        named_modules = list(model.named_modules())
        self.modules: list[nn.Module] = [m for _, m in named_modules]
        self.named: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.names: list[str] = list(self.named)
        self.params: list[nn.Parameter] = list(self.named.values())
        pname = {id(p): n for n, p in self.named.items()}
        #: parameter -> its uses (module name, module, local name)
        self.owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
        #: id(module) -> its adapter (None: no rule covers it)
        self.adapters: dict[int, Any] = {}
        for mname, m in named_modules:
            for local, p in m._parameters.items():
                if p is None or id(p) not in pname:
                    continue
                self.owners.setdefault(pname[id(p)], []).append((mname, m, local))
                if id(m) not in self.adapters:
                    self.adapters[id(m)] = find_adapter(m)
        self.embeddings = [m for m in self.modules if isinstance(m, nn.Embedding)]
        self.input_embedding = input_embeddings(model)
        self.mesh = sharded_mesh(model)
        self.device = input_device(model) if self.params else torch.device("cpu")
        emb = self.input_embedding
        w = getattr(emb, "weight", None)
        floats = [p.dtype for p in self.params if p.is_floating_point()]
        #: the activations' dtype (the input embedding's, else the first floating parameter's)
        self.act_dtype = w.dtype if isinstance(w, torch.Tensor) else (floats[0] if floats else torch.float32)
        self.f64 = torch.float64 in floats
        #: parameters made under inference mode (autograd cannot use them): refused by the passes that need them
        self.inference = tuple(n for n, p in self.named.items() if is_inference(p))
        #: parameters on the meta device (offloaded: their values live elsewhere, put in by hooks for each forward)
        self.meta = tuple(n for n, p in self.named.items() if p.device.type == "meta")
        self.groupings: dict[Any, groups_mod.Grouping] = {}
        self.plans: dict[Any, Any] = {}  #: plan key -> Plan (engine.plan), dropped with the map
        #: id(module) -> its row layout ("batch" or "time"), as passes and probes found it (capture.session.rows)
        self.layouts: dict[int, str] = {}
        #: whether the model keeps packed samples apart (engine.run.check_packing; None: not probed yet)
        self.packing: bool | None = None
        #: the thread of a pass in progress on this model (a nested pass is refused)
        self.busy: str | None = None
        self._flags: list[bool] = []
        self._trainable: tuple[str, ...] = ()
        self._registry = registry.version()
        self._sig = self._signature()

    # -- unchanged? --------------------------------------------------------------------------------------
    def _signature(self) -> tuple:
        mods = self.modules
        return (
            list(map(tuple, map(dict.items, map(_MODULES, mods)))),
            list(map(tuple, map(dict.keys, map(_PARAMS, mods)))),
            list(map(type, mods)),
            list(map(_META, self.params)),
        )

    def current(self) -> bool:
        """Whether the model's tree is the one this map was made from (see the module docstring)."""
        if registry.version() != self._registry or self._signature() != self._sig:
            return False
        now = list(chain.from_iterable(map(dict.values, map(_PARAMS, self.modules))))
        then = self._pvals
        return len(now) == len(then) and all(map(is_, now, then))

    @property
    def _pvals(self) -> list:
        v = self.__dict__.get("_pvals_")
        if v is None:
            v = self.__dict__["_pvals_"] = list(chain.from_iterable(map(dict.values, map(_PARAMS, self.modules))))
        return v

    # -- per call ------------------------------------------------------------------------------------------
    def pass_dtypes(self, dtypes: Iterable[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
        """(the direction's dtype, the pass's accumulation dtype) for a direction whose entries have ``dtypes``: their
        promotion, and float64 where the model or the direction holds float64, else float32."""
        dtypes = set(dtypes)
        dir_dtype = torch.float64 if torch.float64 in dtypes else next(iter(dtypes))
        for dt in dtypes:
            dir_dtype = torch.promote_types(dir_dtype, dt)
        return dir_dtype, torch.float64 if self.f64 or torch.float64 in dtypes else torch.float32

    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters that require grad now (the same tuple object while the flags are unchanged)."""
        flags = list(map(_REQUIRES_GRAD, self.params))
        if flags != self._flags:
            self._flags = flags
            self._trainable = tuple(n for n, f in zip(self.names, flags) if f)
        return self._trainable

    def grouping(self, spec: groups_mod.GroupSpec) -> groups_mod.Grouping:
        """``groups.assign`` once per spec (a callable spec is assumed to be a pure function)."""
        try:
            hash(spec)
        except TypeError:  # pragma: no cover - an unhashable callable: nothing to key it by
            return groups_mod.assign(self.model, spec, self.names)
        g = self.groupings.get(spec)
        if g is None:
            g = self.groupings[spec] = groups_mod.assign(self.model, spec, self.names)
        return g

    def claim(self) -> None:
        """Mark a pass in progress on this model; a nested one (or another thread's that bypassed the per-model
        lock) raises."""
        me = threading.current_thread().name
        if self.busy is not None:
            where = "this thread (a nested call)" if self.busy == me else f"thread {self.busy!r}"
            raise RuntimeError(
                f"another G-effect pass ({where}) is running on this model; its taps would fire in this one and mix "
                "both results. Measure one model from one pass at a time (measure() waits for another thread's pass "
                "on the same model), or give each thread its own copy of the model"
            )
        self.busy = me

    def release(self) -> None:
        self.busy = None

    def check_materialised(self) -> None:
        """A clear error for a model whose parameters are offloaded (on the meta device between forwards)."""
        if self.meta:
            raise ValueError(
                f"the model's parameters are on the meta device (e.g. {self.meta[0]!r}): it is offloaded (accelerate's "
                "cpu_offload / disk_offload, or device_map with offloading), and its weights are put in by hooks for "
                "each forward, out of the taps' sight. Load it onto one device without offloading to measure it"
            )

    def check_not_inference(self, trainable_only: bool = False) -> None:
        """The clear error of :func:`geffect_fast.state.check_not_inference` for parameters made under inference
        mode (all of them, or only those that require grad)."""
        if self.inference:
            names = set(self.trainable()) if trainable_only else None
            if names is None or any(n in names for n in self.inference):
                check_not_inference(self.model, trainable_only=trainable_only)


_MAPS: weakref.WeakKeyDictionary[nn.Module, ModuleMap] = weakref.WeakKeyDictionary()


def module_map(model: nn.Module) -> ModuleMap:
    """``model``'s :class:`ModuleMap` (``model`` unwrapped already), made anew when its tree changed."""
    mm = _MAPS.get(model)
    if mm is None or not mm.current():
        mm = _MAPS[model] = ModuleMap(model)
    return mm
