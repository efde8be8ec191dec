"""The GPU check (benchmarks/gpu_check.sh) tested before the only run that matters: its dry run fits the 6-minute
budget; ``--simulate`` runs every step on this CPU at toy sizes and ends with the verdict block; a failed build
falls back to the routes that need no extension; a run killed mid-step still leaves a tarball holding what was
done; the verdict's pass/miss decisions and its length limit (benchmarks/gpu_verdict.py)."""

import csv
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """benchmarks/<name>.py loaded from its file: an installed package (opacus ships one) may own the name
    ``benchmarks`` in this process."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_repo_benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


SCRIPT = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")]
STEPS = ["build", "tests", "ops", "e2e", "host", "factored", "suite", "memory"]


def _env(**extra):
    return dict(os.environ, PYTHON=sys.executable, **extra)


def _dry(*args):
    r = subprocess.run([*SCRIPT, "--dry-run", *args], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    steps = [s for s in re.findall(r"^\s+(\w+)\s+(\d+)\s", r.stdout + "\n", re.M) if s[0] != "total"]
    return r.stdout, steps, int(re.search(r"^\s+total\s+(\d+)", r.stdout, re.M).group(1))


def test_dry_run_fits_six_minutes_build_included():
    out, steps, total = _dry()
    assert [n for n, _ in steps] == [*STEPS, "overhead"], out  # in order of value
    assert sum(int(b) for _, b in steps) == total <= 360
    assert "GEFFECT_FAST_CUDA_ARCHS=90a-real" in out  # one architecture: the build fits its minute
    assert "PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1" in out  # no network there
    assert "--no-index" in out
    has_opacus = importlib.util.find_spec("opacus") is not None
    assert ("opacus" in out) == has_opacus  # a peer is run only where it imports
    assert "benchmarks.bench_host --device cuda --model" in out and "--tag" in out  # bench_host's own CLI
    sim, sim_steps, sim_total = _dry("--simulate")
    assert [n for n, _ in sim_steps] == [*STEPS, "overhead"] and sim_total <= 480
    _, some, _ = _dry("--steps", "e2e,build")
    assert [n for n, _ in some] == ["build", "e2e", "overhead"]  # the check's order, whatever the order asked
    r = subprocess.run([*SCRIPT, "--dry-run", "--steps", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown step" in r.stderr


def _tar(path: Path) -> tarfile.TarFile:
    return tarfile.open(path)


def _csv(tf: tarfile.TarFile, name: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(tf.extractfile(f"./{name}").read().decode())))


def test_simulate_runs_every_step_and_ends_with_the_verdict(tmp_path):
    """The whole check on this CPU (toy sizes, the interpreter): every step exits 0, the tarball holds every
    step's files, the numbers agree with float64, and the output ends with the verdict block."""
    out = tmp_path / "out"
    t0 = time.time()
    r = subprocess.run([*SCRIPT, "--simulate"], capture_output=True, text=True, env=_env(OUT=str(out)), cwd=ROOT,
                       timeout=600)  # fmt: skip
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    block = r.stdout[r.stdout.rindex("GPU CHECK VERDICT") :]
    assert block.strip() == r.stdout.strip()[-len(block.strip()) :]  # the output ENDS with it
    assert len(block) <= 3000
    # the simulation builds the CPU module with cmake (CI's venv has pybind11; cmake from the system)
    built = shutil.which("cmake") is not None
    for step in STEPS[1:] if not built else STEPS:
        assert re.search(rf"\b{step} 0 \d+/\d+s", block), (step, block)
    if built:
        assert "build: ok" in block and "steps not ok: none" in block
    else:  # no cmake here: the build fails and every later step runs on the source tree
        assert "build: FAILED" in block and "steps not ok: build;" in block
    for target in ("linear_dot vs cuBLAS", "split vs 2 GEMMs", "embedding_dot", "norm_dot", "measure/plain", "MoE"):
        assert target in block and "not measured" not in block, block
    assert re.search(r"tests: \d+ passed", block), block
    assert (out / "verdict.txt").read_text().strip() == block.strip()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "verdict.txt"]  # what the device tool returns
    with _tar(out / "gpu_check.tgz") as tf:
        names = {Path(n).name for n in tf.getnames()}
        for step in STEPS:
            assert f"{step}.log" in names, step
        expected = {"machine.txt", "steps.tsv", "verdict.txt", "ops_gpu.csv", "e2e_gpu.csv", "summary_ops.md",
                    "summary_e2e.md", "host_cpu_check.md", "factored_quick.md", "suite_cpu_small.md",
                    "memory_model_cpu.md"}  # fmt: skip
        assert expected <= names, expected - names
        ops = _csv(tf, "ops_gpu.csv")
        routes = {row["route"] for row in ops if row.get("route")}
        assert {"triton fused (heuristic)", "triton gemm route (cuBLAS+Triton epilogue)"} <= routes
        assert any(row["dtype"] == "bf16+fp32 dir" and "×2" in row["route"] for row in ops)  # split vs two GEMMs
        checked = [row for row in ops if row.get("rel_err")]
        assert len(checked) >= 10
        for row in checked:
            assert float(row["rel_err"]) < 1e-4, row  # every route agrees with float64 (bf16 split included)
        assert {row["op"] for row in ops if row.get("op")} >= {"embedding_dot", "norm_dot", "row_dot", "segment_outer"}
        e2e = _csv(tf, "e2e_gpu.csv")
        moe = [x for x in e2e if x["case"].startswith("MoE")]  # the MoE row, last (issue 20)
        assert len(moe) == 1 and float(moe[0]["ours_over_plain"]) > 0 and e2e[-1] is moe[0]
        e2e = e2e[:-1]
        assert len(e2e) == 3
        agree = [float(x["agree_vs_reference"]) for x in e2e if x["K"] == "1"]
        assert len(agree) == 2 and max(agree) < 1e-3  # the reference once per case, at K = 1
        assert all(not x.get("agree_vs_reference") for x in e2e if x["K"] != "1")
    print(f"simulate: {wall:.0f} s wall")
    assert wall < 300  # under 5 minutes (issue 21), on a shared 2-core machine


