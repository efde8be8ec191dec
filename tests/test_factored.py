"""Factored directions (geffect_fast.directions.factored): an objective's gradient kept as its factors and measured by them
equals the same gradient formed and measured dense — per instance and per group, in float64, on the oracle
families (tied heads, learned positions, padding_idx), for K > 1 stacks mixing dense and factored directions,
LoRA, padding on either side, objectives that run the model twice, gradient checkpointing and parameters used
outside their module; tiles bound the memory; the cost model's choices; the Tracker's compare directions."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, assert_close_per_group, make_batch, make_model, oracle, random_direction
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import geffect_fast as gf
from geffect_fast import api
from geffect_fast import objectives as O
from geffect_fast.directions import FactoredDirection
from geffect_fast.engine import FactoredEntry, module_map
from geffect_fast.engine import routes as fm
from geffect_fast.engine.routes import Machine, UseShape, route_costs
from geffect_fast.groups import assign
from geffect_fast.ops import factored as fops
from geffect_fast.ops import pairwise as pw

ROOT = Path(__file__).resolve().parents[1]
#: Gemma's RMSNorm rounds its own γ-gradient through float32 inside the model (README, "How exact"): the dense
#: direction autograd forms carries that rounding, the factored one sums g ⊙ x̂ in float64
TOL = {"gemma": 1e-6}


def _v_error(fd: FactoredDirection, d: gf.Direction) -> float:
    """max over parameters of ‖V_factored − V_dense‖ / ‖V_dense‖ (V formed from the factors); a parameter whose
    gradient is zero but for rounding (OPT's key biases: softmax ignores a shift of the keys) is compared at
    1e-6 of the whole direction's norm."""
    dd = fd.dense()
    assert set(dd.keys()) == set(d.keys())
    total = sum(float(d.tensor(k).double().norm()) ** 2 for k in d.keys()) ** 0.5
    err = 0.0
    for k in d.keys():
        a, b = dd.tensor(k).double(), d.tensor(k).double()
        err = max(err, float((a - b).norm()) / max(float(b.norm()), 1e-6 * total))
    return err


def _agree(res: gf.Result, ref: gf.Result, tol: float, what: str) -> float:
    err = 0.0
    for r in ref.risks:
        err = max(err, assert_close_per_group(res.instances[r], ref.instances[r], tol, f"{what} {r} per instance"))
        a, b = res.group_totals[r], ref.group_totals[r]
        err = max(err, float(((a - b).abs() / b.abs().amax(-1, keepdim=True).clamp_min(1e-30)).max()))
    assert err <= tol, f"{what}: group totals {err:.2e}"
    return err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_factored_equals_dense_per_instance_and_group(family):
    """Every route of a factored NPO direction = the dense direction measured, 1e-12 relative in float64."""
    model = make_model(family)
    ref = make_model(family, seed=7)
    side = "left" if family in ("llama", "qwen2", "opt") else "right"
    forget = make_batch(model, B=3, seed=1, side=side)
    risks = {"unlearn": forget, "retain": make_batch(model, B=4, seed=2, empty_sample=True)}
    obj = O.get("npo")
    d = gf.Direction.from_objective(model, obj, forget, ref_model=ref)
    fd = gf.Direction.from_objective(model, obj, forget, ref_model=ref, factored=True)
    assert isinstance(fd, FactoredDirection) and fd.names == d.names == ("npo",)
    tol = TOL.get(family, 1e-12)
    assert _v_error(fd, d) <= tol
    dense = gf.measure(model, d, risks, per_instance=True)
    for route in ("factored", "dense", "auto"):
        res = gf.measure(model, fd, risks, per_instance=True, route=route)
        _agree(res, dense, tol, f"{family} route={route}")
        kinds = res.meta["direction_routes"]
        assert kinds and (route == "auto" or set(kinds.values()) == {route}), kinds
        assert set(res.meta["route_costs"]) == {"dense", "factored", "chosen"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_factored_against_the_float64_oracle(family):
    model = make_model(family)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2, side="left")
    obj = O.get("wga", alpha=0.5)
    fd = gf.Direction.from_objective(model, obj, forget, factored=True)
    res = gf.measure(model, fd, {"retain": retain}, per_instance=True, route="factored")
    grouping = assign(model, "block", [n for n, _ in model.named_parameters()])
    V = {n: t.tensor(n) for t in [gf.Direction.from_objective(model, obj, forget)] for n in t.keys()}
    e, _ = oracle(model, V, retain, grouping.of, len(grouping))
    assert_close_per_group(res.instances["retain"], e, 1e-10, f"{family} factored vs oracle")


def test_stack_of_several_factored_and_dense_directions():
    """K = 5 in one pass: factored GA, NPO (reference model) and WGA on another batch, a dense random direction
    and a nested stack; equal to the dense stack, and each direction picked out equals itself alone."""
    model = make_model("gpt2")
    ref = make_model("gpt2", seed=7)
    forget, other = make_batch(model, B=3, seed=1), make_batch(model, B=2, T=7, seed=4, side="left")
    retain = make_batch(model, B=4, seed=2, empty_sample=True)
    rnd = gf.Direction({n: t[0] for n, t in random_direction(model).items()}, "rnd")

    def both(obj, batch, **kw):
        return (
            gf.Direction.from_objective(model, obj, batch, ref_model=ref, **kw),
            gf.Direction.from_objective(model, obj, batch, ref_model=ref, factored=True, **kw),
        )

    ga, ga_f = both(O.get("ga"), forget)
    npo, npo_f = both(O.get("npo"), forget)
    wga, wga_f = both(O.get("wga"), other, name="wga_other")
    inner_f = gf.Direction.stack({"a": ga_f, "b": wga_f})
    inner = gf.Direction.stack({"a": ga, "b": wga})
    stacked_f = gf.Direction.stack({"GA": ga_f, "NPO": npo_f, "rnd": rnd, "pair": inner_f})
    stacked = gf.Direction.stack({"GA": ga, "NPO": npo, "rnd": rnd, "pair": inner})
    assert isinstance(stacked_f, FactoredDirection) and isinstance(stacked, gf.Direction)
    assert stacked_f.names == stacked.names == ("GA", "NPO", "rnd", "pair.a", "pair.b")
    assert _v_error(stacked_f, stacked) <= 1e-12
    risks = {"unlearn": forget, "retain": retain}
    dense = gf.measure(model, stacked, risks, per_instance=True)
    for route in ("factored", "auto"):
        _agree(gf.measure(model, stacked_f, risks, per_instance=True, route=route), dense, 1e-12, route)
    one = gf.measure(model, stacked_f["NPO"], risks, per_instance=True, route="factored")
    _agree(one, dense["NPO"], 1e-12, "NPO picked out")
    alone = gf.measure(model, npo_f, risks, per_instance=True, route="factored")
    _agree(alone, dense["NPO"], 1e-12, "NPO alone")


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "opt"])
def test_tied_head_every_cross_term(family):
    """A tied table has two uses on each side (embedding: ids; head: dense): the four pairs, each by its own
    product, add up to the dense value — checked by use pair against V formed from one objective use only."""
    model = make_model(family)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2, empty_sample=True)
    fd = gf.Direction.from_objective(model, O.get("ga"), forget, factored=True)
    tied = next(k for k in fd.keys() if len(fd.entry(k).uses) == 2)
    assert {u.ids for u in fd.entry(tied).uses} == {True, False}
    for keep in (0, 1):  # one objective use at a time: its two risk-side pairs against its own V
        e = fd.entry(tied)
        part = FactoredDirection({**fd._e, tied: FactoredEntry(e.shape, e.param_dtype, e.device, 1, [e.uses[keep]])},
                                 fd.names)  # fmt: skip
        dense = gf.measure(model, part.dense(), {"retain": retain}, per_instance=True, groups="module")
        res = gf.measure(model, part, {"retain": retain}, per_instance=True, groups="module", route="factored")
        _agree(res, dense, 1e-12, f"{family} tied use {keep}")


