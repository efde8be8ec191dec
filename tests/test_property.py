"""Randomised property suite: measure() against the float64 per-sample autograd oracle on tiny random models
of every causal-LM family the tests know (tests/helpers.py: ALL_FAMILIES + MORE_FAMILIES + MOE_FAMILIES, 38
families, FalconLinear and CohereLayerNorm by their adapters, seven mixture-of-experts families with their fused
experts and top-k routers per sample — per expert with ``groups="module"``), with random batches (left or right padding, uneven
lengths, samples without labelled tokens), random sparse directions (whole entries zero, entries zero in
part, K = 1–3), random reductions and group schemes.

Bounds are tests/test_oracle.py's, float64: per instance, max_b |ours − oracle| ≤ 1e-6 · max_b |oracle| in
every (direction, group) column; per group total, |ours − Σ_b c_b e_b| ≤ 1e-6 · Σ_b c_b |e_b| (the scale of
the sum's terms, so that a total that cancels to near zero is not held to a bound its terms cannot meet).
Both scales are floored at 1e-9 of the case's largest value: a column that is zero in exact arithmetic (a
key projection's bias, by the softmax's shift invariance) holds rounding noise (~1e-19) that no relative
bound can compare. Families whose norm layers compute in float32 even in a float64 model (Gemma, Gemma2,
Gemma3, Helium, Cohere: ``FLOAT32_INSIDE``) have an oracle that itself rounds at float32 in those layers —
its per-sample gradients are float32 sums over tokens — so they are held to test_oracle.py's float32 bound,
1e-4 (observed over 60 random cases each: ≤ 6.3e-6; the other families ≤ 2e-13).

Seeded: every case is drawn from ``GEFFECT_FAST_PROPERTY_SEED`` (default 0), the family and the case index,
so a run is reproducible and a failure prints the command that replays it. ``GEFFECT_FAST_PROPERTY_CASES``
(default 3) cases per family.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    ALL_FAMILIES,
    EAGER,
    MOE_FAMILIES,
    MORE_FAMILIES,
    VOCAB,
    assert_close_per_group,
    make_model,
    oracle,
    pad_id,
)

import geffect_fast as gf
from geffect_fast.capture import UnsupportedModuleError
from geffect_fast.groups import assign

BASE_SEED = int(os.environ.get("GEFFECT_FAST_PROPERTY_SEED", "0"))
CASES = int(os.environ.get("GEFFECT_FAST_PROPERTY_CASES", "3"))
FAMILIES = {**ALL_FAMILIES, **MORE_FAMILIES, **MOE_FAMILIES}
RTOL = 1e-6
#: families whose HF norms compute in float32 inside a float64 model: held to the float32 bound (see above)
FLOAT32_INSIDE = {"gemma", "gemma2", "gemma3", "helium", "cohere"}
RTOL_FLOAT32 = 1e-4
FLOOR = 1e-9  #: of the case's largest value: the smallest scale an error is judged relative to (see above)


@dataclass(frozen=True)
class Case:
    """One random draw: model, batch and direction."""

    family: str
    index: int
    seed: int
    layers: int
    B: int
    T: int
    side: str
    lengths: tuple[int, ...]
    prompts: tuple[int, ...]
    empty: tuple[bool, ...]
    K: int
    reduction: str
    groups: str

    def replay(self) -> str:
        return (
            f"GEFFECT_FAST_PROPERTY_SEED={BASE_SEED} pytest -q "
            f"'tests/test_property.py::test_random_case_against_oracle[{self.family}-{self.index}]'"
        )


def draw(family: str, index: int) -> Case:
    seed = zlib.crc32(f"{BASE_SEED}/{family}/{index}".encode())
    rng = random.Random(seed)
    B = rng.randint(1, 5)
    T = rng.randint(3, 12)
    lengths = tuple(rng.randint(2, T) for _ in range(B))
    prompts = tuple(rng.randint(1, L - 1) for L in lengths)
    empty = [rng.random() < 0.25 for _ in range(B)]
    if all(empty):
        empty[rng.randrange(B)] = False
    return Case(
        family=family,
        index=index,
        seed=seed,
        layers=rng.randint(1, 2),
        B=B,
        T=T,
        side="right" if family in EAGER else rng.choice(["left", "right"]),
        lengths=lengths,
        prompts=prompts,
        empty=tuple(empty),
        K=rng.randint(1, 3),
        reduction=rng.choice(["token_mean", "sample_mean"]),
        groups=rng.choice(["block", "block", "paper", "module"]),
    )


def build(case: Case):
    """(model, batch, direction, dense V for the oracle) of a case."""
    model = make_model(case.family, seed=case.seed % 10_000, layers=case.layers)
    g = torch.Generator().manual_seed(case.seed)
    B, T = case.B, case.T
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b, (L, P) in enumerate(zip(case.lengths, case.prompts)):
        s = 0 if case.side == "right" else T - L
        mask[b, s : s + L] = 1
        if not case.empty[b]:
            labels[b, s + P : s + L] = ids[b, s + P : s + L]
    ids[mask == 0] = pad_id(model)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # sparse directions: some entries zero as a whole (listed, or stored as zeros), the rest zero in part
    tensors, zero, dense = {}, [], {}
    for name, p in model.named_parameters():
        u = torch.rand((), generator=g).item()
        v = torch.randn((case.K, *p.shape), generator=g, dtype=torch.float64)
        if u < 0.15:
            zero.append(name)
            v.zero_()
        else:
            if u < 0.25:
                v.zero_()
            elif u < 0.6:
                v *= torch.rand(v.shape, generator=g, dtype=torch.float64) < 0.5
            elif u < 0.7 and case.K > 1:
                v[torch.randint(case.K, (), generator=g)] = 0
            tensors[name] = v
        dense[name] = v
    if not any(bool(t.any()) for t in tensors.values()):  # keep at least one nonzero entry
        name = next(iter(tensors or dense))
        dense[name] = tensors[name] = torch.randn((case.K, *dense[name].shape[1:]), generator=g, dtype=torch.float64)
        zero = [z for z in zero if z != name]
    names = [f"d{k}" for k in range(case.K)]
    return model, batch, gf.Direction(tensors, names=names, zero=zero), dense


def relative_errors(case: Case):
    """(per-instance error, per-group-total error) of one case, relative as the module docstring says."""
    model, batch, direction, dense = build(case)
    res = gf.measure(model, direction, {"r": batch}, groups=case.groups, per_instance=True, reduction=case.reduction)
    grouping = assign(model, case.groups, [n for n, _ in model.named_parameters()])
    assert res.groups == grouping.names
    e, c = oracle(model, dense, batch, {**grouping.of, **grouping.parts}, len(grouping), case.reduction)
    rtol = RTOL_FLOAT32 if case.family in FLOAT32_INSIDE else RTOL
    ours, floor = res.instances["r"], FLOOR * e.abs().max().item()
    inst = ((ours - e).abs().amax(1) / e.abs().amax(1).clamp_min(floor)).max().item()
    assert inst <= rtol, f"per instance: relative error {inst:.3e} > {rtol:.0e}; replay: {case.replay()}; {case}"
    terms = (e.abs() * c[None, :, None]).sum(1)
    totals = (e * c[None, :, None]).sum(1)
    err = ((res.group_totals["r"] - totals).abs() / terms.clamp_min(FLOOR * terms.max().item())).max().item()
    assert err <= rtol, f"per group total: relative error {err:.3e} > {rtol:.0e}; replay: {case.replay()}; {case}"
    # the weights are the reduction's; samples without labels weigh nothing and measure zero
    assert torch.allclose(res.weights["r"], c, rtol=1e-12, atol=0)
    for b in range(case.B):
        if res.n_tokens["r"][b] == 0:
            assert torch.all(res.instances["r"][:, b] == 0)
    return inst, err


CASE_IDS = [(f, k) for f in FAMILIES for k in range(CASES)]


@pytest.mark.parametrize("family,index", CASE_IDS, ids=[f"{f}-{k}" for f, k in CASE_IDS])
def test_random_case_against_oracle(family, index):
    relative_errors(draw(family, index))


def test_the_suite_covers_twenty_families_and_its_draws_vary():
    assert len(FAMILIES) >= 20
    draws = [draw(f, k) for f, k in CASE_IDS]
    assert {d.side for d in draws} == {"left", "right"}
    assert {d.K for d in draws} == {1, 2, 3}
    assert any(any(d.empty) for d in draws) and any(len(set(d.lengths)) > 1 for d in draws)
    assert {d.reduction for d in draws} == {"token_mean", "sample_mean"}
    assert draw("llama", 0) == draw("llama", 0)  # reproducible


# -- packed batches ----------------------------------------------------------------------------------------------
def _packed(batch):
    """The batch's samples packed into one row (HF DataCollatorWithFlattening's layout), and the same samples
    unpacked with their first label −100 (as packing sets it)."""
    from geffect_fast.data import pack

    rows, plain = [], {k: v.clone() for k, v in batch.items()}
    for b in range(batch["input_ids"].shape[0]):
        m = batch["attention_mask"][b].bool()
        lab = batch["labels"][b][m].tolist()
        rows.append((batch["input_ids"][b][m].tolist(), [-100] + lab[1:]))
        plain["labels"][b, int(m.nonzero()[0])] = -100
    return pack(rows), plain


PACKED_IDS = [(f, k) for f in sorted(FAMILIES) for k in range(1)]


@pytest.mark.parametrize("family,index", PACKED_IDS, ids=[f"{f}-{k}" for f, k in PACKED_IDS])
def test_random_packed_case(family, index):
    """A random case's samples packed into one row: measured per packed sample exactly as the oracle has them
    unpacked — or, for a model that attends across packed samples (no block-causal mask from the position ids),
    refused with the reason, never measured per row."""
    case = draw(family, index)
    model, batch, direction, dense = build(case)
    if not bool((batch["labels"][:, 1:] != -100).any()):
        pytest.skip("no labelled token")
    packed, plain = _packed(batch)
    try:
        res = gf.measure(model, direction, {"r": packed}, per_instance=True, reduction=case.reduction)
    except ValueError as e:
        assert "attends across the packed samples" in str(e), e
        return
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    e = _packed_oracle(model, dense, packed, grouping.of, len(grouping))
    rtol = RTOL_FLOAT32 if family in FLOAT32_INSIDE else RTOL
    ours, floor = res.instances["r"], FLOOR * e.abs().max().item()
    err = ((ours - e).abs().amax(1) / e.abs().amax(1).clamp_min(floor)).max().item()
    assert ours.shape[1] == case.B and err <= rtol, f"{family}: packed per instance {err:.3e}; {case}"


def _packed_oracle(model, V, packed, group_of, G):
    """Per packed sample j, autograd of ℓ_j — the mean NLL of its labelled positions in the packed row, on the packed
    forward itself — dotted with V per group, float64 (the definition, whatever the model does with the row)."""
    from geffect_fast.loss import forward_logits, packed_samples, token_nll

    found = packed_samples(packed)  # None: one sample, a row of its own
    owner = (torch.zeros_like(packed["input_ids"]) if found is None else found)[:, 1:]
    params = dict(model.named_parameters())
    names = list(V)
    K = next(iter(V.values())).shape[0]
    P = int(owner.max()) + 1
    e = torch.zeros(K, P, G, dtype=torch.float64)
    for j in range(P):
        nll, mask = token_nll(forward_logits(model, packed), packed["labels"])
        sel = (owner == j) & mask
        if not bool(sel.any()):
            continue
        ell = (nll * sel).sum() / sel.sum()
        grads = torch.autograd.grad(ell, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                e[:, j, group_of[n]] += (V[n].reshape(K, -1) @ g.reshape(-1).double()).double()
    return e


# -- exotic forwards ---------------------------------------------------------------------------------------------
def _exotic(model, rng):
    """Give 1–3 random linear layers and maybe the input embedding a forward of another kind: faithful ones (the same
    map written otherwise) and unfaithful ones (a transformed weight, a gather). Returns the parameters whose use
    the taps cannot vouch for."""
    import torch.nn.functional as F
    from torch import nn

    lins = [m for m in model.modules() if type(m) is nn.Linear]
    unfaithful: set[str] = set()
    names = {id(p): n for n, p in model.named_parameters()}
    for lin in rng.sample(lins, min(len(lins), rng.randint(1, 3))):
        kind = rng.choice(["same", "twice", "scaled", "transposed"])
        if kind == "same":
            lin.forward = lambda x, m=lin: F.linear(x, m.weight, m.bias) * 1.0
        elif kind == "twice":
            lin.forward = lambda x, m=lin: 0.5 * F.linear(x, m.weight, m.bias) + 0.5 * F.linear(x, m.weight, m.bias)
        elif kind == "scaled":
            lin.forward = lambda x, m=lin: F.linear(x, 0.5 * m.weight, m.bias)
        else:
            lin.forward = lambda x, m=lin: x @ m.weight.T + (0 if m.bias is None else m.bias)
        if kind in ("scaled", "transposed"):
            unfaithful |= {names[id(p)] for p in lin.parameters(recurse=False)}
    emb = model.get_input_embeddings()
    if type(emb) is nn.Embedding and rng.random() < 0.5:
        if rng.random() < 0.5:
            emb.forward = lambda ids, m=emb: F.embedding(ids, m.weight)  # no padding_idx: its row gets gradient
        else:
            emb.forward = lambda ids, m=emb: m.weight[ids]
            unfaithful.add(names[id(emb.weight)])
    return unfaithful


EXOTIC_IDS = [(f, k) for f in ("llama", "qwen2", "gpt_neox", "opt") for k in range(2)]


@pytest.mark.parametrize("family,index", EXOTIC_IDS, ids=[f"{f}-{k}" for f, k in EXOTIC_IDS])
def test_random_exotic_forwards_are_exact_or_refused(family, index):
    """Forwards set on random modules: with strict=True either exact or refused; with strict=False the parameters
    the taps cannot vouch for go by autograd (exact totals) and every other column is exact per instance."""
    case = draw(family, index)
    model, batch, direction, dense = build(case)
    unfaithful = _exotic(model, random.Random(case.seed))
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    measured = {n for n in direction.keys() if bool(direction.tensor(n).any())}
    bad = unfaithful & measured
    if not bad:
        res = gf.measure(model, direction, {"r": batch}, per_instance=True, reduction=case.reduction)
        e, _ = oracle(model, dense, batch, grouping.of, len(grouping), case.reduction)
        assert_close_per_group(res.instances["r"], e, RTOL, f"{family} exotic, exact")
        return
    with pytest.raises(UnsupportedModuleError):
        gf.measure(model, direction, {"r": batch}, reduction=case.reduction)
    res = gf.measure(model, direction, {"r": batch}, per_instance=True, reduction=case.reduction, strict=False)
    assert set(res.uncovered) == bad, (res.uncovered, bad)
    of = dict(grouping.of)
    for n in bad:
        of[n] = len(grouping)
    e, c = oracle(model, dense, batch, of, len(grouping) + 1, case.reduction)
    assert_close_per_group(res.instances["r"][:, :, :-1], e[:, :, :-1], 1e-6, f"{family} exotic, covered")
    totals = (e * c[None, :, None]).sum(1)
    assert_close_per_group(res.group_totals["r"][:, None], totals[:, None], 1e-6, f"{family} exotic, totals")
