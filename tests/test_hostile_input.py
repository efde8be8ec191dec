"""Text from user input or data in the files the application writes (issue 23): report.md escaped, CSV cells a
spreadsheet does not run as formulas, and meta.json checked field by field like the records."""

import csv
import html
import json
import re
import shutil
from pathlib import Path

import pytest

from geffect_fast.app import report
from geffect_fast.app.cli import main
from geffect_fast.app.text import csv_cell, md, md_code, md_unescape, write_csv

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_OBJ = "GA|x`rm`<script>alert(1)</script>\n## [click](http://evil) **b** $x$ ~~s~~ &amp;"
HOSTILE_GROUP = "emb|ed\n<img src=x onerror=alert(1)>_[g]_"
HOSTILE_META = {
    "model": "m|odel\n# heading <b>bold</b>",
    "data": "forget `a|b.json`",
    "most_harmful": [{"question": "Who | what?\n<i>x</i>", "answer": "[a](javascript:x)", "retain_g_effect": -0.5}],
}


def _hostile_run(folder: Path) -> None:
    recs = []
    for obj in (HOSTILE_OBJ, '=HYPERLINK("http://evil","x")'):
        for step in (1, 2, 3):
            for risk, sign in (("unlearn", -1.0), ("retain", 0.5)):
                g = {HOSTILE_GROUP: sign * step, "@SUM(A1)": sign * 1e-3}
                recs.append({"objective": obj, "step": step, "risk": risk, "total": sum(g.values()), "groups": g})
    folder.mkdir(exist_ok=True)
    (folder / "geffects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "meta.json").write_text(json.dumps(HOSTILE_META))


def _unescaped(text: str, ch: str) -> int:
    return len(re.findall(r"(?<!\\)" + re.escape(ch), text))


def test_md_escapes_everything_that_has_a_meaning_in_a_line():
    s = md(HOSTILE_OBJ)
    assert "\n" not in s and md_unescape(s) == HOSTILE_OBJ.replace("\n", " ")
    for ch in "|`<>[]*_$~&":
        assert _unescaped(s, ch) == 0, (ch, s)
    assert md_code("a``b") == "```a``b```" and md_code("x\ny") == "`x y`"


def test_report_md_of_hostile_names_keeps_its_tables_and_injects_nothing(tmp_path):
    _hostile_run(tmp_path)
    report.render(tmp_path)
    text = (tmp_path / "report.md").read_text()
    tables = [line for line in text.splitlines() if line.startswith("|")]
    head = next(line for line in tables if line.startswith("| objective"))
    summary = [line for line in tables if "HYPERLINK" in line or "GA" in line]
    assert len(summary) == 4 and all(_unescaped(line, "|") == _unescaped(head, "|") for line in summary), summary
    harmful = next(line for line in tables if "Who" in line)
    assert _unescaped(harmful, "|") == 4, harmful
    for bad in ("<script", "</script", "<img", "<b>", "<i>", "[click]", "[a]", "`rm`", "**b**", "$x$", "~~s~~"):
        assert re.search(r"(?<!\\)" + re.escape(bad), text) is None, bad  # only ever escaped
    assert not any(line.startswith(("## [", "# heading")) for line in text.splitlines())  # no line injected
    # the HTML shows the names as written (one line), escaped once
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    shown = html.escape(HOSTILE_OBJ.replace("\n", " "))
    assert shown in page  # in the findings: the Markdown escapes undone before HTML-escaping


def test_csv_cells_that_start_like_formulas_are_neutralised_and_numbers_stay_numbers(tmp_path):
    for v in ("=1+2", "+cmd", "-x", "@SUM(A1)", "\tx", "\rx", "-1+2", "-1.5e-3 "):
        assert csv_cell(v) == "'" + v
    for v in ("-1.5e-3", "+2", "-0.5", "-inf", "plain", "", -1.5e-3, 3, None, True):
        assert csv_cell(v) == v
    write_csv([{"a": "=cmd", "b": -1.5e-3}, {"@c": "-2E-05", "b": "-x"}], tmp_path / "t.csv")
    rows = list(csv.reader(open(tmp_path / "t.csv", newline="")))
    assert rows == [["a", "b", "'@c"], ["'=cmd", "-0.0015", ""], ["", "'-x", "-2E-05"]]
    # the summary a run writes: hostile objective and group names neutralised, G-effects still numbers
    _hostile_run(tmp_path)
    report.render(tmp_path)
    with open(tmp_path / "summary.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert {r["objective"] for r in got} == {HOSTILE_OBJ, '\'=HYPERLINK("http://evil","x")'}
    assert "'group:@SUM(A1)" not in got[0] and "group:@SUM(A1)" in got[0]  # the header starts with "group:"
    assert all(float(r["cumulative"]) for r in got) and any(r["cumulative"].startswith("-") for r in got)


@pytest.mark.parametrize(
    "meta,message",
    [
        ('{"model": ', "not JSON"),
        ("[1, 2]", "must be a JSON object, got [1, 2]"),
        ('{"most_harmful": "abc"}', 'most_harmful must be a list, got "abc"'),
        (
            '{"most_harmful": [{"question": "q", "answer": "a", "retain_g_effect": "x"}]}',
            "most_harmful[0].retain_g_effect must be a finite number",
        ),
        ('{"most_harmful": [{"question": "q", "answer": "a"}]}', "field most_harmful[0].retain_g_effect is missing"),
        ('{"npo_scatter": {"weights": [1.0], "geffect": [1.0, 2.0]}}', "one value per sample"),
        ('{"npo_scatter": {"weights": [NaN], "geffect": [1.0]}}', "npo_scatter.weights[0] must be a finite number"),
        ('{"steps": {"n": 3}}', "steps must be text or a number"),
    ],
)
def test_report_on_a_bad_meta_json_is_one_line_naming_file_and_field(tmp_path, capsys, meta, message):
    rec = {"objective": "GA", "step": 1, "risk": "unlearn", "total": -1.0, "groups": {"embed": -1.0}}
    (tmp_path / "geffects.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "meta.json").write_text(meta)
    (tmp_path / "summary.csv").write_text("an earlier summary")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geffect-fast report: error: "), err
    assert f"{tmp_path / 'meta.json'}:" in err and message in err, err
    assert (tmp_path / "summary.csv").read_text() == "an earlier summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geffects.jsonl", "meta.json", "summary.csv"]


def _break(path, keys, value):
    *where, last = keys
    for k in where:
        path = path[k]
    if value is KeyError:
        del path[last]
    else:
        path[last] = value


@pytest.mark.parametrize(
    "keys,value,message",
    [
        (("outcomes", "GA", "seconds"), KeyError, "field outcomes.GA.seconds is missing"),
        (("outcomes", "GA", "nll_after", "retain"), "low", "outcomes.GA.nll_after.retain must be a finite number"),
        (("outcomes",), {}, "outcomes must name at least one objective"),
        (("config", "bogus"), 1, "config.bogus is not a setting of reproduce"),
        (("config", "steps"), "6", 'config.steps must be an integer, got "6"'),
        (("blocks",), "4", 'blocks must be an integer, got "4"'),
        (("answer_accuracy_before",), KeyError, "field answer_accuracy_before is missing"),
        (("smoothing_cost", "state_gb"), None, "smoothing_cost.state_gb must be a finite number, got null"),
    ],
)
def test_a_reproduce_folder_with_a_bad_meta_json_is_refused_before_anything_is_rewritten(
    tmp_path, capsys, keys, value, message
):
    src = ROOT / "benchmarks" / "results" / "reproduce_demo"
    shutil.copy(src / "geffects.jsonl", tmp_path / "geffects.jsonl")
    meta = json.loads((src / "meta.json").read_text())
    _break(meta, keys, value)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'meta.json'}:" in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geffects.jsonl", "meta.json"]  # nothing written


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("projected", {"embed": "half"}, "projected.embed must be a finite number"),
        ("scaled_groups", {"embed": None}, "scaled_groups.embed must be a finite number"),
    ],
)
def test_report_on_a_bad_guide_decision_is_one_line_naming_file_and_field(tmp_path, capsys, field, value, message):
    """Every field of guide.jsonl the report draws is checked before anything is written."""
    rec = {"objective": "GA", "step": 1, "risk": "unlearn", "total": -1.0, "groups": {"embed": -1.0}}
    (tmp_path / "geffects.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "guide.jsonl").write_text(json.dumps({"objective": "GA", "step": 1, field: value}) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'guide.jsonl'}:1:" in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geffects.jsonl", "guide.jsonl"]
