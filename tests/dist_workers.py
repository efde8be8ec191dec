"""Rank functions for tests/test_distributed.py: two CPU processes over gloo, run by :func:`run_ranks`.

Every scenario builds the same tiny float64 model and the same union batch on every rank; rank r measures
its own rows and rank 0 compares the distributed result with a single-process measurement over the union.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

from helpers import make_batch, make_model, random_direction  # noqa: E402

import geffect_fast as gf  # noqa: E402
from geffect_fast.distributed import DistributedError  # noqa: E402

WORLD = 2
#: rows of the union batch each rank holds (uneven on purpose)
ROWS = [slice(0, 3), slice(3, 5)]


def run_ranks(fn: Callable[..., None], tmp: str, *args: Any, timeout: float = 240.0) -> None:
    """Run ``fn(rank, tmp, *args)`` on WORLD processes; fail with every rank's traceback, never hang."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, tmp, args), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(WORLD):
        path = os.path.join(tmp, f"error.{r}")
        if os.path.exists(path):
            errors.append(f"--- rank {r} ---\n" + open(path).read())
    if hung:
        errors.append(f"rank(s) {hung} still running after {timeout:g} s")
    bad = [r for r, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad and not errors:
        errors.append(f"rank(s) {bad} exited with codes {[procs[r].exitcode for r in bad]}")
    if errors:
        raise AssertionError("\n".join(errors))


def _entry(fn, rank: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        fn(rank, tmp, *args)
    except BaseException:
        with open(os.path.join(tmp, f"error.{rank}"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)  # leave without another collective: the other rank may be waiting in one
    dist.barrier()
    dist.destroy_process_group()


class Affine(torch.nn.Module):
    """y = x·w + b, a layer no adapter covers."""

    def __init__(self, d: int):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight + self.bias


def _local(batch: dict, rank: int) -> dict:
    return {k: v[ROWS[rank]] for k, v in batch.items()}


def assert_same(res: gf.Result, ref: gf.Result, rtol: float, per_instance: bool) -> None:
    assert res.groups == ref.groups and res.risks == ref.risks, (res.groups, ref.groups)
    for r in ref.risks:
        a, b = res.group_totals[r], ref.group_totals[r]
        scale = b.abs().max().clamp_min(1e-300)
        assert ((a - b).abs().max() / scale) <= rtol, (r, float((a - b).abs().max() / scale), a, b)
        assert abs(res.losses[r] - ref.losses[r]) <= rtol * abs(ref.losses[r])
        assert torch.equal(res.n_tokens[r], ref.n_tokens[r])
        assert torch.allclose(res.weights[r], ref.weights[r], rtol=1e-15, atol=0)
        if per_instance:
            x, y = res.instances[r], ref.instances[r]
            assert x.shape == y.shape, (x.shape, y.shape)
            assert ((x - y).abs().max() / y.abs().max()) <= rtol, (r, (x - y).abs().max())


# -- DDP ----------------------------------------------------------------------------------------------------
def ddp_measure(rank: int, tmp: str, family: str) -> None:
    """DDP: per instance and aggregates, both reductions, K = 2, equal to one process over the union."""
    model = make_model(family)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    forget, retain = make_batch(model, B=5, seed=3), make_batch(model, B=5, seed=4, side="left")
    V = gf.Direction(random_direction(model, K=2), names=["a", "b"])
    mine = {"forget": _local(forget, rank), "retain": _local(retain, rank)}
    for reduction in ("token_mean", "sample_mean"):
        res = gf.measure(ddp, V, mine, per_instance=True, reduction=reduction)
        assert res.meta["world_size"] == WORLD and res.meta["strategy"] == "taps"
        ref = gf.measure(
            model, V, {"forget": forget, "retain": retain}, per_instance=True, reduction=reduction, process_group=None
        )
        assert_same(res, ref, 1e-12, per_instance=True)
    # aggregates only, grouped as the paper's code does
    res = gf.measure(ddp, V, mine, groups="paper")
    ref = gf.measure(model, V, {"forget": forget, "retain": retain}, groups="paper", process_group=None)
    assert_same(res, ref, 1e-12, per_instance=False)
    # a layer no adapter covers (strict=False): measured by autograd on each rank, the parts summed. Both sides
    # backpropagate the pooled risk, which Llama's float32 RMSNorm rounds (see fsdp_measure)
    odd = make_model(family)
    final = "model.norm" if family == "llama" else "transformer.ln_f"
    parent, leaf = final.rsplit(".", 1)
    setattr(odd.get_submodule(parent), leaf, Affine(odd.config.hidden_size))
    Vo = gf.Direction(random_direction(odd), names=["v"])
    res = gf.measure(torch.nn.parallel.DistributedDataParallel(odd), Vo, mine, strict=False)
    ref = gf.measure(odd, Vo, {"forget": forget, "retain": retain}, strict=False, process_group=None)
    assert res.groups[-1] == "uncovered" and res.uncovered == (f"{final}.weight", f"{final}.bias")
    assert_same(res, ref, 1e-6 if family == "llama" else 1e-12, per_instance=False)


def ddp_tracker(rank: int, tmp: str) -> None:
    """Tracker under DDP (update direction, curvature, a compare objective) = one process over the union."""
    torch.manual_seed(0)
    forget, retain = None, None
    records = []
    for distributed in (True, False):
        model = make_model("llama")
        forget = make_batch(model, B=5, seed=3)
        retain = make_batch(model, B=5, seed=4)
        ga = gf.objectives.get("ga")
        if distributed:
            net = torch.nn.parallel.DistributedDataParallel(model)
            probes = {"unlearn": _local(forget, rank), "retain": _local(retain, rank)}
            batches = [_local(forget, rank)]
            compare_batch = _local(forget, rank)
            compare = {"GA": ga}
        else:
            # DDP averages the ranks' gradients: the single-process loss is the mean of the ranks' losses
            net = model
            probes = {"unlearn": forget, "retain": retain}
            parts = [_local(forget, r) for r in range(WORLD)]
            batches = parts
            compare_batch = None
            compare = {"GA": lambda m, b, ref, ga=ga, parts=parts: sum(ga(m, p, ref) for p in parts) / WORLD}
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        tr = gf.Tracker(
            net,
            probes,
            direction="update",
            curvature=True,
            compare=compare,
            compare_batch=compare_batch if distributed else forget,
            per_instance=True,
        )
        for _ in range(2):
            loss = sum(ga(net, b, None) for b in batches) / len(batches)
            loss.backward()
            with tr.step(opt, loss=loss):
                opt.step()
            opt.zero_grad()
        records.append(tr.records)
    got, want = records
    assert len(got) == len(want) == 2 * 2 * 2
    for a, b in zip(got, want):
        assert (a["objective"], a["risk"], a["step"]) == (b["objective"], b["risk"], b["step"])
        for key in ("total", "loss", "cumulative", "measured_dR", "predicted_dR_2nd"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(b[key])), (key, a[key], b[key])
        assert torch.allclose(torch.tensor(a["per_instance"]), torch.tensor(b["per_instance"]), rtol=1e-9, atol=1e-12)


# -- FSDP2 --------------------------------------------------------------------------------------------------
def _sharded(family: str, **kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(family, **kw)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_measure(rank: int, tmp: str, family: str) -> None:
    """FSDP2: aggregates from the sharded gradient, per instance by all-gathering directions in the hooks.

    The aggregate route backpropagates the pooled risk, so in models that round inside their norms through
    float32 (Llama's RMSNorm upcasts and downcasts) it agrees with the per-sample route to float32
    rounding only (measured up to 3.5e-7 of the largest group on Llama, as any pooled backward does); GPT-2 stays float64-exact.
    """
    agg_tol = 1e-6 if family == "llama" else 1e-12
    from torch.distributed.tensor import DTensor

    model = _sharded(family)
    plain = make_model(family)  # the same weights, whole
    forget, retain = make_batch(plain, B=5, seed=3), make_batch(plain, B=5, seed=4)
    union = {"forget": forget, "retain": retain}
    mine = {"forget": _local(forget, rank), "retain": _local(retain, rank)}
    # a sharded direction, as a user gets it: the gradient of an objective under FSDP
    loss = gf.objectives.get("ga")(model, mine["forget"], None)
    loss.backward()
    v = gf.Direction.from_grads(model)
    assert all(isinstance(t, DTensor) for _, t in v.items())
    whole = {n: t.full_tensor() for n, t in v.items()}
    for p in model.parameters():
        p.grad = None
    ref = gf.measure(plain, gf.Direction(whole, names=["grad"]), union, per_instance=True, process_group=None)

    agg = gf.measure(model, v, mine)
    assert agg.meta["strategy"] == "sharded" and agg.instances is None
    assert_same(agg, ref, agg_tol, per_instance=False)
    import geffect_fast.engine.consumers as session_mod

    gathers, real = [], session_mod.gather_async
    session_mod.gather_async = lambda t: gathers.append(t) or real(t)
    try:
        inst = gf.measure(model, v, mine, per_instance=True)
    finally:
        session_mod.gather_async = real
    assert inst.meta["strategy"] == "taps"
    # each module's direction gathered exactly once per risk set (gathered ahead, never twice)
    uses = sum(1 for m in model.modules() for _ in m.parameters(recurse=False))
    assert len(gathers) == 2 * uses, (len(gathers), uses)
    assert_same(inst, ref, 1e-12, per_instance=True)
    # a whole (unsharded) direction given to the sharded model: both routes
    W = gf.Direction(whole, names=["grad"])
    assert_same(gf.measure(model, W, mine), ref, agg_tol, per_instance=False)
    assert_same(gf.measure(model, W, mine, per_instance=True), ref, 1e-12, per_instance=True)
    # the model is left as it was: no grads, requires_grad back on, still sharded
    assert all(p.grad is None and p.requires_grad and isinstance(p, DTensor) for p in model.parameters())
    # a sharded direction of K = 2 (stacked DTensors), grouped per module
    v2 = gf.Direction.stack({"g": v, "h": gf.Direction({n: 2 * t for n, t in v.items()}, names=["h"])})
    w2 = {"g": gf.Direction(whole, names=["g"]), "h": gf.Direction({n: 2 * t for n, t in whole.items()}, names=["h"])}
    res = gf.measure(model, v2, mine, groups="module")
    ref2 = gf.measure(plain, gf.Direction.stack(w2), union, groups="module", process_group=None)
    assert_same(res, ref2, agg_tol, per_instance=False)
    # what does not work on a sharded model says so
    refused = [
        (ValueError, lambda: gf.measure(model, v, mine, process_group=None)),
        (NotImplementedError, lambda: gf.Tracker(model, mine)),
        (NotImplementedError, lambda: gf.measure_pairwise(model, gf.objectives.get("ga"), mine["forget"], mine)),
        (NotImplementedError, lambda: gf.Sketcher(model, k=4)),
    ]
    for exc, call in refused:
        try:
            call()
        except exc as e:
            assert "shard" in str(e), str(e)
        else:
            raise AssertionError(f"{call} should refuse a sharded model")


def lora_ddp(rank: int, tmp: str) -> None:
    """A LoRA model under DDP: adapter parameters only, grouped by block, = one process over the union."""
    import peft

    model = make_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B starts at 0: make the adapters do something
    ddp = torch.nn.parallel.DistributedDataParallel(lora)
    forget = make_batch(model, B=5, seed=3)
    V = {n: torch.randn_like(p) for n, p in lora.named_parameters() if p.requires_grad}
    res = gf.measure(ddp, V, {"f": _local(forget, rank)}, per_instance=True)
    ref = gf.measure(lora, V, {"f": forget}, per_instance=True, process_group=None)
    assert_same(res, ref, 1e-12, per_instance=True)
    # only the adapters have a direction: the frozen base's groups are exactly 0, the blocks' are not
    by = res.by_group["f"]
    assert all(by[g] == 0 for g in ("embed", "final_norm", "lm_head")), by
    assert all(by[g] != 0 for g in ("block.0", "block.1")), by


# -- failures -----------------------------------------------------------------------------------------------
def failures(rank: int, tmp: str) -> None:
    """A rank that fails makes every rank raise; one that never comes makes the others raise in time."""
    model = make_model("llama")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = make_batch(model, B=5, seed=3)
    V = {n: t[0] for n, t in random_direction(model).items()}
    mine = _local(batch, rank)

    def expect(exc: type, text: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except exc as e:
            assert text in str(e), (text, str(e))
        else:
            raise AssertionError(f"rank {rank}: expected {exc.__name__} ({text})")

    # 1. rank 1's batch has no labelled tokens: it raises its ValueError, rank 0 a DistributedError naming it
    bad = dict(mine, labels=torch.full_like(mine["labels"], -100)) if rank == 1 else mine
    if rank == 1:
        expect(ValueError, "no labelled tokens", lambda: gf.measure(ddp, V, {"f": bad}))
    else:
        expect(DistributedError, "rank 1 failed while checking the inputs", lambda: gf.measure(ddp, V, {"f": bad}))
    # 2. a failure inside rank 1's forward (a token id outside the vocabulary)
    ids = mine["input_ids"].clone()
    if rank == 1:
        ids[0, 1] = 10_000
        expect(IndexError, "index out of range", lambda: gf.measure(ddp, V, {"f": dict(mine, input_ids=ids)}))
    else:
        expect(DistributedError, "measuring risk set 'f'", lambda: gf.measure(ddp, V, {"f": mine}))
    # 3. the ranks make different calls (other risk names)
    name = "f" if rank == 0 else "g"
    expect(DistributedError, "different risk sets", lambda: gf.measure(ddp, V, {name: mine}))
    # 4. the group still works after all that
    res = gf.measure(ddp, V, {"f": mine})
    ref = gf.measure(model, V, {"f": batch}, process_group=None)
    assert abs(res.total["f"] - ref.total["f"]) <= 1e-12 * abs(ref.total["f"])
    # 5. rank 1 never calls: rank 0 raises within its timeout instead of hanging
    if rank == 0:
        t0 = time.monotonic()
        expect(DistributedError, "within 2 s", lambda: gf.measure(ddp, V, {"f": mine}, timeout=2.0))
        assert time.monotonic() - t0 < 30
        open(os.path.join(tmp, "timed_out"), "w").close()
        os._exit(0)  # the group now holds an unanswered collective: leave without tearing it down
    else:
        while not os.path.exists(os.path.join(tmp, "timed_out")):
            time.sleep(0.1)
        os._exit(0)


def fails_on_rank_1(rank: int, tmp: str) -> None:
    """For the harness's own test."""
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")


def fsdp_failure(rank: int, tmp: str) -> None:
    """Under FSDP2, a rank whose risk is not finite stops both ranks before FSDP's backward collectives."""
    import geffect_fast.engine.run as api  # the pass's per-token NLL

    model = _sharded("llama")
    batch = _local(make_batch(model, B=5, seed=3), rank)
    V = {n: t[0] for n, t in random_direction(make_model("llama")).items()}
    if rank == 1:
        real = api.token_nll

        def poisoned(logits, labels):
            nll, mask = real(logits, labels)
            return nll * float("nan"), mask

        api.token_nll = poisoned
        try:
            gf.measure(model, V, {"f": batch}, per_instance=True)
        except ValueError as e:
            assert "not finite" in str(e)
        else:
            raise AssertionError("rank 1 should have failed")
        finally:
            api.token_nll = real
    else:
        try:
            gf.measure(model, V, {"f": batch}, per_instance=True)
        except DistributedError as e:
            assert "rank 1 failed while running the forward of risk set 'f'" in str(e) and "not finite" in str(e)
        else:
            raise AssertionError("rank 0 should have raised")
    # and the group is usable afterwards
    res = gf.measure(model, V, {"f": batch})
    assert res.meta["strategy"] == "sharded"
