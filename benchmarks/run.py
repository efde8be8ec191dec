"""The benchmark suite: per-instance, per-group G-effects by every method, side by side in one run —
time, peak memory and agreement — across batch size, sequence length, model size, and GPT-2's tied head.

    python -m benchmarks.run             # the full CPU suite -> benchmarks/results/suite_cpu.{csv,md} + PNGs
    python -m benchmarks.run --small     # minutes: a tiny model, every method once (CI runs this)

Each (case, method) runs in its own subprocess, so its peak memory is its own (peak RSS during the timed
repeats, VmHWM reset first, minus the RSS before them) and a crash or timeout becomes a row saying so.
Times are medians after a warm-up. ``agree`` is the max relative difference (per group column, relative
to the column's largest value) from ``ours[auto]`` in the same run; Kronfluence, which tracks linear
layers only, is compared with ours on V restricted to the linear layers.
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

# model specs: (family, hidden, layers, intermediate, heads, vocab)
MODELS = {
    "llama-10M": ("llama", 256, 6, 688, 8, 8192),
    "llama-45M": ("llama", 512, 8, 1376, 8, 16384),
    "llama-135M": ("llama", 768, 12, 2048, 12, 32000),
    "gpt2-tied-10M": ("gpt2", 256, 6, 1024, 8, 8192),
    "llama-tiny": ("llama", 64, 2, 128, 4, 512),
    "gpt2-tiny": ("gpt2", 64, 2, 256, 4, 512),
}
# (case name, model, B, T, series)
FULL_CASES = (
    [(f"llama-10M B{B} T64", "llama-10M", B, 64, "B") for B in (1, 4, 16, 64)]
    + [(f"llama-10M B4 T{T}", "llama-10M", 4, T, "T") for T in (256, 1024)]
    + [(f"{m} B4 T64", m, 4, 64, "size") for m in ("llama-45M", "llama-135M")]
    + [("gpt2-tied-10M B4 T64", "gpt2-tied-10M", 4, 64, "tied")]
)
GPU_CASES = [
    ("llama-135M B16 T256", "llama-135M", 16, 256, "gpu"),
    ("llama-10M B64 T64", "llama-10M", 64, 64, "gpu"),
]
SMALL_CASES = [
    ("llama-tiny B1 T32", "llama-tiny", 1, 32, "B"),
    ("llama-tiny B4 T32", "llama-tiny", 4, 32, "B"),
    ("gpt2-tiny B4 T32", "gpt2-tiny", 4, 32, "tied"),
]
METHOD_ORDER = [
    "ours[auto]",
    "ours[reference]",
    "ours[native]",
    "plain_fwd_bwd",
    "per_sample_loop",
    "official_protocol",
    "torch.func_vmap",
    "opacus",
    "backpack",
    "kronfluence",
]


def build(model_name: str, B: int, T: int, device: str | torch.device = "cpu"):
    """(model, risk batch, query batch, V = ∇ Σ_q ℓ_q over the query batch), deterministic; all on ``device``
    (the direction's backward runs there: on a GPU worker it takes a fraction of a second, not minutes)."""
    import transformers as tf

    import geffect_fast as gf
    from geffect_fast.loss import forward_logits, sample_nll

    fam, hidden, layers, inter, heads, vocab = MODELS[model_name]
    if fam == "llama":
        model = llama_model(hidden, layers, inter, heads, vocab, max(T, 128))
    else:
        cfg = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_inner=inter,
            n_head=heads,
            n_positions=max(T, 128),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(cfg).eval()

    model = model.to(device)

    def batch(seed):
        b = padded_batch(B, T, vocab, torch.Generator().manual_seed(seed), low=1)
        return {k: t.to(device) for k, t in b.items()}

    risk, query = batch(1), batch(2)

    def query_loss(m, b, ref):
        return sample_nll(forward_logits(m, b), b["labels"])[0].sum()

    d = gf.Direction.from_objective(model, query_loss, query, name="v")
    V = {n: d.tensor(n)[0] for n in d.keys()}
    return model, risk, query, V


def _worker(case: str, method: str, repeats: int, dump: str, device: str = "cpu") -> dict:
    from benchmarks import methods as M

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = {c[0]: c for c in FULL_CASES + SMALL_CASES + GPU_CASES}[case]
    dev = torch.device(device)
    model, batch, query, V = build(spec[1], spec[2], spec[3], dev)
    grouping = M.group_of(model)
    extra = {}
    if method == "kronfluence":
        V = M.restrict_to_linear(model, V)
        # ours on the same linear-only direction, for the agreement column (before Kronfluence wraps the model)
        extra["ours_linear"] = M.ours("auto")(model, batch, V, grouping)()
        run = M.kronfluence(model, batch, V, grouping, query=query)
    else:
        run = M.METHODS[method](model, batch, V, grouping)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    reset_peak()
    base = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    values = run()  # warm-up (and the values); its allocations count towards the peak
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        values = run()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_mb()
    torch.save({"values": None if values is None else values.cpu(), **extra}, dump)
    return {
        "median_s": statistics.median(times),
        "peak_extra_mb": max(0.0, peak - base),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _agree(x, ref) -> float:
    scale = ref.abs().amax(0).clamp_min(1e-30)
    return float(((x - ref).abs() / scale).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny models, one repeat: minutes (CI)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per (case, method) process")
    ap.add_argument("--methods", default=",".join(METHOD_ORDER))
    ap.add_argument("--cases", default="", help="comma list of case names to run (default: every case of the mode)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU cases (peak = max_memory_allocated)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.repeats, args.dump, args.device)))
        return 0
    from benchmarks import methods as M

    gpu = args.device.startswith("cuda")
    cases = GPU_CASES if gpu else SMALL_CASES if args.small else FULL_CASES
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c[0] for c in cases}
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; this mode has {[c[0] for c in cases]}")
        cases = [c for c in cases if c[0] in wanted]
    repeats = 1 if args.small else args.repeats
    timeout = args.timeout or (120 if args.small else 900)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "suite_gpu" if gpu else "suite_cpu_small" if args.small else "suite_cpu"
    tmp = out / f".tmp-{stem}"
    tmp.mkdir(exist_ok=True)
    rows = []
    for case, model_name, B, T, series in cases:
        vals = {}
        for method in args.methods.split(","):
            dump = tmp / f"{method}.pt"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.run",
                "--worker",
                case,
                method,
                "--repeats",
                str(repeats),
                "--dump",
                str(dump),
                "--device",
                args.device,
            ]
            row = {"case": case, "model": model_name, "B": B, "T": T, "series": series, "method": method}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            except subprocess.TimeoutExpired:
                row["status"] = f"timeout after {timeout:.0f}s"
                rows.append(row)
                print(f"{case:<24}{method:<20} {row['status']}", flush=True)
                continue
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                last = lines[-1] if lines else f"exit code {proc.returncode}"
                if proc.returncode < 0 or proc.returncode == 137:
                    last = f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}; out of memory?)"
                row["status"] = last.replace("benchmarks.methods.Unsupported: ", "unsupported: ")[:240]
                rows.append(row)
                print(f"{case:<24}{method:<20} {row['status'][:100]}", flush=True)
                continue
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            row["status"] = "ok"
            vals[method] = torch.load(dump)
            rows.append(row)
            print(f"{case:<24}{method:<20}{row['median_s']:10.3f} s  peak +{row['peak_extra_mb']:8.1f} MB", flush=True)
        ref = vals.get("ours[auto]", {}).get("values")
        plain = next(
            (
                r["median_s"]
                for r in rows
                if r["case"] == case and r["method"] == "plain_fwd_bwd" and r["status"] == "ok"
            ),
            None,
        )
        ours_t = next(
            (r["median_s"] for r in rows if r["case"] == case and r["method"] == "ours[auto]" and r["status"] == "ok"),
            None,
        )
        for r in rows:
            if r["case"] != case or r["status"] != "ok":
                continue
            if plain:
                r["x_plain"] = r["median_s"] / plain
            if ours_t:
                r["x_ours"] = r["median_s"] / ours_t
            v = vals[r["method"]]
            if v["values"] is not None:
                if "ours_linear" in v:
                    r["agree"] = _agree(v["values"], v["ours_linear"])
                    r["note"] = "linear layers only"
                elif ref is not None:
                    r["agree"] = _agree(v["values"], ref)
    rows.append({"case": "all", "method": "bergson", "status": M.bergson_reason()})
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    keys = [
        "case",
        "model",
        "B",
        "T",
        "series",
        "method",
        "status",
        "median_s",
        "x_plain",
        "x_ours",
        "peak_extra_mb",
        "agree",
        "note",
        "params_m",
    ]
    write_csv(out / f"{stem}.csv", rows, keys)
    _markdown(rows, out / f"{stem}.md", args.small, repeats, args.device)
    if not args.small and not gpu:
        _plots(rows, out)
    print((out / f"{stem}.md").read_text())
    return 0