def test_failed_build_falls_back_and_a_killed_run_keeps_its_results(tmp_path):
    """With the build failing, the later steps run from the source tree; killed during a step, the run leaves a
    readable tarball with the finished steps and the running step's files so far (refreshed every second)."""
    out = tmp_path / "out"
    env = _env(OUT=str(out), GPU_CHECK_FAIL_BUILD="1", REFRESH_S="1", TMPDIR=str(tmp_path))  # its workdir too
    proc = subprocess.Popen([*SCRIPT, "--simulate", "--steps", "build,ops,e2e"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    tgz = out / "gpu_check.tgz"
    seen = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                with _tar(tgz) as tf:
                    names = {Path(n).name for n in tf.getnames()}
                    if "e2e.log" in names:  # ops finished, e2e running: kill the whole run now
                        seen = names
                        break
            except (OSError, tarfile.TarError, EOFError):
                continue
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    assert seen is not None, output[-3000:]
    assert "GPU CHECK VERDICT" not in output  # killed before the end
    with _tar(tgz) as tf:  # the last complete tarball: never half-written
        steps = [line.split("\t") for line in tf.extractfile("./steps.tsv").read().decode().splitlines()]
        assert steps[0][0] == "build" and steps[0][1] != "0"
        assert steps[1][:2] == ["ops", "0"], steps  # ops ran on the source tree after the failed build
        assert b"failed on purpose" in tf.extractfile("./build.log").read()
        assert len(_csv(tf, "ops_gpu.csv")) >= 10
        assert "./e2e.log" in tf.getnames()


def test_verdict_decides_pass_and_miss_and_stays_short(tmp_path):
    gv = _bench_module("gpu_verdict")

    w = tmp_path
    (w / "machine.txt").write_text("mode gpu\nNVIDIA H200, 580.1, 143771 MiB\ntorch 2.11.0 cuda 13.0 triton 3.6.0\n")
    (w / "steps.tsv").write_text("build\t0\t41\t60\ntests\t1\t60\t65\nops\t124\t80\t80\n")

    def write(name, rows):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(w / name, "w", newline="") as f:
            wr = csv.DictWriter(f, keys)
            wr.writeheader()
            wr.writerows(rows)

    lin = [dict(shape="7B q_proj N8192", dtype="bf16", route="cuBLAS gᵀa (baseline)", vs_gemm=1.0)]
    lin += [dict(shape="7B q_proj N8192", dtype="bf16", route="cuda (cuBLAS+epilogue)", vs_gemm=0.8),
            dict(shape="7B q_proj N8192", dtype="bf16", route="triton fused (heuristic)", vs_gemm=0.74, config="wide tma"),
            dict(shape="7B q_proj N8192", dtype="bf16+fp32 dir", route="cuda (cuBLAS+epilogue)", vs_gemm=0.9),
            dict(shape="7B q_proj N512", dtype="bf16", route="cuda (cuBLAS+epilogue)", vs_gemm=0.5),
            dict(shape="7B q_proj N512", dtype="bf16", route="triton fused (heuristic)", error="RuntimeError: x"),
            dict(op="embedding_dot", shape="embed", backend="cuda", of_copy=0.61),
            dict(op="embedding_dot", shape="embed K3", backend="cuda", of_copy=0.59)]  # fmt: skip
    write("ops_gpu.csv", lin)
    write("e2e_gpu.csv", [dict(case="B8 T512 K1 dir bf16", K=1, params=9.5e8, ours_over_plain=1.08,
                               agree_vs_reference=2e-6),
                          dict(case="B32 T128 K1 dir bf16", K=1, params=9.5e8, ours_over_plain=1.2),
                          dict(case="B8 T512 K3 dir bf16", K=3, params=9.5e8, ours_over_plain=2.5)])  # fmt: skip
    (w / "tests.log").write_text("FAILED tests/ops/test_x.py::test_y - boom\n1 failed, 99 passed in 50.0s\n")
    text = gv.verdict(w)
    lines = text.splitlines()
    assert lines[0].startswith("GPU CHECK VERDICT") and "NVIDIA H200" in lines[0]
    assert "cuda 0.80x PASS" in text and "triton fused [wide tma] 0.74x MISS" in text  # 0.75 is the line
    assert "split vs 2 GEMMs" in text and "cuda 0.90x PASS" in text
    assert "cuda 0.50x MISS (7B q_proj N512 bf16)" in text  # the worst shape, named
    assert "embedding_dot" in text and "cuda 59% MISS (embed K3)" in text
    assert "norm_dot" in text and "not measured (step ops exit 124 (time limit))" in text
    assert "B8 T512 1.08x PASS agree 2e-06" in text and "B32 T128 1.20x MISS" in text and "T512 K3" not in text
    assert "1 failed, 99 passed" in text and "test_y" in text and "interrupted" not in text
    assert "tests 1! 60/65s" in text and "ops 124! 80/80s" in text and "steps not ok: tests, ops" in text
    (w / "tests.log").write_text("...\n!!! KeyboardInterrupt !!!\n48 passed in 56.92s\n")
    assert "tests: 48 passed in 56.92s (interrupted at the step's time limit" in gv.verdict(w)
    # nothing measured at all: every target says why, nothing raises
    empty = tmp_path / "empty"
    empty.mkdir()
    text = gv.verdict(empty)
    assert text.count("not measured") == 4 and "step ops did not run" in text and "step e2e did not run" in text
    # many shapes and long names: still at most 3000 characters
    write("ops_gpu.csv", [dict(r, shape=r.get("shape", "") + " " + "x" * 300) for r in lin] * 50)
    assert len(gv.verdict(w)) <= 3000


@pytest.mark.parametrize("bad", ["--steps", "--nope"])
def test_bad_arguments(bad):
    r = subprocess.run([*SCRIPT, bad], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
