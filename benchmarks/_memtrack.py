"""Peak bytes of tensors created inside a block, on any device, by watching every op's outputs.

A TorchDispatchMode sees each op; the storages of its outputs that did not exist before (not an input's,
not a view of something older) are counted until freed (weakref finalizers). Weights, directions and
batches made before the block are not counted, so the peak is what the block itself adds: activations,
logits, gradients and transient tiles — the quantities ``geffect_fast.memory`` predicts. CPU-friendly
(``torch.cuda.max_memory_allocated`` needs a GPU).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                self._seen[t.untyped_storage()] = 0  # older than the block: not counted
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, n)
        return out
