"""The GPU check's verdict block: each target, its measured value, pass or miss, and each step's exit code and
time — at most ``LIMIT`` characters, the last thing benchmarks/gpu_check.sh prints (the device tool returns the
last 12,000 characters of output; the full tables stay in the tarball). Standard library only: it runs even where
torch does not import.

    python -m benchmarks.gpu_verdict WORKDIR [--simulated]    # prints the block and writes WORKDIR/verdict.txt

Reads from WORKDIR what the steps wrote: machine.txt, steps.tsv (name, exit code, seconds, budget), build.log,
tests.log, ops_gpu.csv and e2e_gpu.csv (benchmarks/bench_gpu.py). A file that is missing (a step that failed or
was cut) makes its targets "not measured", never an error.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

LIMIT = 3000
HEADER = "GPU CHECK VERDICT"
#: targets (issue 21): linear_dot ≥ 0.75× the same-shape cuBLAS GEMM (split rows: two GEMMs); embedding/norm ≥ 60%
#: of the measured copy bandwidth; measure(per_instance=True) ≤ 1.10× plain forward+backward at K = 1
LINEAR_MIN, COPY_MIN, E2E_MAX, MOE_MAX = 0.75, 0.60, 1.10, 1.15
ROUTES = {
    "cuda (cuBLAS+epilogue)": "cuda",
    "triton fused (heuristic)": "triton fused",
    "triton gemm route (cuBLAS+Triton epilogue)": "triton gemm",
}


def _rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _num(row: dict, key: str) -> float | None:
    try:
        return float(row.get(key) or "")
    except ValueError:
        return None


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def linear_lines(rows: list[dict], why: str) -> list[str]:
    lin = [r for r in rows if r.get("route") in ROUTES and _num(r, "vs_gemm") is not None]
    if not lin:
        return [f"linear_dot vs cuBLAS (>= {LINEAR_MIN}x): not measured ({why})"]
    out = []
    key = lin[0]["shape"]
    for label, what in (("bf16", f"vs cuBLAS, {key}"), ("bf16+fp32 dir", f"split vs 2 GEMMs, {key}")):
        at = [r for r in lin if r["shape"] == key and r["dtype"] == label]
        if at:
            cells = [
                f"{ROUTES[r['route']]}{' [' + r['config'] + ']' if r.get('config') else ''} {_num(r, 'vs_gemm'):.2f}x "
                f"{_mark(_num(r, 'vs_gemm') >= LINEAR_MIN)}"
                for r in at
            ]
            out.append(f"linear_dot {what} (>= {LINEAR_MIN}x): " + "; ".join(cells))
    shapes = {r["shape"] for r in lin}
    if len(shapes) > 1:
        cells = []
        for route in dict.fromkeys(r["route"] for r in lin):
            worst = min((r for r in lin if r["route"] == route), key=lambda r: _num(r, "vs_gemm"))
            v = _num(worst, "vs_gemm")
            cells.append(f"{ROUTES[route]} {v:.2f}x {_mark(v >= LINEAR_MIN)} ({worst['shape']} {worst['dtype']})")
        out.append(f"linear_dot worst of {len(shapes)} shapes: " + "; ".join(cells))
    return out


def copy_lines(rows: list[dict], why: str) -> list[str]:
    out = []
    for op in ("embedding_dot", "norm_dot"):
        got = [r for r in rows if r.get("op") == op and _num(r, "of_copy") is not None]
        if not got:
            out.append(f"{op} (>= {COPY_MIN:.0%} of copy bandwidth): not measured ({why})")
            continue
        cells = []
        for backend in dict.fromkeys(r["backend"] for r in got):
            worst = min((r for r in got if r["backend"] == backend), key=lambda r: _num(r, "of_copy"))
            v = _num(worst, "of_copy")
            cells.append(f"{backend} {v:.0%} {_mark(v >= COPY_MIN)} ({worst['shape']})")
        out.append(f"{op} (>= {COPY_MIN:.0%} of copy, worst shape): " + "; ".join(cells))
    return out


def e2e_lines(rows: list[dict], why: str) -> list[str]:
    moe = [r for r in rows if r.get("case", "").startswith("MoE") and _num(r, "ours_over_plain")]
    rows = [r for r in rows if not r.get("case", "").startswith("MoE")]
    got = [r for r in rows if r.get("K") == "1" and "bf16" in r.get("case", "") and _num(r, "ours_over_plain")]
    out = []
    for r in moe:
        v = _num(r, "ours_over_plain")
        out.append(f"measure/plain fwd+bwd, {r['case'].split(' K')[0]} bf16 K=1 (<= {MOE_MAX}x): {v:.2f}x "
                   f"{_mark(v <= MOE_MAX)}")  # fmt: skip
    if not got:
        return [f"measure/plain fwd+bwd at K = 1 (<= {E2E_MAX}x): not measured ({why})", *out]
    cells = []
    for r in got:
        v = _num(r, "ours_over_plain")
        agree = _num(r, "agree_vs_reference")
        cells.append(
            f"{r['case'].split(' K')[0]} {v:.2f}x {_mark(v <= E2E_MAX)}"
            + (f" agree {agree:.0e}" if agree is not None else "")
        )
    params = _num(got[0], "params")
    size = "?" if not params else f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    return [f"measure/plain fwd+bwd, Llama {size} bf16 K=1 (<= {E2E_MAX}x): " + "; ".join(cells), *out]


def tests_line(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "tests: no log"
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    failed = [ln.split(" - ")[0] for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    line = "tests: " + (summary[-1].strip("= ").strip() if summary else "no summary line (cut?)")
    if "KeyboardInterrupt" in text:
        line += " (interrupted at the step's time limit: the rest did not run)"
    if failed:
        line += f"; first failures: {', '.join(f.split('::')[-1][:60] for f in failed[:3])}"
    return line


def steps(workdir: Path) -> list[tuple[str, int, int, int]]:
    out = []
    try:
        for ln in (workdir / "steps.tsv").read_text().splitlines():
            name, rc, sec, budget = ln.split("\t")
            out.append((name, int(rc), int(sec), int(budget)))
    except (OSError, ValueError):
        pass
    return out


def verdict(workdir: Path, simulated: bool = False) -> str:
    st = steps(workdir)
    rc = {name: code for name, code, _, _ in st}

    def why(step: str) -> str:
        if step not in rc:
            return f"step {step} did not run"
        return f"step {step} exit {rc[step]}" + (" (time limit)" if rc[step] in (124, 137) else "")

    machine = "?"
    try:
        lines = (workdir / "machine.txt").read_text().splitlines()
        gpu = next((ln for ln in lines[1:2] if ln.strip()), "")
        sw = next((ln for ln in lines if ln.startswith("torch ")), "")
        machine = " | ".join(x for x in (gpu.strip(), sw.strip()) if x) or "?"
    except OSError:
        pass
    head = f"{HEADER}  {machine}"
    out = [head[:300]]
    if simulated:
        out.append("(--simulate: CPU, toy sizes, interpreter; the numbers check the plumbing, not the targets)")
    if "build" in rc:
        failed = f"build: FAILED (exit {rc['build']}): steps ran on the Python/Triton/cuBLAS routes (PYTHONPATH=.)"
        out.append("build: ok" if rc["build"] == 0 else failed)
    ops = _rows(workdir / "ops_gpu.csv")
    out += linear_lines(ops, why("ops"))
    out += copy_lines(ops, why("ops"))
    out += e2e_lines(_rows(workdir / "e2e_gpu.csv"), why("e2e"))
    out.append(tests_line(workdir / "tests.log"))
    cells = [f"{n} {c}{'!' if c else ''} {s}/{b}s" for n, c, s, b in st]
    total = sum(s for _, _, s, _ in st)
    out.append(f"steps (exit, s/budget), {total}s in all: " + " | ".join(cells))
    misses = sum(" MISS" in ln for ln in out)
    passes = sum(ln.count(" PASS") for ln in out)
    fails = [n for n, c, _, _ in st if c]
    out.append(f"{passes} pass, {misses} lines with a miss; steps not ok: {', '.join(fails) or 'none'}; "
               "full tables in gpu_check.tgz")  # fmt: skip
    text = "\n".join(ln[:400] for ln in out)
    if len(text) > LIMIT:
        text = text[: LIMIT - 16] + "\n[... cut]"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--simulated", action="store_true")
    args = ap.parse_args(argv)
    text = verdict(args.workdir, args.simulated)
    (args.workdir / "verdict.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