def _markdown(rows, path: Path, small: bool, repeats: int, device: str = "cpu") -> None:
    if device.startswith("cuda"):
        where = f"GPU ({torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__})"
        flag = f" --device {device}"
        memory = "peak = torch.cuda.max_memory_allocated over the warm-up and repeats minus memory before them."
    else:
        where = (
            f"CPU ({cpu_name()}, {os.cpu_count()} cores, {os.environ.get('BENCH_THREADS', '2')} threads, "
            f"torch {torch.__version__})"
        )
        flag = " --small" if small else ""
        memory = "peak = peak RSS of the warm-up and repeats minus RSS before them (free heap returned first)."
    lines = [
        f"# Benchmark suite on {where}",
        "",
        f"Command: `python -m benchmarks.run{flag}`. Per-instance, per-group G-effects of one",
        "direction V (the gradient of a query batch's summed per-sample NLL) on one risk batch. Median of",
        f"{repeats} repeat(s) after a warm-up, each (case, method) in its own process; {memory}",
        "`agree`: max relative difference from ours[auto] (per group column). × plain: time over one plain",
        "forward+backward of the same batch (the floor; not a G-effect).",
        "",
        "| case | method | status | s | × plain | × ours | peak extra MB | agree |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {r['method']} | {r['status']} | | | | | |")
            continue
        agree = f"{r['agree']:.1e}" + (" (linear only)" if r.get("note") else "") if "agree" in r else "–"
        lines.append(
            f"| {r['case']} | {r['method']} | ok | {r['median_s']:.3f} | {r.get('x_plain', float('nan')):.2f} | "
            f"{r.get('x_ours', float('nan')):.2f} | {r['peak_extra_mb']:.0f} | {agree} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _plots(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("series")]
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in ok)]
    for series, xkey, xlabel, fname in (
        ("B", "B", "batch size B (T = 64)", "suite_scaling_B.png"),
        ("T", "T", "sequence length T (B = 4)", "suite_scaling_T.png"),
        ("size", "params_m", "parameters (M), B = 4, T = 64", "suite_size.png"),
    ):
        pts = [r for r in ok if r["series"] == series or (series in ("T", "size") and r["case"] == "llama-10M B4 T64")]
        if not pts:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        for m in methods:
            mp = sorted((r[xkey], r["median_s"], r["peak_extra_mb"]) for r in pts if r["method"] == m)
            if len(mp) < 2:
                continue
            xs, ts, ms = zip(*mp)
            axes[0].plot(xs, ts, marker="o", label=m)
            axes[1].plot(xs, [max(v, 1.0) for v in ms], marker="o", label=m)
        for ax, yl in zip(axes, ("median time (s)", "peak extra memory (MB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Per-instance, per-group G-effects on CPU: scaling with {xlabel.split(' (')[0].split(',')[0]}")
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
