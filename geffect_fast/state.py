"""Leave the model exactly as it was: ``.grad`` tensors, ``requires_grad`` flags, train/eval mode of every
module, and the RNG state (CPU, and every initialised CUDA device), also when the body raises — any
``BaseException``, ``KeyboardInterrupt`` included — and never hiding the body's own error behind one of the
restore.

A model is borrowed by one :func:`preserved` block at a time: a second thread entering :func:`preserved` on
the same model waits until the first is done (its flags and grads would otherwise be snapshotted half-way
through the other's pass, and the two passes' hooks would mix). The same thread may nest blocks.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager
from itertools import repeat
from operator import attrgetter, ne
from typing import Iterator, Sequence

import torch
from torch import nn

from .distributed import wrappers

MODES = ("eval", "train", "keep")

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _innermost(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers (what a pass really touches)."""
    *_, inner = wrappers(model)
    return inner


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises passes over ``model`` (one per model, across threads)."""
    key = _innermost(model)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
        return lock


def _unique_params(models: tuple[nn.Module | None, ...]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in models:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def is_inference(t: torch.Tensor) -> bool:
    """An inference tensor, or one that lost its version counter to one (``p.data = ...`` keeps it off)."""
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018 - the access is the check
    except RuntimeError:
        return True
    return False


def check_not_inference(*models: nn.Module | None, trainable_only: bool = False) -> None:
    """Raise a clear error for parameters created under ``torch.inference_mode()``: autograd cannot use them,
    and their ``requires_grad`` cannot even be set back once cleared. ``trainable_only``: check only those that
    require grad (a frozen reference model made under inference mode is fine where nothing differentiates it)."""
    for m in models:
        if m is None:
            continue
        for n, p in m.named_parameters():
            if (p.requires_grad or not trainable_only) and is_inference(p):
                raise RuntimeError(
                    f"the model's parameters are inference tensors (e.g. {n!r}): it was created or loaded under "
                    "torch.inference_mode(), and autograd cannot differentiate through such tensors. Create or "
                    "load it outside inference_mode (torch.no_grad() is fine), or replace them with normal copies: "
                    "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)"
                )


_GRAD = attrgetter("grad")
_REQUIRES_GRAD = attrgetter("requires_grad")
_TRAINING = attrgetter("training")


@contextmanager
def preserved(
    *models: nn.Module | None,
    mode: str = "keep",
    params: Sequence[nn.Parameter] | None = None,
    modules: Sequence[nn.Module] | None = None,
) -> Iterator[None]:
    """Take the models' locks, snapshot, yield, restore.

    Inside the block every parameter's ``.grad`` is None (the originals are put back afterwards, untouched),
    so any gradient accumulated inside lands in fresh tensors. ``mode`` "eval" or "train" switches the
    models for the duration; "keep" leaves them as they are. Trainable parameters created under inference mode
    are refused before anything is touched (their flag could not be set back).

    ``params`` and ``modules``: the models' unique parameters and all their modules, where the caller keeps them
    already (the engine does, per model, checked unchanged): the trees are then not walked again, and the
    inference-mode check is the caller's.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if params is None:
        check_not_inference(*models, trainable_only=True)
    present = {id(_innermost(m)): m for m in models if m is not None}
    with ExitStack() as locks:
        for key in sorted(present):  # one order for every thread: no deadlock between two-model blocks
            locks.enter_context(model_lock(present[key]))
        if params is None:
            params = _unique_params(models)
        if modules is None:
            modules = [m for model in models if model is not None for m in model.modules()]
        grads = list(map(_GRAD, params))
        flags = list(map(_REQUIRES_GRAD, params))
        training = list(map(_TRAINING, modules))
        cpu_rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            for p in params:
                p.grad = None
            want = mode == "train"
            if mode != "keep" and any(map(ne, training, repeat(want))):
                for model in models:
                    if model is not None:
                        model.train(want)
            yield
        except BaseException:
            _restore(params, grads, flags, modules, training, cpu_rng, cuda_rng)  # its errors never hide this one
            raise
        failed = _restore(params, grads, flags, modules, training, cpu_rng, cuda_rng)
        if failed:
            raise RuntimeError(f"could not restore the model's state: {failed[0]}") from failed[0]


def _restore(params, grads, flags, modules, training, cpu_rng, cuda_rng) -> list[BaseException]:
    """Put everything back, each item on its own (one failure does not stop the rest); return the failures."""
    failed: list[BaseException] = []
    for p, g, f in zip(params, grads, flags):
        try:
            p.grad = g
            if p.requires_grad != f:
                p.requires_grad = f
        except Exception as e:  # noqa: PERF203 - each parameter on its own
            failed.append(e)
    for m, t in zip(modules, training):
        if m.training != t:
            m.training = t
    try:
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    except Exception as e:
        failed.append(e)
    return failed
