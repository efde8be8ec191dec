"""Host cost of one ``measure()`` pass against a plain forward+backward, through the public API only, so that the
same script times two revisions of the package (issue 19's before -> after):

    PYTHONPATH=<checkout> python -m benchmarks.host_ab --label after  --out R   # once per revision, in turn
    python -m benchmarks.host_ab --render R/host_ab_*.json > benchmarks/results/host_before_after_cpu.md

Per batch size B (llama-10M from :mod:`benchmarks.bench_host`'s table, T = 64, a prebuilt Direction over every
parameter, ``measure(model, v, {"risk": batch}, per_instance=True)``), plain and ours are timed round-robin in
one process (each repeat runs both once, so load drift hits them alike; medians), and the Python-level calls of
one warm pass are counted (``sys.setprofile``: every Python function call and every C call made from Python).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import llama_model
from benchmarks.bench_host import MODELS


def _count(fn) -> int:
    """Python function calls + C calls from Python during ``fn()``."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def _model(name: str):
    h, layers, inter, heads, vocab = MODELS[name]
    return llama_model(h, layers, inter, heads, vocab, max_positions=512)


def run(label: str, model_name: str, T: int, batches: list[int], repeats: int) -> dict:
    import geffect_fast as gf

    model = _model(model_name)
    vocab = MODELS[model_name][4]
    g = torch.Generator().manual_seed(1)
    v = gf.Direction({n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}, "v")
    rows = []
    for B in batches:
        ids = torch.randint(2, vocab, (B, T), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        def plain(batch=batch):
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

        def ours(batch=batch):
            gf.measure(model, v, {"risk": batch}, per_instance=True)

        for _ in range(3):  # warm: plans, caches, allocator
            plain()
            ours()
        calls = (_count(plain), _count(ours))
        times: dict[str, list[float]] = {"plain": [], "ours": []}
        for _ in range(repeats):
            for name, fn in (("plain", plain), ("ours", ours)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
        ratios = sorted(b / a for a, b in zip(times["plain"], times["ours"]))
        rows.append(
            {
                "B": B,
                "plain_ms": 1e3 * p,
                "ours_ms": 1e3 * o,
                "ratio": o / p,
                "ratio_q1": ratios[len(ratios) // 4],
                "ratio_q3": ratios[(3 * len(ratios)) // 4],
                "calls_plain": calls[0],
                "calls_ours": calls[1],
            }
        )
        print(f"{label} B={B}: plain {1e3 * p:.1f} ms, ours {1e3 * o:.1f} ms, {o / p:.3f}x; calls {calls}", flush=True)
    return {
        "label": label,
        "model": model_name,
        "T": T,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }


def render(paths: list[Path]) -> str:
    """A Markdown table: per B, each revision's ours/plain ratio (median, interquartile range) and call counts."""
    runs = [json.loads(p.read_text()) for p in paths]
    lines = [
        "| run | B | plain ms | ours ms | ours/plain (IQR) | calls plain | calls ours | calls ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for row in r["rows"]:
            lines.append(
                f"| {r['label']} | {row['B']} | {row['plain_ms']:.1f} | {row['ours_ms']:.1f} | "
                f"{row['ratio']:.3f} ({row['ratio_q1']:.3f}–{row['ratio_q3']:.3f}) | {row['calls_plain']} | "
                f"{row['calls_ours']} | {row['calls_ours'] / row['calls_plain']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="this")
    ap.add_argument("--model", default="llama-10M", choices=list(MODELS))
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("--render", nargs="*", help="render these JSON results as one Markdown table and exit")
    a = ap.parse_args(argv)
    if a.render:
        print(render([Path(p) for p in a.render]), end="")
        return 0
    torch.set_num_threads(a.threads)
    res = run(a.label, a.model, a.T, [int(b) for b in a.batches.split(",")], a.repeats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"host_ab_{a.label}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
