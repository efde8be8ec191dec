"""No data loss (issue 23): ``--out DIR --force`` replaces DIR only when it is empty or an earlier output of the
tool (its marker, and nothing the tool did not write), never a folder that is or holds what the run reads, never
through a symbolic link; a refusal is one line on stderr, exit code 2, and touches nothing. Each case runs the
cheapest command path that reaches the check: ``run`` refuses before it loads data or a model."""

import json
import os

import pytest

from geffect_fast.app import cli
from geffect_fast.app.cli import main
from geffect_fast.app.common import MARKER, CLIError, atomic_output, read_marker


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A data folder (forget, retain and an unrelated notes.txt), a model folder, and a scratch cache; the model
    is never loaded (a test that gets past the output check hits ``load_model`` and fails there on purpose)."""
    monkeypatch.setenv("GEFFECT_FAST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "data"
    d.mkdir()
    rec = [{"question": "Who?", "answer": "Nobody."}]
    (d / "forget.json").write_text(json.dumps(rec))
    (d / "retain.json").write_text(json.dumps(rec))
    (d / "notes.txt").write_text("my notes")
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")

    def no_load(*a, **k):
        raise CLIError("REACHED MODEL LOADING")

    monkeypatch.setattr(cli, "load_model", no_load)
    return tmp_path


def _argv(root, out, *extra):
    return [
        "run",
        "--model",
        str(root / "model"),
        "--forget",
        str(root / "data" / "forget.json"),
        "--retain",
        str(root / "data" / "retain.json"),
        "--objectives",
        "ga",
        "--out",
        str(out),
        *extra,
    ]


def _tree(folder):
    """Every path under ``folder`` (links not followed) with its content: what "touched" would change."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            out[rel] = (
                ("link", os.readlink(p))
                if os.path.islink(p)
                else ("dir",)
                if os.path.isdir(p)
                else ("file", open(p, "rb").read())
            )
    return out


