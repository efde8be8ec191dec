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
from geffect_fast.app.cli import main

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


def _subparser(sub):
    from geffect_fast.app.cli import _parser

    return next(a for a in _parser()._actions if a.dest == "command").choices[sub]


def _options(sub):
    """The option actions of a subcommand (not --help), from the parser itself."""
    return [a for a in _subparser(sub)._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("sub", ["run", "demo", "reproduce", "report"])
def test_help_explains_every_option_with_its_default(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for a in _options(sub):
        assert a.help and a.help.strip(), f"{sub} {a.option_strings[0]} has no help text"
        if a.default not in (None, False):
            assert f"(default: {a.default})" in text, f"{sub} {a.option_strings[0]}: default {a.default!r} not shown"
    if sub == "run":  # the ones issue 16 found bare
        for flag in ("--steps", "--lr", "--out", "--device", "--max-length", "--batch-size"):
            assert flag in text
        assert "(default: 10)" in text and "(default: 1e-05)" in text and "(default: cpu)" in text


def test_demo_help_states_the_configs_real_defaults(capsys):
    from geffect_fast.app.demo import QUICK, DemoConfig

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {DemoConfig().steps}; --quick {QUICK.steps})" in text
    assert f"(default: {','.join(DemoConfig().objectives)}; --quick {','.join(QUICK.objectives)})" in text


@pytest.mark.parametrize("sub", ["run", "demo", "reproduce"])
def test_readme_synopsis_marks_optional_flags(sub):
    """Every option is in the README's command-line synopsis, in [brackets] exactly when it is optional."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    synopsis = readme.split("### Command line", 1)[1].split("```", 2)[1]
    part = synopsis.split(f"geffect-fast {sub}", 1)[1].split("geffect-fast ", 1)[0]
    for a in _options(sub):
        flag = a.option_strings[0]  # the name (--objectives), not an alias (--objective)
        m = re.search(rf"(\[?){re.escape(flag)}(?![\w-])", part)
        assert m, f"the README synopsis of {sub} lacks {flag}"
        assert (m.group(1) == "[") is (not a.required), f"README: {sub} {flag} (required: {a.required})"


def test_help_imports_no_torch_and_is_fast():
    """``geffect-fast --help`` (and each command's) answers without importing torch, transformers or matplotlib:
    it took over 2 s when the package imported torch on the way to the parser."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from geffect_fast.app.cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['run', '--help'], ['reproduce', '--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules)\n"
        "print('RESULT', heavy, time.perf_counter() - t, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("RESULT"))
    assert line.split("]")[0] == "RESULT [", line  # nothing heavy imported
    assert float(line.split()[-1]) < 2.0, line  # 0.1-0.2 s here; the bound only catches torch coming back
    import geffect_fast

    assert callable(geffect_fast.measure) and "Tracker" in dir(geffect_fast)  # the public names still resolve


def test_help_counts_come_from_the_registry(capsys):
    """The help's objective lists and counts come from the registry (through a torch-free mirror kept equal to it),
    so `reproduce --help` and its unknown-objective error name the same ten."""
    from geffect_fast import objectives
    from geffect_fast.app import catalog, reproduce

    assert list(catalog.LIBRARY) == objectives.names()
    assert tuple(reproduce.OBJECTIVES) == catalog.PROTOCOL and len(catalog.PROTOCOL) == 10
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with the ten objectives" in text and ", ".join(catalog.PROTOCOL) in text
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"nine objectives: {', '.join(objectives.names())}" in text
    assert main(["reproduce", "--objectives", "ga,frob", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in catalog.PROTOCOL) and "frob" in err
    # names resolve case-insensitively, with the retain suffix, wherever an objective is taken
    assert catalog.parse_names("ga, NPO+kl,", catalog.PROTOCOL) == ["GA", "NPO+KL"]
    assert catalog.display("npo+kl") == "NPO+KL" and catalog.display("idkpo") == "IdkPO"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "-1e-5"], "--lr must be a finite number > 0, got -1e-05"),
        (["--lr", "-0.001"], "--lr must be a finite number > 0, got -0.001"),
        (["--lr=-1e-5"], "--lr must be a finite number > 0, got -1e-05"),
        (["--steps", "-3"], "--steps must be >= 1"),
        (["--every", "-1"], "--every must be >= 1"),
        (["--lr", "-inf"], "--lr must be a finite number > 0, got -inf"),
    ],
)
def test_negative_numbers_after_a_space_get_the_options_own_error(hf_model_dir, tmp_path, capsys, argv, message):
    """argparse took `-1e-5` after a space for an option and printed its usage dump; the value now reaches the
    option's own check, as `--lr=-1e-5` did."""
    args = _run_args(hf_model_dir, tmp_path / "out")
    flag = argv[0].split("=")[0]
    if flag in args:
        i = args.index(flag)
        del args[i : i + 2]
    assert main(args + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("geffect-fast run: error:") and message in err, err
    assert main(["demo", "--steps", "-2", "--out", str(tmp_path / "d")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


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
    harmful = [h["retain_g_effect"] for h in meta["most_harmful"]]
    assert len(harmful) <= 5 and harmful == sorted(harmful) and all(v < 0 for v in harmful)
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


def test_demo_results_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    """The demo sizes torch's threads to the free cores, so its results must not depend on how many it got: the
    quick demo, fine-tuned from scratch at 1 and at 2 threads, writes the same summary.csv and records, bit for bit."""
    outs = {}
    for n in (1, 2):
        monkeypatch.setenv("GEFFECT_FAST_CACHE", str(tmp_path / f"cache{n}"))  # each fine-tunes its own model
        monkeypatch.setenv("GEFFECT_FAST_THREADS", str(n))
        outs[n] = tmp_path / f"demo{n}"
        assert main(["demo", "--quick", "--out", str(outs[n])]) == 0
        assert f"{n} torch thread" in json.loads((outs[n] / "meta.json").read_text())["machine"]
    for name in ("summary.csv", "geffects.jsonl"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


def test_console_script_demo_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GEFFECT_FAST_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "geffect_fast.app.cli", "demo", "--quick", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer accuracy" in proc.stdout and "trade-off" in proc.stdout


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
        "--objectives",
        "ga,npo",
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--out",
        str(out),
        *extra,
    ]


def test_run_end_to_end(hf_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(hf_model_dir, out, "--per-instance", "--direction", "update", "--groups", "paper")) == 0
    recs = _check_run_folder(out)
    assert {r["objective"] for r in recs} == {"GA", "NPO"}
    assert set(recs[0]["groups"]) <= {"embed", "shallow", "middle", "deep", "lm"}
    assert all(r["kind"] == "update" and r["measured_dR"] is not None for r in recs)
    assert all(r["prediction"] == "optimiser step" for r in recs)
    assert all(r["direction_norm"] > 0 for r in recs)  # ‖v‖ of each step: the common scale
    assert "cumulative_per_unit" in (out / "summary.csv").read_text().splitlines()[0]
    assert "geffects_per_unit.png" in {p.name for p in out.iterdir()}
    md = (out / "report.md").read_text()
    assert "%" in md.split("## Cumulative G-effects")[1]  # fidelity is reported for the update direction
    # one progress line per step and objective, with the probes' NLL after it and its G-effects
    lines = capsys.readouterr().out.splitlines()
    for obj in ("GA", "NPO"):
        steps = [x for x in lines if x.strip().startswith(f"{obj} step ")]
        assert [x.split()[2] for x in steps] == ["1/2", "2/2"], lines
        assert all("forget NLL" in x and "retain NLL" in x and "G-effect unlearning" in x for x in steps), steps


def test_run_gradient_direction_labels_the_prediction_plain_sgd(hf_model_dir, tmp_path, capsys):
    """With --direction gradient (AdamW steps), predicted_dR is a plain-SGD step's: said in the records, the
    meta data and the report; the default groups of a 2-block model are one per block. (`--objective`, the old
    spelling, still works; a name with a retain suffix is an objective too.)"""
    out = tmp_path / "run"
    args = _run_args(hf_model_dir, out, "--every", "2")
    args[args.index("--objectives")] = "--objective"
    args[args.index("ga,npo")] = "ga,npo+kl"
    assert main(args) == 0
    recs = [json.loads(x) for x in (out / "geffects.jsonl").read_text().splitlines()]
    assert {r["objective"] for r in recs} == {"GA", "NPO+KL"}
    recs = [r for r in recs if r["objective"] == "GA"]
    assert recs and all(r["kind"] == "gradient" and r["prediction"] == "plain SGD step" for r in recs)
    assert {r["step"] for r in recs} == {1}  # --every 2 over 2 steps
    meta = json.loads((out / "meta.json").read_text())
    assert "plain-SGD" in meta["direction"] and meta["groups"] == "block (auto: 2 blocks)"
    assert set(recs[0]["groups"]) == {"embed", "block.0", "block.1", "final_norm", "lm_head"}
    assert "plain SGD step" in (out / "report.md").read_text()
    out_lines = capsys.readouterr().out.splitlines()
    ga = [x.strip() for x in out_lines if x.strip().startswith("GA step ")]
    assert len(ga) == 2 and "G-effect" in ga[0] and "G-effect" not in ga[1]  # step 2 is not measured


def test_run_smooth_and_probe_batch(hf_model_dir, tmp_path):
    """--smooth adds the official smoothed G-effects to every record, --probe-batch measures the probes in
    chunks, pooled exactly: the unsmoothed records equal a whole-probe run's, and --groups thirds names the
    paper's depths."""
    whole, lean = tmp_path / "whole", tmp_path / "lean"
    assert main(_run_args(hf_model_dir, whole, "--groups", "thirds", "--probe-batch", "64")) == 0
    assert main(_run_args(hf_model_dir, lean, "--groups", "thirds", "--smooth", "--probe-batch", "1")) == 0
    a = [json.loads(x) for x in (whole / "geffects.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (lean / "geffects.jsonl").read_text().splitlines()]
    assert len(a) == len(b) > 0
    assert json.loads((lean / "meta.json").read_text())["smoothed"] is True
    assert json.loads((whole / "meta.json").read_text())["smoothed"] is False
    for r, s in zip(a, b):
        assert (r["objective"], r["risk"], r["step"]) == (s["objective"], s["risk"], s["step"])
        assert s["total"] == pytest.approx(r["total"], rel=1e-5, abs=1e-9)
        assert "smoothed_total" not in r and set(s["smoothed_groups"]) == set(s["groups"])
        assert s["smoothed_total"] == pytest.approx(sum(s["smoothed_groups"].values()), rel=1e-9, abs=1e-12)
    assert set(b[0]["groups"]) <= {"embed", "shallow", "middle", "deep", "lm"}
    firsts = [s for s in b if s["step"] == 1]  # at the first step ḡ = g: smoothed = unsmoothed
    assert all(s["smoothed_total"] == pytest.approx(s["total"], rel=1e-5, abs=1e-9) for s in firsts)


@pytest.mark.parametrize("direction", ["gradient", "update"])
def test_direction_norm_is_the_size_of_the_measured_direction(direction):
    """‖v‖ in every record is the norm of the direction the tracker measured: for GA's gradient on its own forget
    batch v = −∇R so e = −‖v‖² exactly; for AdamW's update, ‖(θ_before − θ_after)/lr‖ of the step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from geffect_fast.app import pipeline

    tok = data.build_tokenizer(vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()
    recs = data.synthetic_authors(n_authors=10, qa_per_author=1)["full"]
    forget = data.encode_qa(recs[:4], tok)
    retain = data.encode_qa(recs[4:], tok)
    lr = 1e-3
    snaps = [{n: p.detach().clone() for n, p in model.named_parameters()}]

    def snap(step, steps):
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})

    tr = pipeline.unlearn(model, "ga", forget, retain, 3, lr, batch_size=4, direction=direction, progress=snap)
    got = [r for r in tr.records if r["risk"] == "unlearn"]
    assert len(got) == 3
    for r in got:
        if direction == "gradient":
            assert r["total"] == pytest.approx(-(r["direction_norm"] ** 2), rel=1e-8)
        else:
            a, b = snaps[r["step"] - 1], snaps[r["step"]]
            want = torch.sqrt(sum(((a[n] - b[n]) / lr).square().sum() for n in a)).item()
            assert r["direction_norm"] == pytest.approx(want, rel=1e-6)


def test_auto_groups_are_the_papers_depth_groups_for_deep_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from geffect_fast.app.cli import AUTO_PAPER_BLOCKS, _resolve_groups

    def model(layers):
        cfg = LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=layers, num_attention_heads=2
        )
        return LlamaForCausalLM(cfg)

    assert _resolve_groups("auto", model(AUTO_PAPER_BLOCKS)) == ("paper", f"paper (auto: {AUTO_PAPER_BLOCKS} blocks)")
    assert _resolve_groups("auto", model(AUTO_PAPER_BLOCKS - 1))[0] == "block"
    assert _resolve_groups("module", model(2)) == ("module", "module")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a, d: a.__setitem__(a.index("--forget") + 1, str(d / "missing.json")), "no such data file"),
        (lambda a, d: a.__setitem__(a.index("--objectives") + 1, "ga,frobnicate"), "unknown objective 'frobnicate'"),
        (lambda a, d: a.__setitem__(a.index("--model") + 1, str(d)), "is not a Hugging Face model folder"),
        (lambda a, d: a.extend(["--groups", "layers"]), "unknown groups 'layers'"),
        (lambda a, d: a.extend(["--device", "cuda"]), "no CUDA device"),
        (lambda a, d: a.extend(["--max-length", "4"]), "the prompt fills max_length=4"),
        (lambda a, d: a.__setitem__(a.index("--retain") + 1, str(d / "bad_keys.json")), "has no ['answer']"),
        (lambda a, d: a.__setitem__(a.index("--steps") + 1, "0"), "--steps must be >= 1"),
        # issue 13: each of these was a traceback with exit code 1, or a late or misleading error
        (lambda a, d: a.__setitem__(a.index("--out") + 1, str(d / "forget.json" / "sub")), "is a file, not a folder"),
        (lambda a, d: a.extend(["--device", "tpu9"]), "--device tpu9 is not a device torch knows"),
        (lambda a, d: a.__setitem__(a.index("--lr") + 1, "inf"), "--lr must be a finite number > 0, got inf"),
        (lambda a, d: a.__setitem__(a.index("--lr") + 1, "nan"), "--lr must be a finite number > 0, got nan"),
        (lambda a, d: a.extend(["--prompt", "vicuna"]), "unknown --prompt 'vicuna'"),
        (lambda a, d: a.extend(["--guide", "stop,often"]), "--guide: unknown guide policies ['often']"),
        (lambda a, d: a.extend(["--guide", "stop", "--guide-every", "0"]), "--guide-every must be >= 1"),
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


def test_run_guide_end_to_end(hf_model_dir, tmp_path, capsys):
    """--guide stop,layers,samples: every objective's decisions in guide.jsonl (one per step it reached, sample
    weights per forget row of the step, the groups scaled), only the steps the guide let through tracked, and the
    report's table of decisions; `report` re-renders it."""
    out = tmp_path / "run"
    args = _run_args(
        hf_model_dir, out, "--guide", "samples,layers,stop", "--guide-every", "2", "--steps", "3", "--batch-size", "4"
    )
    args[args.index("ga,npo")] = "ga,npo+kl"
    assert main(args) == 0
    decs = [json.loads(x) for x in (out / "guide.jsonl").read_text().splitlines()]
    recs = [json.loads(x) for x in (out / "geffects.jsonl").read_text().splitlines()]
    assert {d["objective"] for d in decs} == {"GA", "NPO+KL"}
    for obj in ("GA", "NPO+KL"):
        mine = [d for d in decs if d["objective"] == obj]
        assert [d["step"] for d in mine] == list(range(1, len(mine) + 1))
        assert all(len(d["sample_weights"]) in (4, 2) and isinstance(d["scaled_groups"], dict) for d in mine)
        assert all(d["stop"] == (not d["taken"]) for d in mine) and (len(mine) == 3 or mine[-1]["stop"])
        assert [d["probe_age"] for d in mine if not d["stop"] or d["reason"] != "stopped earlier"] == [0, 1, 0][
            : len(mine)
        ]
        tracked = sorted({r["step"] for r in recs if r["objective"] == obj})
        assert tracked == [d["step"] for d in mine if d["taken"]]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["guide"] == "stop,layers,samples" and meta["guide_every"] == 2
    md = (out / "report.md").read_text()
    table = md.split("## Guide decisions")[1].split("\n\n")[2].splitlines()
    assert len(table) == 2 + len(decs) and table[2].startswith("| GA | 1 |")
    assert "Guide decisions" in (out / "report.html").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == md


def test_run_refuses_existing_output(hf_model_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_run_args(hf_model_dir, out)) == 2
    assert "exists and is not an output of geffect-fast" in capsys.readouterr().err  # --force would not help
    assert main(_run_args(hf_model_dir, out, "--force")) == 2
    assert "exists and is not an output of geffect-fast" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "geffects.jsonl").write_text('{"objective": "GA"}\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "lacks" in capsys.readouterr().err


def test_run_checks_the_prompt_before_loading_the_model(hf_model_dir, tmp_path, capsys, monkeypatch):
    from geffect_fast.app import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", no_load)
    assert main(_run_args(hf_model_dir, tmp_path / "out", "--prompt", "vicuna")) == 2
    assert "unknown --prompt" in capsys.readouterr().err


def test_run_out_is_the_current_folder(hf_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--force",)):
        assert main(_run_args(hf_model_dir, ".", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--out . is the current folder" in err, err
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing created, nothing removed


def test_run_out_unwritable(hf_model_dir, tmp_path, capsys, monkeypatch):
    """An output folder that cannot be created (here: mkdir refused, as for a read-only place) is one line."""
    import pathlib

    target = tmp_path / "locked"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(target)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(_run_args(hf_model_dir, target / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot create the output folder" in err and "Permission denied" in err, err


def test_sigterm_leaves_no_partial_output(hf_model_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = _run_args(hf_model_dir, out)
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "geffect_fast.app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(".run.partial") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the run (loading or unlearning)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.decode().strip().splitlines()[-1].startswith("geffect-fast run: terminated (SIGTERM)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "line,message",
    [
        ("5", "a record must be a JSON object, got int"),
        ('{"objective": "GA", "step": 1, "risk": "unlearn", "total": 1.0, "groups": "embed"}', "groups must map"),
        ('{"objective": "GA", "step": 1, "risk": "unlearn", "total": null, "groups": {}}', "total must be a finite"),
        ('{"objective": "GA", "step": 1, "risk": "unlearn", "total": NaN, "groups": {"embed": NaN}}', "total must"),
        ('{"objective": "GA", "step": "1", "risk": "unlearn", "total": 1.0, "groups": {}}', "step must be an integer"),
    ],
)
def test_report_on_corrupt_records_is_one_line_and_touches_nothing(tmp_path, capsys, line, message):
    good = {"objective": "GA", "step": 0, "risk": "unlearn", "total": -1.0, "groups": {"embed": -1.0}}
    (tmp_path / "geffects.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    (tmp_path / "summary.csv").write_text("an earlier summary")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("geffect-fast report: error:") and message in err, err
    assert ":2:" in err  # names the line
    assert (tmp_path / "summary.csv").read_text() == "an earlier summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geffects.jsonl", "summary.csv"]


def test_json_lines_file_named_json_is_read(tmp_path):
    recs = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(3)]
    p = tmp_path / "forget10.json"  # TOFU's own files are JSON lines named .json
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert data.load_records(p) == recs
    p.write_text('[{"question": "q?", "answer": "a"}] trailing')  # still bad JSON: still refused
    with pytest.raises(ValueError, match="not valid JSON/JSONL"):
        data.load_records(p)


def test_demo_threads_follow_the_free_cores(monkeypatch):
    """A busy machine gets fewer torch threads (oversubscribed OpenMP barriers made the fine-tune 12x slower),
    re-sized as other jobs come and go (our own threads taken out of the load average), restored afterwards,
    also on error; GEFFECT_FAST_THREADS fixes the count."""
    from geffect_fast.app import common as demo

    assert demo.free_cores(2, 0.0) == 2 and demo.free_cores(2, 0.4) == 2
    assert demo.free_cores(2, 0.6) == 1 and demo.free_cores(2, 4.0) == 1 and demo.free_cores(16, 5.2) == 11
    before = torch.get_num_threads()
    monkeypatch.delenv("GEFFECT_FAST_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    real = demo.free_cores
    monkeypatch.setattr(demo, "free_cores", lambda cores=None, load=None: real(2, load))  # a 2-core machine
    # idle; another job starts (load = our 2 + its 1.2); it goes on (our 1 + 1.4); it ends (our 1 + 0.2)
    loads = iter([0.1, 3.2, 2.4, 1.2])
    monkeypatch.setattr(demo, "_load", lambda: next(loads))
    said = []
    torch.set_num_threads(2)
    try:
        with demo.threads_for_load(said.append) as budget:
            assert budget.n == 2 and torch.get_num_threads() == 2 and not said
            assert budget.adjust() == 1 and torch.get_num_threads() == 1 and "other jobs" in said[-1]
            assert budget.adjust() == 1 and len(said) == 1
            assert budget.adjust() == 2 and torch.get_num_threads() == 2 and "free again" in said[-1]
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("GEFFECT_FAST_THREADS", "3")
        with pytest.raises(RuntimeError), demo.threads_for_load(said.append) as budget:
            assert budget.n == 3 and torch.get_num_threads() == 3
            raise RuntimeError("restored on error too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