def test_lora_factored_equals_dense():
    peft = pytest.importorskip("peft", reason="peft is in the test extras; install with pip install '.[test]'")
    base = make_model("llama")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(base, cfg).double()
    forget, retain = make_batch(base, B=3, seed=1), make_batch(base, B=4, seed=2)
    obj = O.get("wga", alpha=0.5)
    d = gf.Direction.from_objective(model, obj, forget)
    fd = gf.Direction.from_objective(model, obj, forget, factored=True)
    assert fd.keys() and all("lora_" in k for k in fd.keys())
    assert _v_error(fd, d) <= 1e-12
    dense = gf.measure(model, d, {"retain": retain, "unlearn": forget}, per_instance=True)
    res = gf.measure(model, fd, {"retain": retain, "unlearn": forget}, per_instance=True, route="factored")
    _agree(res, dense, 1e-12, "LoRA")
    assert res.meta["direction_routes"] == {"Linear.weight": "factored"}


@pytest.mark.parametrize("name", ["gd", "idkpo"])
def test_objectives_that_run_the_model_on_several_batches(name):
    """GD runs the model on the forget and the retain batch (other sizes), IdkPO on the refusal batch: the
    objective's rows are pooled over every call, whatever its batch shape."""
    model = make_model("llama")
    forget = make_batch(model, B=3, seed=1)
    extra = make_batch(model, B=2, T=6, seed=3, side="left")
    batch = {"forget": forget, "retain": extra} if name == "gd" else {"forget": forget, "idk": extra}
    obj = O.get(name)
    d = gf.Direction.from_objective(model, obj, batch)
    fd = gf.Direction.from_objective(model, obj, batch, factored=True)
    assert _v_error(fd, d) <= 1e-12
    risks = {"retain": make_batch(model, B=4, seed=2)}
    dense = gf.measure(model, d, risks, per_instance=True)
    _agree(gf.measure(model, fd, risks, per_instance=True, route="factored"), dense, 1e-12, name)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing(family, reentrant):
    model = make_model(family)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    obj = O.get("ga")
    d = gf.Direction.from_objective(model, obj, forget)
    dense = gf.measure(model, d, {"retain": retain}, per_instance=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    layers = model.model.layers if family == "llama" else model.transformer.h
    orig = layers[0]._gradient_checkpointing_func

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    for layer in layers:
        layer._gradient_checkpointing_func = counting
    fd = gf.Direction.from_objective(model, obj, forget, factored=True, mode="train")
    assert calls, "checkpointing was not exercised"
    assert _v_error(fd, d) <= 1e-12
    res = gf.measure(model, fd, {"retain": retain}, per_instance=True, mode="train", route="factored")
    _agree(res, dense, 1e-12, f"{family} checkpointing (reentrant={reentrant})")


def test_parameters_used_outside_their_module_fall_back_to_autograd():
    """Bloom's slow_but_exact path uses two weights through F.linear in a parent: the capture takes their
    gradient from autograd (a dense part), the rest stays factored; measure(strict=False) as for dense."""
    model = make_model("bloom", pretraining_tp=2, slow_but_exact=True)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    obj = O.get("ga")
    d = gf.Direction.from_objective(model, obj, forget)
    fd = gf.Direction.from_objective(model, obj, forget, factored=True)
    outside = [k for k in fd.keys() if fd.entry(k).dense is not None]
    assert outside and all(k.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")) for k in outside)
    assert all(not fd.entry(k).uses for k in outside)
    assert _v_error(fd, d) <= 1e-12
    dense = gf.measure(model, d, {"retain": retain}, per_instance=False, strict=False)
    res = gf.measure(model, fd, {"retain": retain}, per_instance=False, strict=False, route="factored")
    assert res.uncovered == dense.uncovered and res.uncovered
    for r in dense.risks:
        assert torch.allclose(res.group_totals[r], dense.group_totals[r], rtol=1e-12, atol=1e-15)


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an op creates inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_tiles_bound_the_memory(monkeypatch):
    """With small tiles the factored pass creates no tensor larger than the dense pass's largest (activations,
    logits); with the default tiles these batches fit one tile — its N × N' products are larger, so the check
    sees them. The values do not depend on the tiles."""
    model = make_model("gpt2")
    forget, retain = make_batch(model, B=32, T=16, seed=1), make_batch(model, B=32, T=16, seed=2)
    fd = gf.Direction.from_objective(model, O.get("ga"), forget, factored=True)
    N = fm.active_rows(retain)
    N2 = max(u.n for k in fd.keys() for u in fd.entry(k).uses)
    plain, whole, tiled = _Largest(), _Largest(), _Largest()
    with plain:
        gf.measure(model, fd, {"r": retain}, per_instance=True, route="dense")
    with whole:
        big = gf.measure(model, fd, {"r": retain}, per_instance=True, route="factored")
    assert whole.most >= N * N2 // 2 > plain.most  # one tile held a whole product
    monkeypatch.setattr(pw, "TILE_BYTES", 8 * 48 * 48 * 3)
    monkeypatch.setattr(fops, "TILE_BYTES", 8 * 48 * 61)
    with tiled:
        small = gf.measure(model, fd, {"r": retain}, per_instance=True, route="factored")
    assert tiled.most <= plain.most, (tiled.most, plain.most, N, N2)
    _agree(small, big, 1e-12, "tiled")


def test_the_factored_route_never_forms_v_and_the_capture_no_weight_gradient(monkeypatch):
    model = make_model("llama")
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    accumulated = []
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: accumulated.append(n)) for n, p in model.named_parameters()
    ]
    try:
        fd = gf.Direction.from_objective(model, O.get("ga"), forget, factored=True)
    finally:
        for h in hooks:
            h.remove()
    assert not accumulated  # no weight gradient was computed for any parameter
    assert not any(fd.entry(k).dense is not None for k in fd.keys())

    def refuse(self):
        raise AssertionError("V formed")

    monkeypatch.setattr(FactoredEntry, "dense_tensor", refuse)
    gf.measure(model, fd, {"r": retain}, route="factored")


