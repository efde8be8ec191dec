"""Factored directions: ``from_objective + measure`` dense against factored against one plain forward+backward,
and the cost model's route choice per layer against measured times.

    python -m benchmarks.bench_factored                  # CPU, 1 thread, process CPU time (the committed results)
    python -m benchmarks.bench_factored --quick          # seconds: tiny grid (a dry run; tests use it)
    python -m benchmarks.bench_factored --device cuda --out DIR --part layers,models --grid gpu   # gpu_check.sh

Two parts, each timed round-robin per grid point (every repeat runs every variant once, so load drift hits them
alike; medians):

1. ``layers`` — one linear layer (weight [O, I]) against K objective directions, with the code ``measure()``
   runs: ``dense`` = form V from the factors (``FactoredEntry.dense_tensor``: the weight-gradient GEMM the
   objective's backward would run) + ``ops.linear_dot`` on the N risk rows (B = N/64 samples); ``factored`` =
   the factored sink's work (rows without gradient dropped, ``factored.pair_use``: tiles of
   Σ_t Σ_s (g_t·g'_s)(a_t·a'_s)). Beside them the cost model's predicted seconds (``factored.route_costs``
   with ``factored.MACHINES``) and its choice. Also measured here: the GEMM rate, the streaming bandwidth and
   the per-op cost that the CPU machine constants come from.
2. ``models`` — a 1-block Llama of hidden h (intermediate h, h/64 heads, vocab 1024), risk batch 16 × 64 tokens,
   GA objective on 64-token rows (the objective batch N' = rows × 64 positions, about 70% of them labelled or
   before a label): ``plain`` = one forward+backward of the risk batch with weight gradients (the floor);
   ``dense`` = ``Direction.from_objective`` + ``measure(per_instance=True)``; ``factored`` =
   ``from_objective(factored=True)`` + ``measure(route="factored")``; ``auto`` = the same with
   ``route="auto"``. Peak memory: extra RSS over the call (CPU; free heap returned and the kernel's peak mark
   reset first) or ``max_memory_allocated`` above the start (CUDA). ``agree``: max |factored − dense| per
   instance relative to the largest.

Writes ``factored_layers_<dev>.{csv,md}``, ``factored_models_<dev>.{csv,md}`` and ``factored_crossover_<dev>.png``
(time of factored / dense against N' per hidden size, measured and as the cost model predicts).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import cpu_name, llama_model, padded_batch, peak_mb, reset_peak, rss_mb, write_csv

ROOT = Path(__file__).parent.parent
VOCAB = 1024
T = 64

# (I, O, N, N', K)
LAYERS_CPU = (
    [(h, h, N, n2, 1) for h in (256, 512, 1024, 2048, 4096) for N in (512, 2048) for n2 in (64, 256, 1024, 4096)]
    + [(1024, 4096, 2048, n2, 1) for n2 in (64, 256, 1024, 4096)]
    + [(1024, 1024, 2048, n2, 3) for n2 in (64, 256, 1024, 4096)]
)
LAYERS_GPU = [(h, h, N, n2, 1) for h in (1024, 4096, 8192) for N in (4096, 16384) for n2 in (256, 2048, 16384)] + [
    (4096, 11008, 16384, n2, 1) for n2 in (256, 2048, 16384)
]
LAYERS_QUICK = [(32, 32, 128, n2, 1) for n2 in (64, 256)] + [(32, 48, 128, 64, 2)]
# (hidden, objective rows of 64 tokens); the risk batch is 16 × 64
MODELS_CPU = [(h, n2 // T) for h in (256, 512, 1024, 2048, 4096) for n2 in (64, 256, 1024, 4096)]
MODELS_GPU = [(h, n2 // T) for h in (2048, 4096) for n2 in (256, 1024, 4096)]
MODELS_QUICK = [(64, 1), (64, 2)]
METHODS = ("plain", "dense", "factored", "auto")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Clock:
    """Process CPU time on the CPU (robust to other processes' load), wall time around a sync on CUDA."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.now = time.process_time if dev.type == "cpu" else time.perf_counter

    def run(self, fn):
        """(seconds, peak extra MB, result) of one call."""
        _sync(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            base = torch.cuda.memory_allocated(self.dev)
        else:
            reset_peak()
            base = rss_mb()
        t0 = self.now()
        out = fn()
        _sync(self.dev)
        dt = self.now() - t0
        if self.dev.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(self.dev) - base) / 2**20
        else:
            peak = peak_mb() - base
        return dt, peak, out


def _round_robin(clock: _Clock, fns: dict, repeats: int, warm: bool = True) -> tuple[dict, dict, dict]:
    times = {k: [] for k in fns}
    peaks = {k: [] for k in fns}
    outs = {}
    for k, f in fns.items() if warm else ():  # warm-up (allocator, first-call checks), not timed
        outs[k] = f()
    for _ in range(repeats):
        for k, f in fns.items():
            dt, pk, outs[k] = clock.run(f)
            times[k].append(dt)
            peaks[k].append(pk)
    return (
        {k: statistics.median(v) for k, v in times.items()},
        {k: max(v) for k, v in peaks.items()},
        outs,
    )


# -- machine constants ------------------------------------------------------------------------------------
def calibrate(dev: torch.device, dtype: torch.dtype, clock: _Clock) -> dict[str, float]:
    """GEMM rate at a tile-sized product, streaming bandwidth of a large copy, seconds per small op."""
    n, k = (832, 1024) if dev.type == "cpu" else (4096, 4096)
    a = torch.randn(n, k, device=dev, dtype=dtype)
    b = torch.randn(k, n, device=dev, dtype=dtype)
    x = torch.randn(32 << 20 >> 2, device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    s = torch.randn(16, device=dev)
    reps = 5 if dev.type == "cpu" else 50
    t_mm, _, _ = _round_robin(clock, {"mm": lambda: [a @ b for _ in range(reps)]}, 3)
    t_cp, _, _ = _round_robin(clock, {"cp": lambda: [y.copy_(x) for _ in range(reps)]}, 3)
    t_op, _, _ = _round_robin(clock, {"op": lambda: [s.add(1) for _ in range(200)]}, 3)
    return {
        "gemm_flops": 2 * n * k * n * reps / t_mm["mm"],
        "bandwidth": 2 * x.numel() * 4 * reps / t_cp["cp"],
        "op_s": t_op["op"] / 200,
    }


# -- 1. layers ----------------------------------------------------------------------------------------------
def bench_layers(
    dev: torch.device, shapes: list, repeats: int, clock: _Clock, dtype: torch.dtype, deadline: float
) -> list[dict]:
    from geffect_fast.engine import FactoredEntry, FactorUse
    from geffect_fast.engine import routes as fm
    from geffect_fast.ops import resolve
    from geffect_fast.ops.factored import nonzero_rows, pair_use

    ops = resolve("auto", dev, dtype, torch.float32)
    machine = fm.machine_for(dev, dtype)
    size = torch.finfo(dtype).bits // 8
    rows = []
    for i_w, o_w, N, n2, K in shapes:
        if time.perf_counter() > deadline:
            print(f"budget spent: layer shapes from I{i_w} O{o_w} N{N} N'{n2} K{K} on are left out", flush=True)
            break
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(*shape, g=g):
            return torch.randn(*shape, device=dev, generator=g).to(dtype)

        a, gr = rnd(N, i_w), rnd(N, o_w)
        uses = [FactorUse(k, rnd(n2, o_w), rnd(n2, i_w)) for k in range(K)]
        entry = FactoredEntry((o_w, i_w), dtype, dev, K, uses)
        B = max(1, N // T)
        seg = N // B

        def dense(entry=entry, a=a, gr=gr, B=B, seg=seg):
            V = entry.dense_tensor()
            return ops.linear_dot(a, gr, V, seg, B)[0]

        def factored(entry=entry, a=a, gr=gr, B=B, seg=seg):
            L, R, s = nonzero_rows(gr, a, seg, B, None)
            return torch.stack([pair_use(L, R, s, B, u.L, u.R, None, ops, torch.float32) for u in entry.uses])

        t, _, outs = _round_robin(clock, {"dense": dense, "factored": factored}, repeats)
        pred = fm.route_costs(
            [fm.UseShape(False, o_w, i_w, n2)] * K, [fm.UseShape(False, o_w, i_w, N)], [N], K, 0, size, 4, machine
        )
        ref = outs["dense"].double()
        agree = float((outs["factored"].double() - ref).abs().max() / ref.abs().max())
        choice = "factored" if pred["factored"] < pred["dense"] else "dense"
        faster = min(t, key=t.get)
        rows.append(
            {
                "I": i_w,
                "O": o_w,
                "N": N,
                "N_obj": n2,
                "K": K,
                "dtype": str(dtype).replace("torch.", ""),
                "dense_s": round(t["dense"], 5),
                "factored_s": round(t["factored"], 5),
                "pred_dense_s": round(pred["dense"], 5),
                "pred_factored_s": round(pred["factored"], 5),
                "model_choice": choice,
                "faster": faster,
                "choice_vs_best": round(t[choice] / t[faster], 3),
                "agree": f"{agree:.1e}",
            }
        )
        print(f"layer I{i_w} O{o_w} N{N} N'{n2} K{K}: {rows[-1]}", flush=True)
    return rows


# -- 2. models ----------------------------------------------------------------------------------------------
def bench_models(
    dev: torch.device,
    cases: list,
    repeats: int,
    clock: _Clock,
    repeats_big: int,
    deadline: float,
    repeats_small: int | None = None,
) -> list[dict]:
    repeats_small = repeats if repeats_small is None else repeats_small
    import geffect_fast as gf
    from geffect_fast.engine import routes as fm

    rows = []
    obj = gf.objectives.get("ga")
    for h, obj_rows in cases:
        if time.perf_counter() > deadline:
            print(f"budget spent: model cases from h{h} N'{obj_rows * T} on are left out", flush=True)
            break
        model = llama_model(h, 1, h, max(1, h // 64), VOCAB, 2 * T).to(dev)
        gen = torch.Generator().manual_seed(1)
        risk = {k: v.to(dev) for k, v in padded_batch(16, T, VOCAB, gen).items()}
        fb = {k: v.to(dev) for k, v in padded_batch(obj_rows, T, VOCAB, gen).items()}
        risks = {"risk": risk}

        def plain(model=model, risk=risk):
            out = model(input_ids=risk["input_ids"], attention_mask=risk["attention_mask"], labels=risk["labels"])
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        def dense(model=model, fb=fb, risks=risks):
            d = gf.Direction.from_objective(model, obj, fb)
            return gf.measure(model, d, risks, per_instance=True)

        def fact(route, model=model, fb=fb, risks=risks):
            d = gf.Direction.from_objective(model, obj, fb, factored=True)
            return gf.measure(model, d, risks, per_instance=True, route=route)

        fns = {"plain": plain, "dense": dense, "factored": lambda: fact("factored"), "auto": lambda: fact("auto")}
        reps = repeats_small if h <= 1024 else repeats if h < 4096 else repeats_big
        t, peak, outs = _round_robin(clock, fns, reps, warm=h < 4096)  # at 4096 a first call's extra is < 1%
        ref = outs["dense"].instances["risk"]
        agree = float((outs["factored"].instances["risk"] - ref).abs().max() / ref.abs().max())
        meta = outs["auto"].meta
        n_obj = fm.active_rows(fb)
        for m in METHODS:
            rows.append(
                {
                    "hidden": h,
                    "N_risk": fm.active_rows(risk),
                    "N_obj_rows": obj_rows * T,
                    "N_obj": n_obj,
                    "method": m,
                    "s": round(t[m], 4),
                    "x_plain": round(t[m] / t["plain"], 3),
                    "x_dense": round(t[m] / t["dense"], 3),
                    "peak_extra_MB": round(peak[m], 1),
                    "pred_dense_s": round(meta["route_costs"]["dense"], 4),
                    "pred_factored_s": round(meta["route_costs"]["factored"], 4),
                    "auto_routes": ";".join(f"{k}={v}" for k, v in meta["direction_routes"].items()),
                    "agree": f"{agree:.1e}",
                    "repeats": reps,
                }
            )
        print(f"model h{h} N'{obj_rows * T}: " + ", ".join(f"{m} {t[m]:.3f}s" for m in METHODS), flush=True)
        del model, outs
    return rows


# -- crossovers and the report -------------------------------------------------------------------------------
def crossover(xs: list[float], ratio: list[float]) -> float | None:
    """The x (log-interpolated) where ratio = factored/dense first crosses 1 going up; None: no crossing, inf:
    factored cheaper everywhere, 0: dense cheaper everywhere."""
    pts = sorted(zip(xs, ratio))
    if all(r < 1 for _, r in pts):
        return math.inf
    if all(r >= 1 for _, r in pts):
        return 0.0
    for (x0, r0), (x1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0)))
    return None


def _fmt_x(x: float | None, hi: float) -> str:
    if x is None:
        return "–"
    if x == math.inf:
        return f"> {hi:.0f} (factored everywhere)"
    if x == 0.0:
        return "dense everywhere"
    return f"{x:.0f}"


def plot(layer_rows: list[dict], model_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    hs = sorted({r["hidden"] for r in model_rows})
    colors = plt.cm.viridis([i / max(1, len(hs) - 1) for i in range(len(hs))])
    for h, c in zip(hs, colors):
        pts = sorted(
            (r["N_obj"], r["s"] / d["s"], r["pred_factored_s"] / r["pred_dense_s"])
            for r in model_rows
            if r["hidden"] == h and r["method"] == "factored"
            for d in model_rows
            if d["hidden"] == h and d["method"] == "dense" and d["N_obj_rows"] == r["N_obj_rows"]
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"h{h} measured")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=c, alpha=0.7, label=f"h{h} model")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="objective tokens N' (active rows)", ylabel="time factored / dense")
    ax.set_title("1-block Llama: from_objective + measure, risk 16×64", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    keys = sorted({(r["I"], r["O"], r["N"], r["K"], r["dtype"]) for r in layer_rows})
    colors = plt.cm.plasma([i / max(1, len(keys) - 1) for i in range(len(keys))])
    for key, c in zip(keys, colors):
        pts = sorted(
            (r["N_obj"], r["factored_s"] / r["dense_s"], r["pred_factored_s"] / r["pred_dense_s"])
            for r in layer_rows
            if (r["I"], r["O"], r["N"], r["K"], r["dtype"]) == key
        )
        lab = f"I{key[0]} O{key[1]} N{key[2]}" + (f" K{key[3]}" if key[3] > 1 else "")
        lab += "" if key[4] == "float32" else f" {key[4]}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=lab, ms=3)
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=c, alpha=0.6)
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="objective rows N'", ylabel="time factored / dense")
    ax.set_title("one linear layer (solid measured, dashed cost model)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(dev, machine_txt, calib, layer_rows, model_rows, cmd, out: Path, tag: str) -> str:
    from geffect_fast.engine import routes as fm

    lines = [f"# Factored directions: dense vs factored ({machine_txt})", "", f"Command: `{cmd}`.", ""]
    mach = fm.machine_for(dev, torch.float32)
    lines += [
        f"Measured in this run: GEMM {calib['gemm_flops'] / 1e9:.0f} GFLOP/s, "
        f"copy {calib['bandwidth'] / 1e9:.1f} GB/s, "
        f"{calib['op_s'] * 1e6:.1f} µs per small op; the cost model's constants (factored.MACHINES): "
        f"{mach.flops / 1e9:.0f} GFLOP/s, {mach.bandwidth / 1e9:.1f} GB/s, {mach.call * 1e6:.1f} µs per op.",
        "",
    ]
    if model_rows:
        lines += [
            "## from_objective + measure on a 1-block Llama (risk batch 16 × 64)",
            "",
            "| hidden | N' rows | N' active | plain s | dense s | factored s | auto s | factored/dense | auto/best "
            "| × plain (factored) | peak MB plain/dense/factored | auto routes | agree |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        keyed = {(r["hidden"], r["N_obj_rows"], r["method"]): r for r in model_rows}
        for h, n in sorted({(r["hidden"], r["N_obj_rows"]) for r in model_rows}):
            p, d, f, a = (keyed[(h, n, m)] for m in METHODS)
            best = min(d["s"], f["s"])
            routes = a["auto_routes"].replace("Linear.weight=", "lin=").replace("Embedding.weight=", "emb=")
            lines.append(
                f"| {h} | {n} | {f['N_obj']} | {p['s']:.3f} | {d['s']:.3f} | {f['s']:.3f} | {a['s']:.3f} | "
                f"{f['s'] / d['s']:.2f} | {a['s'] / best:.2f} | {f['x_plain']:.2f} | "
                f"{p['peak_extra_MB']:.0f}/{d['peak_extra_MB']:.0f}/{f['peak_extra_MB']:.0f} | {routes} | "
                f"{f['agree']} |"
            )
        lines += ["", "Crossover in N' (active objective rows) where factored stops being faster, per hidden size:", ""]
        lines += ["| hidden | measured | cost model | FLOP formula N·c/(N − c), c = h/2 |", "|---:|---|---|---|"]
        for h in sorted({r["hidden"] for r in model_rows}):
            rs = sorted(
                (r for r in model_rows if r["hidden"] == h and r["method"] == "factored"), key=lambda r: r["N_obj"]
            )
            ds = {r["N_obj_rows"]: r for r in model_rows if r["hidden"] == h and r["method"] == "dense"}
            xs = [r["N_obj"] for r in rs]
            meas = crossover(xs, [r["s"] / ds[r["N_obj_rows"]]["s"] for r in rs])
            pred = crossover(xs, [r["pred_factored_s"] / r["pred_dense_s"] for r in rs])
            N, c = rs[0]["N_risk"], h / 2
            flop = N * c / (N - c) if N > c else math.inf
            lines.append(f"| {h} | {_fmt_x(meas, max(xs))} | {_fmt_x(pred, max(xs))} | {_fmt_x(flop, 1e12)} |")
        lines.append("")
    if layer_rows:
        lines += [
            "## One linear layer: the two routes and the cost model's choice",
            "",
            "| I | O | N | N' | K | dtype | dense s | factored s | model dense s | model factored s | choice | faster "
            "| choice/best | agree |",
            "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---:|---:|",
        ]
        for r in layer_rows:
            lines.append(
                f"| {r['I']} | {r['O']} | {r['N']} | {r['N_obj']} | {r['K']} | {r['dtype']} | {r['dense_s']} | "
                f"{r['factored_s']} | "
                f"{r['pred_dense_s']} | {r['pred_factored_s']} | {r['model_choice']} | {r['faster']} | "
                f"{r['choice_vs_best']} | {r['agree']} |"
            )
        right = sum(r["model_choice"] == r["faster"] for r in layer_rows)
        worst = max(layer_rows, key=lambda r: r["choice_vs_best"])
        lines += [
            "",
            f"The model picks the faster route at {right} of {len(layer_rows)} shapes; its worst pick costs "
            f"{worst['choice_vs_best']:.2f}× the better route (I{worst['I']} O{worst['O']} N{worst['N']} "
            f"N'{worst['N_obj']} K{worst['K']}).",
            "",
            "Crossover in N' per layer shape (measured / cost model):",
            "",
        ]
        for key in sorted({(r["I"], r["O"], r["N"], r["K"], r["dtype"]) for r in layer_rows}):
            rs = sorted(
                (r for r in layer_rows if (r["I"], r["O"], r["N"], r["K"], r["dtype"]) == key),
                key=lambda r: r["N_obj"],
            )
            xs = [r["N_obj"] for r in rs]
            meas = crossover(xs, [r["factored_s"] / r["dense_s"] for r in rs])
            pred = crossover(xs, [r["pred_factored_s"] / r["pred_dense_s"] for r in rs])
            lines.append(
                f"- I{key[0]} O{key[1]} N{key[2]} K{key[3]} {key[4]}: {_fmt_x(meas, max(xs))} / {_fmt_x(pred, max(xs))}"
            )
        lines.append("")
    lines.append(f"![crossover](factored_crossover_{tag}.png)")
    text = "\n".join(lines) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grid", default=None, help="cpu | gpu | quick (default: by device, quick with --quick)")
    ap.add_argument("--part", default="layers,models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-big", type=int, default=1, help="repeats of the hidden-4096 models (CPU time)")
    ap.add_argument("--repeats-small", type=int, default=None, help="repeats of the models up to hidden 1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", default="float32", help="layer part: comma list of float32, bfloat16")
    ap.add_argument("--budget", type=float, default=math.inf, help="wall seconds; later grid points are left out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    grid = args.grid or ("quick" if args.quick else ("gpu" if dev.type == "cuda" else "cpu"))
    layers = {"cpu": LAYERS_CPU, "gpu": LAYERS_GPU, "quick": LAYERS_QUICK}[grid]
    models = {"cpu": MODELS_CPU, "gpu": MODELS_GPU, "quick": MODELS_QUICK}[grid]
    parts = set(args.part.split(","))
    clock = _Clock(dev)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if grid == "quick" else ("cpu" if dev.type == "cpu" else "gpu")
    calib = calibrate(dev, torch.float32, clock)
    print(f"calibration: {calib}", flush=True)
    layer_rows = []
    if "layers" in parts:
        for name in args.dtypes.split(","):
            layer_rows += bench_layers(dev, layers, args.repeats, clock, getattr(torch, name), deadline)
    model_rows = []
    if "models" in parts:
        model_rows = bench_models(dev, models, args.repeats, clock, args.repeats_big, deadline, args.repeats_small)
    load = os.getloadavg()[0]
    if dev.type == "cuda":
        machine_txt = f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    else:
        machine_txt = (
            f"{cpu_name()}, {args.threads} thread(s) of {os.cpu_count()} cores, torch {torch.__version__}; "
            f"clock: process CPU time; load average {load:.1f} at the end"
        )
    cmd = "python -m benchmarks.bench_factored " + " ".join(argv if argv is not None else sys.argv[1:])
    if layer_rows:
        write_csv(out / f"factored_layers_{tag}.csv", layer_rows, list(layer_rows[0]))
    if model_rows:
        write_csv(out / f"factored_models_{tag}.csv", model_rows, list(model_rows[0]))
    if layer_rows and model_rows:
        plot(layer_rows, model_rows, out / f"factored_crossover_{tag}.png")
    text = report(dev, machine_txt, calib, layer_rows, model_rows, cmd.strip(), out, tag)
    (out / f"factored_{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
