"""Pairwise G-effect matrices and gradient sketches on CPU: time and peak memory, side by side.

    python -m benchmarks.bench_pairwise            # writes benchmarks/results/pairwise_cpu.{csv,md}
    python -m benchmarks.bench_pairwise --quick    # seconds

Pairwise (E[i, j] = ⟨∇ℓ_i, ∇ℓ^obj_j⟩ per group, B = B' = 8) by ``measure_pairwise`` (auto: the cost model per
layer; and each route forced) against materialising per-sample gradients (one backward per sample of either
set, flattened per group, then a Gram product) — across sequence length T (the ghost route's T² cost) and
layer width. Sketches (k × k Kronecker projections) in tokens per second: ``Sketcher`` with the reference
and the native ``segment_outer``, against a LogIX-style unfused projection that forms every token's k × k
outer product before summing. Each (case, method) runs in its own process (peak RSS of warm-up and repeats,
free heap returned first, minus RSS before).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import cpu_name, llama_model, padded_batch, peak_mb, reset_peak, rss_mb, write_csv

ROOT = Path(__file__).parent.parent
PAIR_CASES = {f"h{h} T{T}": (h, T) for h in (128, 512) for T in (32, 128, 512)}
PAIR_QUICK = {"h32 T16": (32, 16)}
PAIR_METHODS = ("pairwise[auto]", "pairwise[ghost]", "pairwise[materialise]", "materialise_per_sample")
SKETCH_CASES = {f"h512 N4096 k{k}": (512, k) for k in (16, 64)}
SKETCH_QUICK = {"h32 N64 k8": (32, 8)}
SKETCH_METHODS = ("sketch[native]", "sketch[reference]", "unfused_projection")


def _model(h: int, vocab: int = 2048, layers: int = 2):
    return llama_model(h, layers, 2 * h, max(1, h // 64), vocab, max_positions=1024)


def _batch(B: int, T: int, vocab: int, seed: int):
    return padded_batch(B, T, vocab, torch.Generator().manual_seed(seed), low=1, vary=False)


def _pair_run(case: str, method: str):
    import geffect_fast as gf
    from geffect_fast.groups import assign
    from geffect_fast.loss import forward_logits, sample_nll
    from geffect_fast.pairwise import measure_pairwise

    h, T = {**PAIR_CASES, **PAIR_QUICK}[case]
    model = _model(h)
    forget, retain = _batch(8, T, 2048, 1), _batch(8, T, 2048, 2)
    obj = gf.objectives.get("ga")
    if method.startswith("pairwise["):
        route = method[len("pairwise[") : -1]
        return lambda: measure_pairwise(model, obj, forget, {"r": retain}, method=route).matrix["r"]
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    grouping = assign(model, "block", names)

    def flat(per_sample_losses):
        rows = []
        for j in range(per_sample_losses.shape[0]):
            gr = torch.autograd.grad(per_sample_losses[j], params, retain_graph=True)
            rows.append(
                [
                    torch.cat([g.flatten() for n, g in zip(names, gr) if grouping.of[n] == k])
                    for k in range(len(grouping))
                ]
            )
        return rows

    def run():
        per_obj = obj.per_sample(model, forget)
        ell, _ = sample_nll(forward_logits(model, retain), retain["labels"])
        a, b = flat(ell), flat(per_obj)
        return torch.stack(
            [
                torch.stack([x[k] for x in a]).double() @ torch.stack([y[k] for y in b]).double().T
                for k in range(len(grouping))
            ]
        )

    return run


def _sketch_run(case: str, method: str):
    from geffect_fast.ops import pairwise as pw
    from geffect_fast.sketch import Sketcher

    h, k = {**SKETCH_CASES, **SKETCH_QUICK}[case]
    model = _model(h, vocab=8192, layers=4)
    B, T = (16, 256) if case in SKETCH_CASES else (4, 16)
    batch = _batch(B, T, 8192, 3)
    if method == "unfused_projection":
        # LogIX-style: project each token, form every token's k×k outer product, then sum per sample
        def unfused(u, w, seg, B):
            full = u[:, :, None] * w[:, None, :]
            return torch.zeros(B, u.shape[1], w.shape[1], dtype=full.dtype).index_add_(0, seg.long(), full)

        sk = Sketcher(model, k=k, seed=0, backend="reference")
        orig = pw.project

        def patched(left, right, seg, B, p_l, p_r, pad=None, segment_outer_op=None):
            return orig(left, right, seg, B, p_l, p_r, pad, segment_outer_op=unfused)

        pw.project = patched
        return lambda: sk.sketch(batch)
    backend = method[len("sketch[") : -1]
    sk = Sketcher(model, k=k, seed=0, backend=backend)
    return lambda: sk.sketch(batch)


def _worker(kind: str, case: str, method: str, repeats: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    run = (_pair_run if kind == "pairwise" else _sketch_run)(case, method)
    reset_peak()
    base = rss_mb()
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_extra_mb": max(0.0, peak_mb() - base)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.repeats)))
        return 0
    plan = [("pairwise", c, m) for c in (PAIR_QUICK if args.quick else PAIR_CASES) for m in PAIR_METHODS]
    plan += [("sketch", c, m) for c in (SKETCH_QUICK if args.quick else SKETCH_CASES) for m in SKETCH_METHODS]
    rows = []
    for kind, case, method in plan:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_pairwise",
            "--worker",
            kind,
            case,
            method,
            "--repeats",
            str(1 if args.quick else args.repeats),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        row = {"kind": kind, "case": case, "method": method}
        if proc.returncode != 0:
            row["status"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        else:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
            if kind == "sketch":
                h, k = {**SKETCH_CASES, **SKETCH_QUICK}[case]
                tokens = 16 * 256 if case in SKETCH_CASES else 64
                row["tokens_per_s"] = tokens / row["median_s"]
        rows.append(row)
        print(
            f"{kind:<9}{case:<18}{method:<24}{row.get('median_s', float('nan')):9.3f} s  "
            f"peak +{row.get('peak_extra_mb', float('nan')):8.1f} MB  {row['status'][:60]}",
            flush=True,
        )
    for kind, ref in (("pairwise", "materialise_per_sample"), ("sketch", "unfused_projection")):
        for r in rows:
            if r["kind"] == kind and r["status"] == "ok":
                base = next(
                    (
                        x
                        for x in rows
                        if x["kind"] == kind and x["case"] == r["case"] and x["method"] == ref and x["status"] == "ok"
                    ),
                    None,
                )
                if base:
                    r["speedup"] = base["median_s"] / r["median_s"]
    out = Path(args.out)
    stem = "pairwise_cpu_quick" if args.quick else "pairwise_cpu"
    keys = ["kind", "case", "method", "status", "median_s", "speedup", "peak_extra_mb", "tokens_per_s"]
    write_csv(out / f"{stem}.csv", rows, keys)
    lines = [
        f"# Pairwise matrices and sketches on CPU ({cpu_name()}, {os.environ.get('BENCH_THREADS', '2')} threads, "
        f"torch {torch.__version__})",
        "",
        f"Command: `python -m benchmarks.bench_pairwise{' --quick' if args.quick else ''}`. Pairwise: 2-block Llama",
        "of hidden h, B = B' = 8, GA objective, speedup against materialising per-sample gradients. Sketches:",
        "4-block Llama h512, 16 × 256 tokens, speedup against the unfused (LogIX-style) projection. Bergson:",
        "not installed (it pulls a CUDA torch here).",
        "",
        "| kind | case | method | s | speedup | peak extra MB | tokens/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['kind']} | {r['case']} | {r['method']} | {r['status']} | | | |")
            continue
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
        lines.append(
            f"| {r['kind']} | {r['case']} | {r['method']} | {r['median_s']:.3f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r['peak_extra_mb']:.0f} | {tps} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
