"""Core-engine benchmark: measure(per_instance=True) vs one plain forward+backward vs a per-sample autograd
loop, side by side in one run, on CPU Llama configs.

    python -m benchmarks.bench_core                      # full run, writes benchmarks/results/core_cpu.{csv,md}
    python -m benchmarks.bench_core --quick              # a small smoke run (seconds)

Each (case, method) runs in its own subprocess so that its peak memory can be read off the process: the
reported peak is max RSS during the timed repeats minus the RSS before them (model, direction and batch
already allocated). Times are medians over repeats after one warm-up. The per-sample values of
``measure`` and of the loop are compared in the same run (the ``agree`` column: max relative error).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    # name: (hidden, layers, intermediate, heads, vocab, B, T)
    "llama512x4_B16_T64": (512, 4, 1376, 8, 32000, 16, 64),
    "llama512x4_B8_T128": (512, 4, 1376, 8, 32000, 8, 128),
}
QUICK_CASES = {"llama64x2_B4_T32": (64, 2, 128, 4, 512, 4, 32)}
METHODS = ("plain_fwd_bwd", "measure", "per_sample_loop")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the peak covers the timed repeats only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def _build(case):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, vocab, B, T = case
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(T, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    for b in range(B):  # varied lengths, right padding
        cut = T - (b % 4) * (T // 16)
        mask[b, cut:] = 0
        labels[b, cut:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    V = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    return model, batch, V


def _worker(case_name: str, method: str, repeats: int, dump: str | None) -> dict:
    import geffect_fast as gf
    from geffect_fast.groups import assign
    from geffect_fast.loss import forward_logits, sample_nll

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    case = {**CASES, **QUICK_CASES}[case_name]
    model, batch, V = _build(case)
    names = [n for n, _ in model.named_parameters()]
    grouping = assign(model, "block", names)
    direction = gf.Direction(V, "v")
    params = dict(model.named_parameters())
    values = None

    if method == "plain_fwd_bwd":

        def run():
            loss = gf.risk(model, batch)
            loss.backward()
            for p in model.parameters():
                p.grad = None

    elif method == "measure":

        def run():
            nonlocal values
            res = gf.measure(model, direction, {"r": batch}, per_instance=True)
            values = res.per_instance["r"]

    elif method == "per_sample_loop":
        plist = [params[n] for n in names]
        gidx = torch.tensor([grouping.of[n] for n in names])
        B = batch["input_ids"].shape[0]

        def run():
            nonlocal values
            out = torch.zeros(B, len(grouping), dtype=torch.float64)
            for b in range(B):
                sub = {k: t[b : b + 1] for k, t in batch.items()}
                ell, n = sample_nll(forward_logits(model, sub), sub["labels"])
                grads = torch.autograd.grad(ell.sum(), plist)
                dots = torch.stack([(g * V[nm]).sum() for g, nm in zip(grads, names)]).double()
                out[b].index_add_(0, gidx, dots)
            values = out

    else:  # pragma: no cover
        raise ValueError(method)

    run()  # warm-up
    base = _rss_mb()
    _reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = _peak_mb()
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
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    cpu = _cpu_name()
    lines = [
        f"# Core engine on CPU ({cpu})",
        "",
        f"Machine: {machine}; {os.environ.get('BENCH_THREADS', '2')} threads. Command: "
        f"`python -m benchmarks.bench_core{' --quick' if args.quick else ''}`.",
        "Times: median of the repeats after a warm-up. Peak: peak RSS during the repeats (VmHWM, reset before",
        "them) minus RSS before them.",
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


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
