"""The risk: negative log-likelihood of labelled tokens, as Hugging Face causal LMs define it.

A batch is a dict with ``input_ids`` [B, T], ``labels`` [B, T] (−100 = ignored) and optionally
``attention_mask``, ``position_ids``, ``token_type_ids``. Labels are shifted: the logits at position t
predict ``labels[:, t + 1]``.

Per sample b with n_b labelled tokens, ℓ_b = (1/n_b) Σ_{t∈b} nll_t. The risk pools them:

* ``token_mean`` (the paper's code, HF's ``.loss``): R = Σ_t nll_t / N = Σ_b (n_b/N) ℓ_b, N = Σ_b n_b;
* ``sample_mean``: R = (1/B') Σ_{b: n_b>0} ℓ_b, over the B' samples that have labelled tokens.

Both are R = Σ_b c_b ℓ_b with the weights c_b of :func:`sample_weights`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
REDUCTIONS = ("token_mean", "sample_mean")
#: batch keys passed to the model's forward (besides input_ids)
FORWARD_KEYS = ("attention_mask", "position_ids", "token_type_ids")


def check_batch(batch: Any, name: str, device: torch.device | None = None) -> None:
    """Raise a clear error for a batch that cannot be measured."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"risk set {name!r}: a batch must be a dict with input_ids and labels, got {type(batch).__name__}"
        )
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"risk set {name!r}: batch has no {key!r} (keys: {', '.join(map(str, batch))})")
    ids, labels = batch["input_ids"], batch["labels"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"risk set {name!r}: input_ids must be a [B, T] tensor")
    for key, t in (("input_ids", ids), ("labels", labels)):
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"risk set {name!r}: {key} must be integer token ids (int64), got {t.dtype}")
    for key in ("labels", *FORWARD_KEYS):
        t = batch.get(key)
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"risk set {name!r}: {key} must be a tensor, got {type(t).__name__}")
        if key != "position_ids" and t.shape != ids.shape:
            raise ValueError(
                f"risk set {name!r}: {key} has shape {tuple(t.shape)} but input_ids has {tuple(ids.shape)}"
            )
        if t.device != ids.device:
            raise ValueError(f"risk set {name!r}: {key} is on {t.device} but input_ids on {ids.device}")
    if device is not None and ids.device != device:
        raise ValueError(
            f"risk set {name!r}: the batch is on {ids.device} but the model's input embeddings are on {device}; "
            "move the batch (or the model) first"
        )
    if ids.shape[0] == 0:
        raise ValueError(f"risk set {name!r}: the batch is empty")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError(
            f"risk set {name!r}: no labelled tokens (every label after the first position is {IGNORE_INDEX}); "
            "nothing to measure"
        )


def check_causal_lm(model: nn.Module) -> None:
    """Refuse Hugging Face models whose outputs are not next-token predictions: encoder-decoders, masked LMs
    (BERT-style ``*ForMaskedLM``), and encoder families' causal-LM heads without ``config.is_decoder``, whose
    attention is still bidirectional. R is the NLL of *shifted* labels; on these it would be a number with
    no meaning, not an error. Models that are not Hugging Face ``PreTrainedModel`` s are taken as causal."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model; the risk is the causal-LM NLL of shifted labels, which only "
            "decoder-only causal LMs (AutoModelForCausalLM) define"
        )
    causal, masked, masked_types = _hf_lm_classes()
    if name in masked and name not in causal:
        raise ValueError(
            f"{name} is a masked LM: it predicts masked tokens from both sides, not the next token, so the causal-LM "
            "NLL of shifted labels measured on it would mean nothing; use a causal LM (AutoModelForCausalLM)"
        )
    if name in causal and config.model_type in masked_types:
        if not getattr(config, "is_decoder", False):
            raise ValueError(
                f"{name} without config.is_decoder=True attends in both directions (a masked LM's encoder); build "
                "it with is_decoder=True to measure it as a causal LM"
            )


@functools.cache
def _hf_lm_classes() -> tuple[frozenset, frozenset, frozenset]:
    """(causal-LM class names, masked-LM class names, masked-LM model types) from transformers' auto maps."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except Exception:  # pragma: no cover - transformers missing or broken: nothing to check against
        return frozenset(), frozenset(), frozenset()

    def names(mapping) -> set[str]:
        out: set[str] = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (tuple, list)) else (v,))
        return out

    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return frozenset(names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)), frozenset(names(masked)), frozenset(masked)