def test_capture_leaves_the_model_as_it_was():
    model = make_model("llama").train()
    names = [n for n, _ in model.named_parameters()]
    frozen = names[3]
    dict(model.named_parameters())[frozen].requires_grad_(False)
    gf.risk(model, make_batch(model)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng = torch.random.get_rng_state()
    fd = gf.Direction.from_objective(model, O.get("ga"), make_batch(model, seed=3), factored=True)
    assert frozen not in fd.keys() and frozen not in fd.zero
    for n, p in model.named_parameters():
        assert p.requires_grad == (n != frozen)
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n]))
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)

    def broken(model, batch, ref):
        model(input_ids=batch["input_ids"])
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        gf.Direction.from_objective(model, broken, make_batch(model), factored=True)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad == (n != frozen) for n, p in model.named_parameters())


def test_bad_input():
    model = make_model("llama")
    batch = make_batch(model)
    fd = gf.Direction.from_objective(model, O.get("ga"), batch, factored=True)
    d = gf.Direction({n: t[0] for n, t in random_direction(model).items()})
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        gf.measure(model, fd, batch, route="fast")
    with pytest.raises(ValueError, match="route='factored' needs a factored direction"):
        gf.measure(model, d, batch, route="factored")
    with pytest.raises(NotImplementedError, match="one process"):
        api._check_inputs(module_map(model), object(), fd, batch, "block", False, "token_mean", "eval")
    with pytest.raises(TypeError, match="must return a scalar"):
        gf.Direction.from_objective(model, lambda m, b, r: torch.ones(2, requires_grad=True), batch, factored=True)
    with pytest.raises(KeyError, match="direction 'b' has no entry for"):
        gf.Direction.stack({"a": fd, "b": gf.Direction({"x": torch.ones(1)})})
    other = make_model("llama", hidden_size=16, intermediate_size=24)
    with pytest.raises(ValueError, match="has shape"):
        gf.measure(other, fd, make_batch(other))
    assert "FactoredDirection(names=['ga']" in repr(fd) and fd.nbytes > 0