def _refused(argv, capsys, *words):
    """``main(argv)`` refuses: exit code 2 and one line on stderr, holding each of ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geffect-fast run: error: "), err
    assert "REACHED MODEL LOADING" not in err, err
    for w in words:
        assert w in err, err
    return err


def _previous_output(folder, command="earlier"):
    with atomic_output(folder, force=True, command=command) as tmp:
        (tmp / "report.md").write_text("# an earlier report")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "nll.png").write_bytes(b"png")


def test_the_folder_holding_the_data_is_refused_and_untouched(inputs, capsys):
    before = _tree(inputs)
    _refused(_argv(inputs, inputs / "data", "--force"), capsys, "holds the --forget file's folder")
    # also when that folder looks like an earlier output (a valid marker listing every file in it)
    (inputs / "data" / MARKER).write_text(
        json.dumps({"tool": "geffect-fast", "files": ["forget.json", "notes.txt", "retain.json"]})
    )
    before = _tree(inputs)
    _refused(_argv(inputs, inputs / "data", "--force"), capsys, "holds the --forget file's folder")
    _refused(_argv(inputs, inputs, "--force"), capsys, "--forget file's folder")  # a folder above it too
    assert _tree(inputs) == before


def test_the_model_folder_is_refused(inputs, capsys):
    before = _tree(inputs)
    _refused(_argv(inputs, inputs / "model", "--force"), capsys, "holds the --model folder")
    assert _tree(inputs) == before


def test_the_cache_folder_is_refused(inputs, capsys, monkeypatch):
    out = inputs / "runs"
    _previous_output(out)
    monkeypatch.setenv("GEFFECT_FAST_CACHE", str(out / "cache"))
    before = _tree(inputs)
    _refused(_argv(inputs, out, "--force"), capsys, "holds the cache of fine-tuned models")
    assert _tree(inputs) == before


def test_a_symlink_to_a_folder_is_refused_and_its_target_untouched(inputs, capsys):
    target = inputs / "deep" / "target"
    _previous_output(target)  # even an earlier output of the tool is not replaced through a link
    link = inputs / "link"
    link.symlink_to(target, target_is_directory=True)
    before = _tree(inputs)
    _refused(_argv(inputs, link, "--force"), capsys, "symbolic link")
    # link/../target is deep/target to the file system, target beside the link as written: refused too
    _refused(_argv(inputs, f"{link}/../target", "--force"), capsys, "symbolic link")
    assert _tree(inputs) == before and link.is_symlink()


@pytest.mark.parametrize("home_is_it", [False, True])
def test_a_home_like_folder_is_refused_from_another_working_folder(inputs, capsys, monkeypatch, home_is_it):
    home = inputs / "alice"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (home / ".bashrc").write_text("export PS1=$")
    elsewhere = inputs / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    if home_is_it:
        monkeypatch.setenv("HOME", str(home))
    before = _tree(inputs)
    _refused(_argv(inputs, home, "--force"), capsys, "home folder" if home_is_it else "not an output of geffect-fast")
    assert _tree(inputs) == before


def test_a_non_empty_folder_without_the_marker_is_refused(inputs, capsys):
    out = inputs / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = _tree(inputs)
    err = _refused(_argv(inputs, out, "--force"), capsys, "not an output of geffect-fast", MARKER)
    assert "pass --force" not in err  # --force would not help: not offered
    _refused(_argv(inputs, out), capsys, "not an output of geffect-fast")
    (out / MARKER).write_text("{not json")  # a garbled marker is no marker
    before = _tree(inputs)
    _refused(_argv(inputs, out, "--force"), capsys, "not an output of geffect-fast")
    assert _tree(inputs) == before


def test_an_earlier_output_with_a_file_added_is_refused(inputs, capsys):
    out = inputs / "run"
    _previous_output(out)
    (out / "plots" / "my_notes.txt").write_text("added by hand")
    before = _tree(inputs)
    _refused(_argv(inputs, out, "--force"), capsys, "holds files geffect-fast did not write ('plots/my_notes.txt')")
    assert _tree(inputs) == before


def test_an_empty_folder_is_accepted(inputs, capsys):
    out = inputs / "empty"
    out.mkdir()
    assert main(_argv(inputs, out)) == 2  # it exists: --force is needed
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(_argv(inputs, out, "--force")) == 2
    assert "REACHED MODEL LOADING" in capsys.readouterr().err  # past every output check
    assert out.is_dir() and not any(out.iterdir())  # a failed run leaves it as it was
    with atomic_output(out, force=True, command="geffect-fast test") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and read_marker(out)["files"] == ["a.txt"]


def test_an_earlier_output_is_replaced(inputs, capsys):
    out = inputs / "run"
    _previous_output(out, command="geffect-fast first")
    info = read_marker(out)
    assert info["command"] == "geffect-fast first" and info["files"] == ["plots/nll.png", "report.md"]
    assert {"tool", "version", "written"} <= set(info)
    assert main(_argv(inputs, out, "--force")) == 2
    assert "REACHED MODEL LOADING" in capsys.readouterr().err  # accepted by the CLI's checks
    with atomic_output(out, force=True, command="geffect-fast second") as tmp:
        (tmp / "summary.csv").write_text("objective\n")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "summary.csv"]
    assert read_marker(out)["command"] == "geffect-fast second"
    assert [p.name for p in inputs.iterdir() if p.name.startswith(".run.")] == []  # no temporary sibling left


def test_a_report_rerendered_into_an_output_keeps_it_replaceable(tmp_path):
    from geffect_fast.app import report

    rec = {"objective": "GA", "step": 1, "risk": "unlearn", "total": -1.0, "groups": {"embed": -1.0}}
    out = tmp_path / "run"
    with atomic_output(out, command="geffect-fast test") as tmp:
        (tmp / "geffects.jsonl").write_text(json.dumps(rec) + "\n")
    report.render(out)  # adds summary.csv, report.md, report.html and plots
    assert set(read_marker(out)["files"]) >= {"geffects.jsonl", "summary.csv", "report.md", "report.html"}
    with atomic_output(out, force=True) as tmp:
        pass
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_the_current_folder_and_its_parents_stay_refused(inputs, capsys, monkeypatch):
    work = inputs / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _tree(inputs)
    for out in (".", "..", "/"):
        _refused(_argv(inputs, out, "--force"), capsys, "is the current folder or one that holds it")
    assert _tree(inputs) == before
