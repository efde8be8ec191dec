"""The console entry point: demo, run and report end to end on tiny settings, and every bad input."""

import json
import os
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch

import geffect_fast as gf
from geffect_fast import data
from geffect_fast.cli import main

PNGS = {"geffects_cumulative.png", "geffects_per_step.png", "nll.png", "per_instance.png"}
RECORD_KEYS = {"objective", "step", "risk", "total", "groups", "cumulative", "loss", "measured_dR", "kind"}


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []
        self.ok = True

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def _check_run_folder(out, per_instance=True):
    names = {p.name for p in out.iterdir()}
    assert {"geffects.jsonl", "summary.csv", "report.md", "report.html", "meta.json"} <= names
    want_png = PNGS if per_instance else PNGS - {"per_instance.png"}
    assert want_png <= names
    for png in want_png:
        b = (out / png).read_bytes()
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 5000
    recs = [json.loads(x) for x in (out / "geffects.jsonl").read_text().splitlines()]
    assert recs and all(RECORD_KEYS <= set(r) for r in recs)
    assert {r["risk"] for r in recs} == {"unlearn", "retain"}
    p = _Imgs()
    p.feed((out / "report.html").read_text())
    n_png = len([x for x in names if x.endswith(".png")])
    assert len(p.srcs) == n_png and all(s.startswith("data:image/png;base64,") for s in p.srcs)
    md = (out / "report.md").read_text()
    assert "## Findings" in md and all(f"]({png})" in md for png in want_png)
    return recs


def test_version_and_help(capsys):
    for argv in (["--version"], ["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert gf.__version__ in out and "demo" in out and "--objective" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_demo_end_to_end_then_cached_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEFFECT_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    recs = _check_run_folder(out)
    assert {r["objective"] for r in recs} == {"GA", "NPO", "RMU"}
    assert (out / "npo_weights.png").is_file()  # NPO's weights against per-instance G-effects
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["most_harmful"]) == 5 and all(
        h["retain_g_effect"] <= meta["most_harmful"][-1]["retain_g_effect"] for h in meta["most_harmful"]
    )
    assert "most harmful to retention" in (out / "report.md").read_text()
    assert all(r["kind"] == "gradient" for r in recs)
    ga = [r for r in recs if r["objective"] == "GA" and r["risk"] == "unlearn"]
    assert all(r["total"] < 0 for r in ga)  # GA's unlearning G-effect is −‖∇R_forget‖²-like: negative
    # the second run finds the fine-tuned model in the cache, and refuses to overwrite without --force
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), "--force", "--objectives", "wga"]) == 0
    assert "loaded the fine-tuned model from the cache" in capsys.readouterr().out
    assert {json.loads(x)["objective"] for x in (out / "geffects.jsonl").read_text().splitlines()} == {"WGA"}
    # report re-renders from the JSONL alone
    for name in ("report.html", "summary.csv", "nll.png"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    _check_run_folder(out)


def test_console_script_demo_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GEFFECT_FAST_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "geffect_fast.cli", "demo", "--quick", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer accuracy" in proc.stdout and "Best trade-off" in proc.stdout


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny local HF model folder with its tokenizer, and TOFU-format forget/retain files."""
    d = tmp_path_factory.mktemp("hf")
    tok = data.build_tokenizer(vocab_size=400)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    s = data.synthetic_authors(n_authors=10, qa_per_author=4)
    (d / "forget.json").write_text(json.dumps(s["forget10"]))
    (d / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in s["retain90"][:12]))
    return d


def _run_args(d, out, *extra):
    return [
        "run",
        "--model",
        str(d / "model"),
        "--forget",
        str(d / "forget.json"),
        "--retain",
        str(d / "retain.jsonl"),
        "--objective",
        "ga,npo",
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--out",
        str(out),
        *extra,
    ]


def test_run_end_to_end(hf_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_run_args(hf_model_dir, out, "--per-instance", "--direction", "update", "--groups", "paper")) == 0
    recs = _check_run_folder(out)
    assert {r["objective"] for r in recs} == {"GA", "NPO"}
    assert set(recs[0]["groups"]) <= {"embed", "shallow", "middle", "deep", "lm"}
    assert all(r["kind"] == "update" and r["measured_dR"] is not None for r in recs)
    md = (out / "report.md").read_text()
    assert "%" in md.split("## Cumulative G-effects")[1]  # fidelity is reported for the update direction


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a, d: a.__setitem__(a.index("--forget") + 1, str(d / "missing.json")), "no such data file"),
        (lambda a, d: a.__setitem__(a.index("--objective") + 1, "ga,frobnicate"), "unknown objective 'frobnicate'"),
        (lambda a, d: a.__setitem__(a.index("--model") + 1, str(d)), "is not a Hugging Face model folder"),
        (lambda a, d: a.extend(["--groups", "layers"]), "unknown groups 'layers'"),
        (lambda a, d: a.extend(["--device", "cuda"]), "no CUDA device"),
        (lambda a, d: a.extend(["--max-length", "4"]), "the prompt fills max_length=4"),
        (lambda a, d: a.__setitem__(a.index("--retain") + 1, str(d / "bad_keys.json")), "has no ['answer']"),
        (lambda a, d: a.__setitem__(a.index("--steps") + 1, "0"), "--steps must be >= 1"),
    ],
)
def test_run_bad_input(hf_model_dir, tmp_path, capsys, mutate, message):
    if message == "no CUDA device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (hf_model_dir / "bad_keys.json").write_text(json.dumps([{"question": "q?", "reply": "a"}]))
    out = tmp_path / "out"
    args = _run_args(hf_model_dir, out)
    mutate(args, hf_model_dir)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("geffect-fast run: error:") and message in err, err
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_run_refuses_existing_output(hf_model_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_run_args(hf_model_dir, out)) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "geffects.jsonl").write_text('{"objective": "GA"}\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "lacks" in capsys.readouterr().err
