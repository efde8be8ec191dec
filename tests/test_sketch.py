"""Kronecker sketches: unbiased estimates of pairwise G-effects whose error falls with k; determinism;
storage; mismatched sketches refused."""

import pytest
import torch
from helpers import make_batch, make_model

import geffect_fast as gf
from geffect_fast import objectives as O
from geffect_fast.pairwise import measure_pairwise
from geffect_fast.sketch import Sketch, Sketcher


def _exact(model, a, b):
    """Exact ⟨∇ℓ_i(a), ∇ℓ_j(b)⟩ per group via measure_pairwise with the per-sample NLL as 'objective'."""

    class NLL(O.Objective):
        def forget_per_sample(self, model, forget, ref_model, idk=None):
            from geffect_fast.loss import forward_logits, sample_nll

            return sample_nll(forward_logits(model, forget), forget["labels"])[0]

    return measure_pairwise(model, NLL("nll"), b, {"a": a}).matrix["a"]


def _estimate(model, a, b, k, seed):
    """The sketch estimate of the total pairwise matrix [B_a, B_b] for one seed."""
    sk = Sketcher(model, k=k, seed=seed)
    return sum(sk.sketch(a).dot(sk.sketch(b)).values())


def test_deterministic_by_seed_and_stored(tmp_path):
    model = make_model("llama")
    a = make_batch(model, B=3, seed=1)
    s1, s2 = Sketcher(model, k=8, seed=3).sketch(a), Sketcher(model, k=8, seed=3).sketch(a)
    assert all(torch.equal(s1.tensors[n], s2.tensors[n]) for n in s1.tensors)
    s3 = Sketcher(model, k=8, seed=4).sketch(a)
    assert any(not torch.equal(s1.tensors[n], s3.tensors[n]) for n in s1.tensors)
    s1.save(tmp_path / "s.safetensors")
    back = Sketch.load(tmp_path / "s.safetensors")
    assert back.seed == 3 and back.k == 8 and all(torch.equal(back.tensors[n], s1.tensors[n]) for n in s1.tensors)
    Sketcher(model, k=8, seed=3).check(back)
    with pytest.raises(ValueError, match="seed"):
        back.dot(s3)
    with pytest.raises(ValueError, match="k"):
        back.dot(Sketcher(model, k=4, seed=3).sketch(a))
    with pytest.raises(ValueError, match="model"):
        Sketcher(make_model("llama", num_hidden_layers=3), k=8, seed=3).check(back)
    (tmp_path / "x.safetensors").write_bytes(b"not a sketch")
    with pytest.raises(ValueError, match="not a readable sketch"):
        Sketch.load(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="not a geffect_fast sketch"):
        Sketch.load(tmp_path / "y.safetensors")


def test_unbiased_and_error_falls_with_k():
    model = make_model("llama", hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1)
    a, b = make_batch(model, B=2, seed=1), make_batch(model, B=2, seed=2)
    exact = _exact(model, a, b).sum(0)  # [2, 2]
    stats = {}
    for k in (4, 16):
        ests = torch.stack([_estimate(model, a, b, k, seed) for seed in range(40)])
        mean, std = ests.mean(0), ests.std(0)
        # unbiased: the mean over 40 seeds is within 4 standard errors of the exact value
        assert ((mean - exact).abs() <= 4 * std / 40**0.5 + 1e-9).all(), (k, mean, exact, std)
        stats[k] = (std / exact.abs().clamp_min(1e-12)).mean().item()
    # the error falls with k, at least like 1/√k (measured here about k^-0.7: ×2.7 from k = 4 to 16)
    assert stats[16] < stats[4] / 2, stats


def test_direction_sketch_estimates_per_instance_g_effects():
    model = make_model("llama", hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1)
    a = make_batch(model, B=3, seed=1)
    v = gf.Direction.from_objective(model, O.get("ga"), make_batch(model, B=3, seed=2))
    e = gf.measure(model, v, {"a": a}, per_instance=True).per_instance["a"].sum(1)  # [B]
    ests = []
    for seed in range(40):
        sk = Sketcher(model, k=16, seed=seed)
        d = sk.sketch(a).dot(sk.sketch_direction(v))
        ests.append(sum(d.values())[:, 0])
    ests = torch.stack(ests)
    assert ((ests.mean(0) - e).abs() <= 4 * ests.std(0) / 40**0.5 + 1e-9).all()
