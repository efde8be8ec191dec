"""benchmarks/guided.py in its quick mode (the demo's quick model, 2 steps): every objective × variant runs and is
written, the table renders again from the records alone, and --only merges variants into an earlier run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.guided", "--quick", "--steps", "2", "--out", str(tmp_path / "out"), *args],
        cwd=tmp_path / "b",
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GEFFECT_FAST_CACHE": str(tmp_path / "cache")},  # the quick model fine-tuned once
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_guided_benchmark_quick(tmp_path):
    # a copy of benchmarks/ run from elsewhere: the installed geffect_fast is imported, not the source tree
    shutil.copytree(ROOT / "benchmarks", tmp_path / "b" / "benchmarks", ignore=shutil.ignore_patterns("results"))
    _run(tmp_path)
    out = tmp_path / "out"
    sys.path.insert(0, str(tmp_path / "b"))
    try:
        from benchmarks.guided import OBJECTIVES, VARIANTS
    finally:
        sys.path.pop(0)
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["objective"], r["variant"]) for r in runs] == [(o, v) for o in OBJECTIVES for v in VARIANTS]
    for r in runs:
        limit = 2 * (VARIANTS[r["variant"]] or {}).get("steps", 1)  # a variant may run a multiple of --steps
        assert 1 <= r["steps"] <= limit and len(r["trajectory"]) == r["steps"] + 1
    meta = json.loads((out / "meta.json").read_text())
    assert " --quick" in meta["command"] and meta["steps"] == 2 and meta["lr"] == 3e-4
    table = (out / "guided.md").read_text()
    assert all(o.upper() in table for o in OBJECTIVES) and (out / "trajectories.png").stat().st_size > 0
    _run(tmp_path, "--render")
    assert (out / "guided.md").read_text() == table
    _run(tmp_path, "--only", "unguided")
    again = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["objective"], r["variant"]) for r in again] == [(r["objective"], r["variant"]) for r in runs]
    assert "--only unguided" in json.loads((out / "meta.json").read_text())["command"]
