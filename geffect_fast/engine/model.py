"""Facts about a model that every entry point needs: the module inside its wrappers, its input embeddings and
the device batches must be on."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import wrappers


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    *_, inner = wrappers(model)
    return inner


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module (HF ``get_input_embeddings``), or None where it has none."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        return None
    try:
        emb = get_in()
    except (AttributeError, NotImplementedError):  # pragma: no cover - models without one
        return None
    return emb if isinstance(emb, nn.Module) else None


def input_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where batches must live)."""
    emb = input_embeddings(model)
    if emb is not None and isinstance(getattr(emb, "weight", None), torch.Tensor):
        return emb.weight.device
    for p in model.parameters():
        return p.device
    raise ValueError("the model has no parameters")
