"""A short offline example: a tiny Llama learns a few fictitious facts, then we measure, per layer and per
instance, how one step of gradient ascent (GA) and of gradient difference (GD) on the forget set would
move the risk on the forget and the retain set — and check the first-order prediction against a real step.

Everything is built here: byte-level tokens, a seeded synthetic QA set, a model from a config. No hub.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .api import measure
from .direction import Direction
from .loss import IGNORE_INDEX, risk
from .result import Result

PAD, EOS = 256, 257
VOCAB = 258

_FIRST = [
    "Aria",
    "Bexley",
    "Corin",
    "Dalia",
    "Evander",
    "Fenna",
    "Galen",
    "Hesper",
    "Ilse",
    "Joran",
    "Kestrel",
    "Liora",
    "Maren",
    "Nico",
    "Orla",
    "Pell",
]
_LAST = ["Vell", "Quist", "Ambry", "Solenne", "Tarrow", "Whitlock", "Oyelaran", "Marchetti"]
_PLACES = ["Tarsk", "Veloria", "Quinmouth", "Halden Cross", "Port Ysolde", "Mirrowfell", "Ashgrove", "Lunet"]
_GENRES = ["maritime mystery", "quiet fantasy", "urban memoir", "folk horror", "comic verse", "epistolary romance"]


def synthetic_qa(n: int = 16, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs about fictitious authors, deterministic by ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"{_FIRST[i % len(_FIRST)]} {rng.choice(_LAST)}"
        if i % 2 == 0:
            out.append((f"Where was {name} born?", f"{name} was born in {rng.choice(_PLACES)}."))
        else:
            out.append((f"What does {name} write?", f"{name} writes {rng.choice(_GENRES)}."))
    return out


def encode(pairs: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Byte-level batch: the question is an unlabelled prompt; the answer and one EOS are labelled; right
    padding."""
    rows = []
    for q, a in pairs:
        p = list(f"Q: {q}\nA: ".encode())
        ans = list(a.encode()) + [EOS]
        rows.append((p, ans))
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (p, a) in enumerate(rows):
        seq = p + a
        ids[b, : len(seq)] = torch.tensor(seq)
        labels[b, len(p) : len(seq)] = torch.tensor(a)
        mask[b, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_llama(seed: int = 0):
    """A 4-block Llama of hidden size 64 (about 0.2M parameters) with a byte-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def run_demo(
    out: str | Path | None = None, steps: int = 80, seed: int = 0, echo: Callable[[str], None] = print
) -> Result:
    """Run the example; print the table; write ``geffects.json`` to ``out`` if given."""
    t0 = time.perf_counter()
    qa = synthetic_qa(16, seed)
    forget, retain = encode(qa[:8]), encode(qa[8:])
    both = encode(qa)
    model = tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = risk(model, both)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    echo(
        f"fine-tuned a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama on 16 fictitious "
        f"facts for {steps} steps: NLL forget {risk(model, forget).item():.3f}, retain {risk(model, retain).item():.3f}"
    )

    def ga(m, batch, ref):  # gradient ascent: minimise −R_forget
        return -risk(m, batch)

    def gd(m, batch, ref):  # gradient difference: −R_forget + R_retain
        return -risk(m, batch["forget"]) + risk(m, batch["retain"])

    v = Direction.stack(
        {
            "GA": Direction.from_objective(model, ga, forget),
            "GD": Direction.from_objective(model, gd, {"forget": forget, "retain": retain}),
        }
    )
    res = measure(model, v, {"unlearn": forget, "retain": retain}, groups="block", per_instance=True)
    echo("")
    echo(str(res))
    echo(
        "Reading: the unlearning G-effect should be strongly negative (the step raises forget NLL) and the\n"
        "retaining G-effect should stay >= 0; per-group rows show which layers carry each."
    )

    # first order, checked: one real step θ' = θ − lr·v changes R by about −lr·e
    lr = 1e-3
    echo("\nfidelity of the first-order prediction, one step of lr=1e-3:")
    echo(f"{'direction':<10}{'risk':<9}{'predicted dR':>14}{'measured dR':>14}")
    for name in v.names:
        vd = v[name]
        before = {"unlearn": risk(model, forget).item(), "retain": risk(model, retain).item()}
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.sub_(lr * vd.tensor(n)[0])
            after = {"unlearn": risk(model, forget).item(), "retain": risk(model, retain).item()}
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        for r in ("unlearn", "retain"):
            echo(f"{name:<10}{r:<9}{-lr * res.total[name][r]:>14.3e}{after[r] - before[r]:>14.3e}")
    echo(f"\n(GA identity: e_unlearn(GA) = -|grad R_forget|^2 = {res.total['GA']['unlearn']:.4e})")
    echo(f"done in {time.perf_counter() - t0:.1f}s")
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "geffects.json").write_text(json.dumps(res.to_dict(), indent=1))
        echo(f"wrote {path / 'geffects.json'}")
    return res
