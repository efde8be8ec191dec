"""Host overhead of measure(): where the time beyond one plain forward+backward goes, and ours/plain against
batch size down to B = 1 (where a fixed per-call cost shows).

    python -m benchmarks.bench_host                      # CPU, llama-10M, T = 64 -> benchmarks/results/host_cpu.md
    python -m benchmarks.bench_host --device cuda        # the same on a GPU (gpu_check.sh runs it)

Per batch size B, timed round-robin in one process (each repeat runs every variant once, so load drift hits
them alike; medians):

* ``plain``: one ordinary forward+backward (weight gradients on) — the baseline;
* ``frozen``: the same with every parameter frozen and the input embeddings' output requiring grad — what the
  pass must do besides its contractions (no weight-gradient GEMMs);
* ``ours``: ``measure(per_instance=True)``, backend auto;
* ``ours[null ops]``: the same with every op replaced by one that returns zeros — the taps' own machinery.

From them: the fixed per-call cost (ours minus the time inside its passes: checks, plan, weights, session set-up,
combine), the tap machinery per pass and per tap (null-ops pass minus frozen), and the ops (ours minus null ops).

Beside the times, the interpreter calls of one warm pass (:func:`count_calls`: every Python function call and
every call of a C function from Python, as ``sys.setprofile`` reports them): ``measure(model, v, {"risk": batch})``
with a prebuilt Direction over every parameter against a plain forward+backward of HF's ``.loss``
(:func:`calls_case`). On a GPU the kernels are fast and this Python is the pass; ``tests/test_host_calls.py``
keeps the ratio from growing back past 2×.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "llama-10M": (256, 6, 688, 8, 8192),
    "llama-45M": (512, 8, 1376, 8, 16384),
    "llama-tiny": (64, 2, 128, 4, 512),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def count_calls(fn) -> int:
    """Interpreter calls of one ``fn()`` after two warm-up calls: Python function calls plus calls of C functions
    from Python (``sys.setprofile``'s "call" and "c_call" events)."""
    fn()
    fn()
    n = [0]

    def prof(frame, event, arg):
        if event == "call" or event == "c_call":
            n[0] += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n[0] - 1  # the call that turns the profiler off is reported too


def calls_case(model, batch, direction) -> tuple[int, int]:
    """(plain, ours) interpreter calls of one warm pass: a forward+backward of HF's ``.loss`` (grads cleared after),
    and ``measure(model, direction, {"risk": batch})``."""
    import geffect_fast as gf

    def plain():
        kw = {k: batch[k] for k in ("attention_mask",) if k in batch}
        model(input_ids=batch["input_ids"], labels=batch["labels"], **kw).loss.backward()
        for p in model.parameters():
            p.grad = None

    def ours():
        gf.measure(model, direction, {"risk": batch})

    return count_calls(plain), count_calls(ours)


def run(
    dev: torch.device, model_name: str, T: int, batches: list[int], repeats: int, clock=time.perf_counter
) -> tuple[list[dict], dict]:
    import geffect_fast as gf
    from benchmarks._common import llama_model, padded_batch
    from geffect_fast import api
    from geffect_fast.capture.base import TapFn
    from geffect_fast.loss import forward_logits, token_nll
    from geffect_fast.ops.dispatch import Backend

    hidden, layers, inter, heads, vocab = MODELS[model_name]
    model = llama_model(hidden, layers, inter, heads, vocab, max(T, 128)).to(dev)
    g = torch.Generator().manual_seed(1)
    V = {n: torch.randn(p.shape, generator=g).to(dev) for n, p in model.named_parameters()}
    d = gf.Direction(V, "v")

    # -- instrumentation: time inside the passes, taps per pass, null ops --------------------------------
    inside = {"s": 0.0}
    taps = {"n": 0}
    one_pass = api._one_pass

    def timed_pass(*a, **k):
        _sync(dev)
        t0 = clock()
        try:
            return one_pass(*a, **k)
        finally:
            _sync(dev)
            inside["s"] += clock() - t0

    tap_backward = TapFn.backward

    def counting_backward(ctx, grad):
        taps["n"] += 1
        return tap_backward(ctx, grad)

    resolve = api.resolve

    def null_resolve(*a, **k):
        real = resolve(*a, **k)

        def lin(a_, g_, v, seg, B, vb=None):
            K = (v if v is not None else vb).shape[0]
            z = torch.zeros(K, B, device=g_.device)
            return (None if v is None else z, None if vb is None else z)

        def emb(ids, g_, v, seg, B, padding_idx=None):
            return torch.zeros(v.shape[0], B, device=g_.device)

        def norm(x, g_, vw, vb, seg, B):
            K = (vw if vw is not None else vb).shape[0]
            z = torch.zeros(K, B, device=g_.device)
            return (None if vw is None else z, None if vb is None else z)

        return Backend("null", lin, emb, norm, real.segment_outer)

    api._one_pass = timed_pass
    TapFn.backward = staticmethod(counting_backward)
    rows, detail = [], {}
    try:
        for B in batches:
            batch = {k: t.to(dev) for k, t in padded_batch(B, T, vocab, torch.Generator().manual_seed(B)).items()}
            emb = model.get_input_embeddings()

            def plain(batch=batch):
                gf.risk(model, batch).backward()
                for p in model.parameters():
                    p.grad = None

            def frozen(batch=batch):
                flags = [p.requires_grad for p in model.parameters()]
                for p in model.parameters():
                    p.requires_grad_(False)
                h = emb.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))  # noqa: B023
                try:
                    nll, _ = token_nll(forward_logits(model, batch), batch["labels"])
                    nll.sum().backward()
                finally:
                    h.remove()
                    for p, f in zip(model.parameters(), flags):
                        p.requires_grad_(f)

            def ours(batch=batch):
                gf.measure(model, d, {"r": batch}, per_instance=True)

            def ours_null(batch=batch):
                api.resolve = null_resolve
                try:
                    gf.measure(model, d, {"r": batch}, per_instance=True)
                finally:
                    api.resolve = resolve

            variants = {"plain": plain, "frozen": frozen, "ours": ours, "ours[null ops]": ours_null}
            times: dict[str, list[float]] = {k: [] for k in variants}
            passes: dict[str, list[float]] = {"ours": [], "ours[null ops]": []}
            for fn in variants.values():  # warm-up
                fn()
            for _ in range(repeats):
                for name, fn in variants.items():
                    inside["s"] = 0.0
                    taps["n"] = 0
                    _sync(dev)
                    t0 = clock()
                    fn()
                    _sync(dev)
                    times[name].append(clock() - t0)
                    if name in passes:
                        passes[name].append(inside["s"])
                    if name == "ours":
                        ntaps = taps["n"]
            med = {k: statistics.median(v) for k, v in times.items()}
            pas = {k: statistics.median(v) for k, v in passes.items()}
            plain_calls, ours_calls = calls_case(model, batch, d)
            row = dict(
                B=B,
                T=T,
                plain_ms=med["plain"] * 1e3,
                frozen_ms=med["frozen"] * 1e3,
                ours_ms=med["ours"] * 1e3,
                null_ms=med["ours[null ops]"] * 1e3,
                ours_over_plain=med["ours"] / med["plain"],
                fixed_ms=(med["ours"] - pas["ours"]) * 1e3,
                taps_per_pass=ntaps,
                tap_machinery_ms=(pas["ours[null ops]"] - med["frozen"]) * 1e3,
                per_tap_us=(pas["ours[null ops]"] - med["frozen"]) / max(1, ntaps) * 1e6,
                ops_ms=(med["ours"] - med["ours[null ops]"]) * 1e3,
                plain_calls=plain_calls,
                ours_calls=ours_calls,
                calls_ratio=ours_calls / plain_calls,
            )
            rows.append(row)
            print(
                f"B{B:<3} plain {row['plain_ms']:8.2f}  frozen {row['frozen_ms']:8.2f}  ours {row['ours_ms']:8.2f} "
                f"(x{row['ours_over_plain']:.2f})  fixed {row['fixed_ms']:6.2f}  taps {ntaps} x "
                f"{row['per_tap_us']:6.1f} us  ops {row['ops_ms']:7.2f} ms  calls {ours_calls}/{plain_calls}",
                flush=True,
            )
    finally:
        api._one_pass = one_pass
        TapFn.backward = tap_backward
        api.resolve = resolve
    detail["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return rows, detail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="llama-10M", choices=list(MODELS))
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output name (host_<device><tag>.md)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: perf_counter (the default; on a GPU always); cpu: this process's CPU time, which a busy machine "
        "inflates far less than wall time (use with --threads 1 on a shared CPU)",
    )
    args = ap.parse_args(argv)
    from benchmarks._common import cpu_name, write_csv

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" and dev.type == "cpu" else time.perf_counter
    rows, detail = run(dev, args.model, args.T, [int(b) for b in args.batches.split(",")], args.repeats, clock)
    where = (
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
        if dev.type == "cuda"
        else f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"host_{dev.type}{args.tag}"
    write_csv(out / f"{stem}.csv", rows, list(rows[0]))
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Host overhead of measure(): {args.model} ({detail['params_m']:.1f}M parameters), T = {args.T}",
        "",
        f"`python -m benchmarks.bench_host {' '.join(argv if argv is not None else sys.argv[1:])}` on {where}; "
        f"load average {load:.1f} at the end; clock: {'process CPU time' if clock is time.process_time else 'wall'}. "
        f"Medians of {args.repeats} round-robin repeats (every variant once "
        "per repeat). plain: forward+backward with weight gradients; frozen: the same without them; fixed: ours "
        "minus the time inside its pass; tap machinery: the pass with null ops minus frozen; ops: ours minus "
        "null ops; calls: interpreter calls of one warm pass (plain: HF's .loss forward+backward; ours: "
        "measure(model, v, {'risk': batch}), count_calls).",
        "",
        "| B | plain ms | frozen ms | ours ms | ours/plain | fixed ms | taps | tap machinery ms | per tap µs "
        "| ops ms | calls plain | calls ours | calls ours/plain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['plain_ms']:.2f} | {r['frozen_ms']:.2f} | {r['ours_ms']:.2f} "
            f"| {r['ours_over_plain']:.2f} "
            f"| {r['fixed_ms']:.2f} | {r['taps_per_pass']} | {r['tap_machinery_ms']:.2f} | {r['per_tap_us']:.1f} "
            f"| {r['ops_ms']:.2f} | {r['plain_calls']} | {r['ours_calls']} | {r['calls_ratio']:.2f} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