def test_bf16_model():
    """bf16 factors accumulate in float32; the factored route agrees with the dense one to bf16's rounding."""
    model = make_model("llama", dtype=torch.bfloat16)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    obj = O.get("ga")
    fd = gf.Direction.from_objective(model, obj, forget, factored=True)
    dense = gf.measure(model, fd, {"r": retain}, per_instance=True, route="dense")
    res = gf.measure(model, fd, {"r": retain}, per_instance=True, route="factored")
    assert res.meta["dtype"] == "float32"
    a, b = res.group_totals["r"], dense.group_totals["r"]
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5  # the same float32 sums in another order
    plain = gf.measure(model, gf.Direction.from_objective(model, obj, forget), {"r": retain})
    c = plain.group_totals["r"]
    assert float((a - c).abs().max() / c.abs().max()) < 5e-2  # autograd's V is rounded to bf16


# -- the cost model ---------------------------------------------------------------------------------------
def test_cost_model_crossover_follows_the_flop_count():
    """One linear layer I = O = h, N risk rows: factored costs 2·N·N'·(I+O), dense 2·I·O·(N + N'); the model's
    crossover in N' lies within ×2 of the FLOP-only one, N·c/(N − c) with c = I·O/(I+O), and decisions are
    monotone in N'."""
    m = Machine(flops=1e11, bandwidth=1e10, call=1e-5)
    for h, N in ((256, 1024), (512, 2048), (1024, 4096), (4096, 16384)):
        c = h * h / (2 * h)
        analytic = N * c / (N - c)
        sides = []
        for n2 in (2**k for k in range(4, 16)):
            cost = route_costs([UseShape(False, h, h, n2)], [UseShape(False, h, h, N)], [N], 1, 0, 4, 4, m)
            sides.append((n2, cost["factored"] < cost["dense"]))
        flips = [n2 for (n2, f), (_, g) in zip(sides, sides[1:]) if f != g]
        assert len(flips) == 1 and all(f for _, f in sides[: sides.index((flips[0], True)) + 1])
        assert analytic / 2 <= flips[0] * 1.5 and flips[0] <= analytic * 2, (h, N, flips, analytic)


