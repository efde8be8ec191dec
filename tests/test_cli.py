"""The console entry point."""

import json
import os
import subprocess
import sys

import geffect_fast as gf
from geffect_fast.cli import main


def test_version_and_help(capsys):
    for argv in (["--version"], ["--help"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0
    out = capsys.readouterr().out
    assert gf.__version__ in out and "demo" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_demo_runs_offline_and_writes_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "geffect_fast.cli", "demo", "--steps", "5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "direction='GA'" in proc.stdout and "fidelity" in proc.stdout
    d = json.loads((tmp_path / "geffects.json").read_text())
    assert d["directions"] == ["GA", "GD"] and set(d["risks"]) == {"unlearn", "retain"}
    # GA identity holds in the demo's own numbers: e_unlearn(GA) = −‖∇R_forget‖² < 0
    assert d["total"]["GA"]["unlearn"] < 0
