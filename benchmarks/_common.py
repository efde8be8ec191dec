"""What the benchmark scripts share: the Llama cases, the three methods compared end to end, and the
process-memory readings of the CPU runs."""

from __future__ import annotations

import csv
import os
import platform
import resource
from typing import Callable

import torch


# -- memory (CPU runs: one method per process) ---------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Give free heap memory back to the OS (so that it cannot hide a method's allocations), then reset the
    kernel's peak-RSS mark (VmHWM), so the peak covers what follows only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def write_csv(path, rows: list[dict], keys: list[str]) -> None:
    """Rows as CSV with the columns ``keys`` (other keys of a row are left out)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.machine()


# -- the end-to-end cases -------------------------------------------------------------------------------
def llama_model(hidden: int, layers: int, inter: int, heads: int, vocab: int, max_positions: int = 128):
    """A randomly initialised Llama (seed 0, eval mode), untied head, as many KV heads as heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def padded_batch(B: int, T: int, vocab: int, generator: torch.Generator, low: int = 0, vary: bool = True):
    """Random ids in [low, vocab); the first quarter of each row is a masked prompt; with ``vary`` the rows
    have varied lengths (right padding, up to 3T/16 short)."""
    ids = torch.randint(low, vocab, (B, T), generator=generator)
    labels = ids.clone()
    labels[:, : T // 4] = -100
    mask = torch.ones_like(ids)
    if vary:
        for b in range(B):
            cut = T - (b % 4) * (T // 16)
            mask[b, cut:] = 0
            labels[b, cut:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def llama_case(
    hidden: int,
    layers: int,
    inter: int,
    heads: int,
    vocab: int,
    B: int,
    T: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """(model, batch, V): a random Llama, a :func:`padded_batch`, and a random direction over every
    parameter."""
    model = llama_model(hidden, layers, inter, heads, vocab, max(T, 128)).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    batch = {k: t.to(device) for k, t in padded_batch(B, T, vocab, g).items()}
    V = {n: torch.randn(p.shape, generator=g).to(device=device, dtype=dtype) for n, p in model.named_parameters()}
    return model, batch, V


def methods(model, batch, V) -> dict[str, Callable[[], torch.Tensor | None]]:
    """The methods compared end to end; each returns its per-instance, per-group values (or None).

    - plain_fwd_bwd: one ordinary forward+backward of the batch (weight gradients on): the floor
    - measure: geffect_fast.measure(per_instance=True), backend "auto"
    - per_sample_loop: one forward+backward per sample, gradients dotted with V per group
    """
    import geffect_fast as gf
    from geffect_fast.groups import assign
    from geffect_fast.loss import forward_logits, sample_nll

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    grouping = assign(model, "block", names)
    direction = gf.Direction(V, "v")
    gidx = torch.tensor([grouping.of[n] for n in names])
    B = batch["input_ids"].shape[0]

    def plain_fwd_bwd():
        gf.risk(model, batch).backward()
        for p in model.parameters():
            p.grad = None

    def measure():
        return gf.measure(model, direction, {"r": batch}, per_instance=True).per_instance["r"]

    def per_sample_loop():
        out = torch.zeros(B, len(grouping), dtype=torch.float64)
        for b in range(B):
            sub = {k: t[b : b + 1] for k, t in batch.items()}
            ell, _ = sample_nll(forward_logits(model, sub), sub["labels"])
            grads = torch.autograd.grad(ell.sum(), [params[n] for n in names])
            dots = torch.stack([(gr.float() * V[n].float()).sum() for gr, n in zip(grads, names)]).double().cpu()
            out[b].index_add_(0, gidx, dots)
        return out

    return {"plain_fwd_bwd": plain_fwd_bwd, "measure": measure, "per_sample_loop": per_sample_loop}
