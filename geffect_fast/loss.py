"""The risk: negative log-likelihood of labelled tokens, as Hugging Face causal LMs define it.

A batch is a dict with ``input_ids`` [B, T], ``labels`` [B, T] (−100 = ignored) and optionally
``attention_mask``, ``position_ids``, ``token_type_ids``. Labels are shifted: the logits at position t
predict ``labels[:, t + 1]``.

Per sample b with n_b labelled tokens, ℓ_b = (1/n_b) Σ_{t∈b} nll_t. The risk pools them:

* ``token_mean`` (the paper's code, HF's ``.loss``): R = Σ_t nll_t / N = Σ_b (n_b/N) ℓ_b, N = Σ_b n_b;
* ``sample_mean``: R = (1/B') Σ_{b: n_b>0} ℓ_b, over the B' samples that have labelled tokens.

Both are R = Σ_b c_b ℓ_b with the weights c_b of :func:`sample_weights`.

**Packed rows.** A batch packed as HF's ``DataCollatorWithFlattening`` packs it holds several samples per row:
no attention mask, ``position_ids`` restarting at 0 inside a row (or ``seq_idx`` naming each position's
sequence), the first label of each sample −100; the collator's ``cu_seq_lens_*``, ``max_length_*`` and
``seq_idx`` go to the model (:data:`PACKING_KEYS`). The samples are then the packed samples, in packing order
(:func:`packed_samples`): every per-sample quantity — n_b, ℓ_b, the weights c_b, per-instance G-effects — is
per packed sample, and the NLL at position t belongs to the sample that owns its label, position t + 1.
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
#: a packed batch's keys (HF DataCollatorWithFlattening), passed to the model as they are
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


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


def packed_samples(batch: Mapping[str, Any]) -> Tensor | None:
    """[B, T] the packed sample of every position (0 … P − 1 in packing order) when some row holds several
    samples, else None. A new sample starts where ``seq_idx`` changes, or — in a batch without an attention mask,
    as Hugging Face's models read it (they build the block-causal mask from the position ids only then) — where
    ``position_ids`` do not step by one. With an attention mask the model attends across the whole row, so the
    row is the sample. Reads the batch on the host (before any forward)."""
    ids = batch["input_ids"]
    B, T = ids.shape
    seq = batch.get("seq_idx")
    pos = batch.get("position_ids")
    if isinstance(seq, Tensor) and seq.shape == ids.shape:
        start = torch.zeros_like(ids, dtype=torch.bool)
        start[:, 1:] = seq[:, 1:] != seq[:, :-1]
    elif isinstance(pos, Tensor) and pos.shape == ids.shape and batch.get("attention_mask") is None:
        start = torch.zeros_like(ids, dtype=torch.bool)
        start[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    else:
        return None
    if not bool(start.any()):
        return None
    start[:, 0] = True
    return (start.reshape(-1).long().cumsum(0) - 1).reshape(B, T)


def packed_spans(packed: Tensor) -> list[list[int]]:
    """[row, first position, end position) of every packed sample, in packing order."""
    out: list[list[int]] = []
    B, T = packed.shape
    flat = packed.reshape(-1).tolist()
    for i, j in enumerate(flat):
        if i == 0 or j != flat[i - 1]:
            out.append([i // T, i % T, i % T + 1])
        else:
            out[-1][2] += 1
    return out


def sample_counts(batch: Mapping[str, Any], packed: Tensor | None = None) -> Tensor:
    """n_b, the labelled tokens of each sample (of each packed sample where ``packed`` is given, see
    :func:`packed_samples`; labels are shifted, so a row's first position never counts)."""
    labels = batch["labels"]
    if packed is None:
        return label_counts(labels)
    owner = packed[:, 1:].reshape(-1)
    P = int(packed[-1, -1]) + 1
    lab = (labels[:, 1:] != IGNORE_INDEX).reshape(-1).long()
    return torch.zeros(P, dtype=torch.long, device=labels.device).index_add_(0, owner.to(labels.device), lab)


def per_token(values: Tensor, packed: Tensor | None) -> Tensor:
    """Per-sample ``values`` [B or P] as a weight of each NLL position [B, T − 1] (or [B, 1] to broadcast): a
    position's NLL belongs to the sample that owns its label, position t + 1."""
    if packed is None:
        return values[:, None]
    return values[packed[:, 1:]]


def per_sample_sums(nll: Tensor, packed: Tensor | None) -> Tensor:
    """Σ_t nll_t per sample (per packed sample, by the owner of each position's label)."""
    if packed is None:
        return nll.sum(1)
    P = int(packed[-1, -1]) + 1
    return nll.new_zeros(P).index_add_(0, packed[:, 1:].reshape(-1), nll.reshape(-1))


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run the model on a batch (no cache) and return its logits [B, T, vocab]."""
    kwargs = {k: batch[k] for k in FORWARD_KEYS if batch.get(k) is not None}
    for k in PACKING_KEYS:
        if batch.get(k) is not None:
            kwargs[k] = batch[k]
    if _takes_use_cache(type(model)):
        kwargs["use_cache"] = False
    out = model(input_ids=batch["input_ids"], **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError("the model's forward must return logits [B, T, vocab] (or an output with .logits)")
    T = batch["input_ids"].shape[1]
    if logits.shape[1] != T:
        extra = _virtual_tokens(model)
        if extra is None or logits.shape[1] != T + extra:
            raise ValueError(
                f"the model returned logits for {logits.shape[1]} positions of a batch of {T}: the risk's labels "
                "cannot be matched to them (a model that prepends tokens of its own?)"
            )
        logits = logits[:, extra:]  # PEFT prompt learning prepends its virtual tokens: they have no labels
    return logits


def _virtual_tokens(model: nn.Module) -> int | None:
    """The virtual tokens a PEFT prompt-learning model (prompt tuning, p-tuning) prepends, or None."""
    configs = getattr(model, "peft_config", None)
    name = getattr(model, "active_adapter", None)
    cfg = configs.get(name) if isinstance(configs, Mapping) and isinstance(name, str) else None
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        n = getattr(cfg, "num_virtual_tokens", None)
        return int(n) if isinstance(n, int) else None
    return None


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


def sample_weights(n: Tensor, reduction: str) -> Tensor:
    """c, the reduction weights with R = Σ_b c_b ℓ_b, from the labelled-token counts n_b of one batch."""
    return reduction_weights(n, pool_size(n, reduction), reduction)


def sample_nll(logits: Tensor, labels: Tensor, packed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(ℓ, n): each sample's mean token NLL ℓ_b (0 for a sample with no labelled token) and n_b (per packed
    sample where ``packed`` is given, see :func:`packed_samples`)."""
    nll, mask = token_nll(logits, labels)
    n = per_sample_sums(mask.to(nll.dtype), packed).round().long() if packed is not None else mask.sum(1)
    return per_sample_sums(nll, packed) / n.clamp_min(1).to(nll.dtype), n


def risk(model: nn.Module, batch: Mapping[str, Tensor], reduction: str = "token_mean") -> Tensor:
    """R(batch) = Σ_b c_b ℓ_b, differentiable (the scalar whose gradient the G-effect dots); packed samples are
    the samples of a packed batch."""
    packed = packed_samples(batch)
    nll, _ = token_nll(forward_logits(model, batch), batch["labels"])
    n = sample_counts(batch, packed).to(nll.device)
    w = (sample_weights(n, reduction) / n.clamp_min(1)).to(nll.dtype)
    return (nll * per_token(w, packed)).sum()


def risk_parts(model: nn.Module, batch: Mapping[str, Tensor], reduction: str = "token_mean") -> tuple[Tensor, Tensor]:
    """(S, D) with R = S / D, so that the risk of several batches (ranks) pools as ΣS / ΣD.

    ``token_mean``: S = Σ_t nll_t, D = N labelled tokens; ``sample_mean``: S = Σ_b ℓ_b, D = B' samples
    with labels. Both float64, detached.
    """
    packed = packed_samples(batch)
    with torch.no_grad():
        nll, _ = token_nll(forward_logits(model, batch), batch["labels"])
        n = sample_counts(batch, packed).to(nll.device)
        D = pool_size(n, reduction).double()
        if reduction == "token_mean":
            S = nll.sum()
        else:
            S = (per_sample_sums(nll, packed) / n.clamp_min(1).to(nll.dtype)).sum()
        return S.double(), D


def has_labels(batch: Mapping[str, Tensor]) -> bool:
    """Whether ``batch`` holds a labelled token (a shifted label that is not ignored)."""
    return bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())


def row_chunks(batch: Mapping[str, Tensor], size: int | None) -> list[dict[str, Tensor]]:
    """``batch`` split into consecutive chunks of ``size`` rows (entries whose first dimension is not the batch
    size, e.g. a broadcast ``position_ids`` [1, T], are passed whole); one chunk when ``size`` is None."""
    B = batch["input_ids"].shape[0]
    if size is None or size >= B:
        return [dict(batch)]

    def rows(v: Any, i: int) -> Any:
        return v[i : i + size] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v

    return [{k: rows(v, i) for k, v in batch.items()} for i in range(0, B, size)]


def weighted_chunks(
    chunks: list[dict[str, Tensor]], D: Tensor | float, reduction: str
) -> list[tuple[float, dict[str, Tensor]]]:
    """(w_c, chunk) for the ``chunks`` of a batch that hold a labelled token, w_c = D_c / D (D the whole batch's
    :func:`pool_size`): R(batch) = Σ_c w_c R(chunk) exactly, and so ∇R and ∇²R."""
    out = []
    for c in chunks:
        if has_labels(c):
            out.append((float(pool_size(sample_counts(c, packed_samples(c)).cpu(), reduction)) / float(D), c))
    return out