def test_auto_routes_by_size():
    """A small objective batch against a large risk batch: the blocks' linear weights go factored, the vectors
    (norms) dense; a large objective batch on the same small model: everything dense."""
    model = make_model("llama", dtype=torch.float32, hidden_size=256, intermediate_size=512, layers=1)
    retain = make_batch(model, B=16, T=48, seed=2)
    layout = module_map(model)
    named = layout.named

    def routes(obj_batch):
        fd = gf.Direction.from_objective(model, O.get("ga"), obj_batch, factored=True)
        entries = fd.bind(named, [n for n, p in named.items() if p.requires_grad])
        return fm.plan_routes(entries, layout, {"r": retain}, "auto", torch.device("cpu")).routes, fd

    small, fd = routes(make_batch(model, B=1, T=4, seed=1))
    blocks = [n for n in small if ".layers." in n and n.endswith("proj.weight")]
    assert len(blocks) == 7 and all(small[n] == "factored" for n in blocks), small
    assert all(small[n] == "dense" for n in small if "norm" in n)
    assert gf.measure(model, fd, {"r": retain}).meta["direction_routes"]["LlamaRMSNorm.weight"] == "dense"
    large, _ = routes(make_batch(model, B=48, T=48, seed=1))
    assert set(large.values()) == {"dense"}, large


def test_committed_grid_the_cost_model_picks_the_faster_route():
    """benchmarks/results/factored_layers_cpu.csv (python -m benchmarks.bench_factored): per layer shape, the
    measured time of each route and the model's choice. The choice is the faster route, or within 10% of it
    where the two are that close (the grid's own noise)."""
    path = ROOT / "benchmarks" / "results" / "factored_layers_cpu.csv"
    rows = list(csv.DictReader(open(path)))
    assert len(rows) >= 20
    for row in rows:
        t = {"dense": float(row["dense_s"]), "factored": float(row["factored_s"])}
        chosen = t[row["model_choice"]]
        assert chosen <= 1.10 * min(t.values()), row


# -- the Tracker --------------------------------------------------------------------------------------------
def test_tracker_compare_directions_are_factored_and_exact(monkeypatch):
    model = make_model("llama")
    ref = make_model("llama", seed=7)
    forget, retain = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    probes = {"unlearn": forget, "retain": retain}
    compare = {"GA": O.get("ga"), "NPO": O.get("npo")}
    seen = []
    real = gf.tracker.measure

    def spy(model, direction, *a, **k):
        seen.append(type(direction))
        return real(model, direction, *a, **k)

    monkeypatch.setattr(gf.tracker, "measure", spy)
    tracker = gf.Tracker(model, probes, direction="gradient", compare=compare, ref_model=ref)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gf.risk(model, forget).backward()
    expected = gf.measure(
        model,
        gf.Direction.stack(
            {
                "gradient": gf.Direction.from_grads(model),
                **{n: gf.Direction.from_objective(model, o, forget, ref_model=ref, name=n) for n, o in compare.items()},
            }
        ),
        probes,
    )
    with tracker.step(opt):
        opt.step()
    assert seen == [FactoredDirection]
    for rec in tracker.records:
        want = expected[rec["objective"]]
        assert rec["total"] == pytest.approx(want.total[rec["risk"]], rel=1e-12, abs=1e-15)
        for g, v in want.by_group[rec["risk"]].items():
            assert rec["groups"][g] == pytest.approx(v, rel=1e-12, abs=1e-15)


def test_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/bench_factored.py --quick: both parts, the tables, the crossover plot (a dry run of the script the
    committed results come from)."""
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_factored", "--quick", "--repeats", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    layers = list(csv.DictReader(open(tmp_path / "factored_layers_quick.csv")))
    models = list(csv.DictReader(open(tmp_path / "factored_models_quick.csv")))
    assert len(layers) == 3 and len(models) == 8
    assert all(float(row["agree"]) < 1e-4 for row in layers + models)
    assert {row["method"] for row in models} == {"plain", "dense", "factored", "auto"}
    assert (tmp_path / "factored_crossover_quick.png").stat().st_size > 0
    assert "Crossover in N'" in (tmp_path / "factored_quick.md").read_text()
