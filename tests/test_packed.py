"""Packed rows, measured per packed sample: a batch packed as HF's DataCollatorWithFlattening packs it (several
samples in one row, position_ids restarting at 0, the first label of each sample −100) gives one per-instance row
per packed sample, in packing order, exactly what the same samples unpacked give — and the float64 oracle on
them — with the reductions, pairwise matrices, sketches and the Tracker following the packed samples."""

import pytest
import torch
from helpers import assert_close_per_group, make_batch, make_model, oracle, random_direction

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.data import pack
from geffect_fast.groups import assign
from geffect_fast.loss import forward_logits, packed_samples


def _rows(batch):
    """The batch's samples as (ids, labels) without padding, the first label of each −100 (as packing sets it)."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        m = batch["attention_mask"][i].bool()
        lab = batch["labels"][i][m].tolist()
        rows.append((batch["input_ids"][i][m].tolist(), [-100] + lab[1:]))
    return rows


def _unpacked(batch):
    """The same samples as a right-padded batch, their first label −100 too."""
    out = {k: v.clone() for k, v in batch.items()}
    for i in range(out["input_ids"].shape[0]):
        out["labels"][i, int(out["attention_mask"][i].nonzero()[0])] = -100
    return out


@pytest.fixture
def setup():
    model = make_model("llama")
    batch = make_batch(model, B=5, T=9)
    return model, pack(_rows(batch)), _unpacked(batch)


@pytest.mark.parametrize("reduction", ["token_mean", "sample_mean"])
def test_packed_samples_are_the_samples(setup, reduction):
    model, packed, plain = setup
    assert packed["input_ids"].shape[0] == 1
    V = random_direction(model, K=2)
    d = gf.Direction(V, names=["a", "b"])
    rp = gf.measure(model, d, {"r": packed}, per_instance=True, reduction=reduction)
    ru = gf.measure(model, d, {"r": plain}, per_instance=True, reduction=reduction)
    assert rp.instances["r"].shape == (2, 5, len(rp.groups))
    # Llama's RMSNorms compute in float32: two layouts of the same samples agree to its rounding
    assert_close_per_group(rp.instances["r"], ru.instances["r"], 1e-8, "per packed sample")
    assert torch.allclose(rp.group_totals["r"], ru.group_totals["r"], rtol=1e-8, atol=1e-12)
    assert rp.loss["r"] == pytest.approx(ru.loss["r"], rel=1e-10)
    assert torch.equal(rp.weights["r"], ru.weights["r"]) and torch.equal(rp.n_tokens["r"], ru.n_tokens["r"])
    spans = rp.meta["samples"]["r"]
    lengths = plain["attention_mask"].sum(1).tolist()
    assert [s[2] - s[1] for s in spans] == lengths and all(s[0] == 0 for s in spans)
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    e, _ = oracle(model, V, plain, grouping.of, len(grouping), reduction)
    assert_close_per_group(rp.instances["r"], e, 1e-9, "oracle")
    assert float(gf.risk(model, packed, reduction).detach()) == pytest.approx(
        float(gf.risk(model, plain, reduction).detach())
    )


def test_two_packed_rows_with_padding(setup):
    """Rows of two and three samples, the first right-padded (positions going on, no label): the pads stay with
    the row's last sample. With an attention mask the model attends across the row: the row is the sample."""
    model, _, plain = setup
    rows = _rows(plain)
    a, b = pack(rows[:2]), pack(rows[2:])
    T, n = b["input_ids"].shape[1], a["input_ids"].shape[1]
    a["input_ids"] = torch.nn.functional.pad(a["input_ids"], (0, T - n), value=0)
    a["labels"] = torch.nn.functional.pad(a["labels"], (0, T - n), value=-100)
    a["position_ids"] = torch.cat([a["position_ids"], a["position_ids"][:, -1:] + torch.arange(1, T - n + 1)], 1)
    two = {k: torch.cat([a[k], b[k]]) for k in a}
    assert int(packed_samples(two)[-1, -1]) + 1 == 5
    assert packed_samples({**two, "attention_mask": torch.ones_like(two["input_ids"])}) is None
    V = gf.Direction(random_direction(model), names=["v"])
    rp = gf.measure(model, V, {"r": two}, per_instance=True)
    ru = gf.measure(model, V, {"r": plain}, per_instance=True)
    assert_close_per_group(rp.instances["r"], ru.instances["r"], 1e-8, "two packed rows")


def test_pairwise_sketch_and_tracker_follow_packed_samples(setup):
    model, packed, plain = setup
    forget = make_batch(model, B=3, seed=4)
    ga = O.get("ga")
    pp = gf.measure_pairwise(model, ga, forget, {"r": packed})
    pu = gf.measure_pairwise(model, ga, forget, {"r": plain})
    assert pp.matrix["r"].shape == pu.matrix["r"].shape == (len(pp.groups), 5, 3)
    assert torch.allclose(pp.matrix["r"], pu.matrix["r"], rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="objective batch is packed"):
        gf.measure_pairwise(model, ga, packed, {"r": plain})
    sk = gf.Sketcher(model, k=4)
    s = sk.sketch(packed)
    assert s.n == 5
    su = sk.sketch(plain)
    assert all(torch.allclose(s.tensors[n], su.tensors[n], rtol=1e-5, atol=1e-7) for n in s.tensors)
    # the Tracker: per-instance rows per packed sample, pooled exactly over probe chunks of one row
    recs = {}
    for name, probe, chunk in (("packed", packed, None), ("plain", plain, 2)):
        m = make_model("llama")
        tr = gf.Tracker(m, {"retain": probe}, per_instance=True, probe_batch_size=chunk, reduction="sample_mean")
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        ga(m, forget).backward()
        with tr.step(opt):
            opt.step()
        recs[name] = tr.records[0]
    assert len(recs["packed"]["per_instance"]) == 5
    assert recs["packed"]["total"] == pytest.approx(recs["plain"]["total"], rel=1e-9)
    assert recs["packed"]["measured_dR"] == pytest.approx(recs["plain"]["measured_dR"], rel=1e-9)


def test_encode_qa_packs_and_the_collators_keys_reach_the_model():
    from transformers import DataCollatorWithFlattening

    from geffect_fast import data

    tok = data.build_tokenizer(vocab_size=64)
    recs = [{"question": f"q{i}?", "answer": f"a {i}"} for i in range(3)]
    b = data.encode_qa(recs, tok, packing=True)
    plain = data.encode_qa(recs, tok)
    assert b["input_ids"].shape == (1, int(plain["attention_mask"].sum()))
    assert int(packed_samples(b).max()) == 2 and "attention_mask" not in b
    feats = [
        {"input_ids": ids.tolist(), "labels": lab.tolist()} for ids, lab in zip(plain["input_ids"], plain["labels"])
    ]
    col = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(feats)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, input_ids, **kw):
            seen.update(kw)
            return torch.zeros(*input_ids.shape, 5)

    forward_logits(Spy(), col)
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"} <= set(seen)