def label_counts(labels: Tensor) -> Tensor:
    """n_b: the labelled tokens of each sample (labels are shifted, so the first position never counts)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run the model on a batch (no cache) and return its logits [B, T, vocab]."""
    kwargs = {k: batch[k] for k in FORWARD_KEYS if batch.get(k) is not None}
    if _takes_use_cache(type(model)):
        kwargs["use_cache"] = False
    out = model(input_ids=batch["input_ids"], **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError("the model's forward must return logits [B, T, vocab] (or an output with .logits)")
    return logits


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` accepts ``use_cache`` (HF models do; a plain nn.Module may not)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL of the shifted labels, and the mask of labelled positions, both [B, T−1].

    Computed in float32 (float64 for float64 logits); ignored positions hold 0.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # shift the labels, not the logits (as HF does): slicing [B, T, vocab] logits would copy them
    lb = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    lg = logits.to(acc)
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(lb.shape)[:, :-1], (lb != IGNORE_INDEX)[:, :-1]


def pool_size(n: Tensor, reduction: str) -> Tensor:
    """D, what the weights divide by: N = Σ_b n_b (``token_mean``) or B' = #{b: n_b > 0} (``sample_mean``).
    Sums over batches (ranks) pool: the union's D is the sum of theirs."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    return n.sum() if reduction == "token_mean" else (n > 0).sum()


def reduction_weights(n: Tensor, D: Tensor | float, reduction: str) -> Tensor:
    """c_b = n_b / D (``token_mean``) or [n_b > 0] / D (``sample_mean``), float64; D from :func:`pool_size`,
    of this batch or of a union of batches that contains it."""
    return (n.double() if reduction == "token_mean" else (n > 0).double()) / D


def sample_weights(mask: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """(c, n): the reduction weights c_b with R = Σ_b c_b ℓ_b, and the labelled-token counts n_b."""
    n = mask.sum(1)
    return reduction_weights(n, pool_size(n, reduction), reduction), n


def sample_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(ℓ, n): each sample's mean token NLL ℓ_b (0 for a sample with no labelled token) and n_b."""
    nll, mask = token_nll(logits, labels)
    n = mask.sum(1)
    return nll.sum(1) / n.clamp_min(1).to(nll.dtype), n


def risk(model: nn.Module, batch: Mapping[str, Tensor], reduction: str = "token_mean") -> Tensor:
    """R(batch) = Σ_b c_b ℓ_b, differentiable (the scalar whose gradient the G-effect dots)."""
    nll, mask = token_nll(forward_logits(model, batch), batch["labels"])
    c, n = sample_weights(mask, reduction)
    w = (c / n.clamp_min(1)).to(nll.dtype)
    return (nll * w[:, None]).sum()


def risk_parts(model: nn.Module, batch: Mapping[str, Tensor], reduction: str = "token_mean") -> tuple[Tensor, Tensor]:
    """(S, D) with R = S / D, so that the risk of several batches (ranks) pools as ΣS / ΣD.

    ``token_mean``: S = Σ_t nll_t, D = N labelled tokens; ``sample_mean``: S = Σ_b ℓ_b, D = B' samples
    with labels. Both float64, detached.
    """
    with torch.no_grad():
        nll, mask = token_nll(forward_logits(model, batch), batch["labels"])
        n = mask.sum(1)
        D = pool_size(n, reduction).double()
        S = nll.sum() if reduction == "token_mean" else (nll.sum(1) / n.clamp_min(1).to(nll.dtype)).sum()
        return S.double(), D
