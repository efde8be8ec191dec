"""Core-engine benchmark: measure(per_instance=True) vs one plain forward+backward vs a per-sample autograd
loop, side by side in one run, on CPU Llama configs.

    python -m benchmarks.bench_core                      # full run, writes benchmarks/results/core_cpu.{csv,md}
    python -m benchmarks.bench_core --quick              # a small smoke run (seconds)

Each (case, method) runs in its own subprocess so that its peak memory can be read off the process: the
reported peak is the peak RSS of the warm-up and the timed repeats minus the RSS before them (model,
direction and batch already allocated; free heap returned to the OS first). Times are medians over repeats
after one warm-up. The per-sample values of ``measure`` and of the loop are compared in the same run (the
``agree`` column: max relative error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import cpu_name, llama_case, methods, peak_mb, reset_peak, rss_mb, write_csv

CASES = {
    # name: (hidden, layers, intermediate, heads, vocab, B, T)
    "llama512x4_B16_T64": (512, 4, 1376, 8, 32000, 16, 64),
    "llama512x4_B8_T128": (512, 4, 1376, 8, 32000, 8, 128),
}
QUICK_CASES = {"llama64x2_B4_T32": (64, 2, 128, 4, 512, 4, 32)}
METHODS = ("plain_fwd_bwd", "measure", "per_sample_loop")


def _worker(case_name: str, method: str, repeats: int, dump: str | None) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hidden, layers, inter, heads, vocab, B, T = {**CASES, **QUICK_CASES}[case_name]
    model, batch, V = llama_case(hidden, layers, inter, heads, vocab, B, T)
    run = methods(model, batch, V)[method]
    reset_peak()
    base = rss_mb()
    values = run()  # warm-up; its allocations count towards the peak
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = run()
        times.append(time.perf_counter() - t0)
    peak = peak_mb()
    if dump and values is not None:
        torch.save(values, dump)
    return {
        "case": case_name,
        "method": method,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
        "peak_extra_mb": max(0.0, peak - base),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke configuration")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default=None, help="result file stem (default core_cpu or core_cpu_quick)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.repeats, args.dump)))
        return 0

    cases = QUICK_CASES if args.quick else CASES
    repeats = 2 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            dumps = {}
            for method in METHODS:
                dump = os.path.join(tmp, f"{case}_{method}.pt")
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_core",
                    "--worker",
                    case,
                    method,
                    "--repeats",
                    str(repeats),
                    "--dump",
                    dump,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                if os.path.exists(dump):
                    dumps[method] = torch.load(dump)
                print(
                    f"{case:<22}{method:<18}{row['median_s']:>9.3f} s  peak +{row['peak_extra_mb']:8.1f} MB", flush=True
                )
            plain = next(r for r in rows if r["case"] == case and r["method"] == "plain_fwd_bwd")["median_s"]
            ref = dumps["per_sample_loop"]
            for r in rows:
                if r["case"] != case:
                    continue
                r["vs_plain"] = r["median_s"] / plain
                if r["method"] in dumps:
                    scale = ref.abs().amax(0).clamp_min(1e-30)
                    r["agree_max_rel"] = float(((dumps[r["method"]] - ref).abs() / scale).max())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("core_cpu_quick" if args.quick else "core_cpu")
    keys = ["case", "method", "median_s", "min_s", "repeats", "vs_plain", "peak_extra_mb", "agree_max_rel", "params_m"]
    write_csv(out / f"{stem}.csv", rows, keys)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    cpu = cpu_name()
    lines = [
        f"# Core engine on CPU ({cpu})",
        "",
        f"Machine: {machine}; {os.environ.get('BENCH_THREADS', '2')} threads. Command: "
        f"`python -m benchmarks.bench_core{' --quick' if args.quick else ''}`.",
        "Times: median of the repeats after a warm-up. Peak: peak RSS of the warm-up and repeats (VmHWM, reset",
        "first, free heap returned to the OS) minus RSS before them.",
        "`agree`: max relative error of the per-instance, per-group values against the per-sample loop.",
        "",
        "| case | method | median s | × plain fwd+bwd | peak extra MB | agree |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        agree = f"{r['agree_max_rel']:.1e}" if "agree_max_rel" in r else "–"
        lines.append(
            f"| {r['case']} | {r['method']} | {r['median_s']:.3f} | {r['vs_plain']:.2f} | "
            f"{r['peak_extra_mb']:.0f} | {agree} |"
        )
    lines.append("")
    for case in cases:
        m = next(r for r in rows if r["case"] == case and r["method"] == "measure")
        loop = next(r for r in rows if r["case"] == case and r["method"] == "per_sample_loop")
        lines.append(
            f"- {case}: measure = {m['vs_plain']:.2f}× plain fwd+bwd; per-sample loop / measure = "
            f"{loop['median_s'] / m['median_s']:.2f}×"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
