"""The documentation stays inside the repository: every link in its Markdown files points at a file or folder
of the repository (a clone has nothing beside it), and the design document is linked from the README."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files():
    skip = {".venv", "build", "dist", ".git", ".pytest_cache"}
    return [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]


def test_every_markdown_link_stays_in_the_repository():
    files = _markdown_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "design.md" in files
    bad = []
    for md in files:
        for target in LINK.findall(md.read_text()):
            if target.startswith("#") or target.startswith("data:"):
                continue
            path = target.split("#", 1)[0]
            if "://" in path or path.startswith("mailto:"):
                bad.append(f"{md.relative_to(ROOT)}: {target} (leaves the repository)")
                continue
            resolved = (md.parent / path).resolve()
            if ROOT not in resolved.parents and resolved != ROOT:
                bad.append(f"{md.relative_to(ROOT)}: {target} (outside the repository)")
            elif not resolved.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
    assert not bad, "\n".join(bad)


def test_readme_links_the_design_and_kernel_pages():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/design.md)" in readme and "../shared" not in readme
    design = (ROOT / "docs" / "design.md").read_text()
    assert "](kernels.md)" in design and "](scaling.md)" in design


def _readme_demo():
    """benchmarks/readme_demo.py, the script that makes the README's demo numbers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "benchmarks" / "readme_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DEMO = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install . && geffect-fast demo"
)
TESTS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install ".[test]" && '
    "pytest -q tests"
)


def test_readme_starts_with_the_two_commands_and_their_durations():
    readme = (ROOT / "README.md").read_text()
    first = readme.split("\n## ", 1)[0]  # everything before the first section: the first screen
    for command in (DEMO, TESTS):
        assert f"```bash\n{command}\n```" in first, command
        before = first[: first.index(command)].rsplit("```", 1)[0].strip().rsplit("\n\n", 1)[-1]
        assert "minute" in before, f"no duration said before {command!r}: {before!r}"
    assert first.count("![") == 1 and len(first.split()) < 300  # one picture, a short screen


def test_readme_numbers_are_what_the_committed_demo_run_holds():
    """The README quotes the demo run benchmarks/readme_demo.py made (its summary.csv, and how far the numbers move
    across CPU kinds): regenerate with `python -m benchmarks.readme_demo` when the demo changes."""
    mod = _readme_demo()
    readme = (ROOT / "README.md").read_text()
    assert mod.readme_block_now(readme) == mod.expected_block()
    assert " ".join(mod.COMMAND) in DEMO  # the script runs the command the README shows
    summary = mod.read_summary(mod.RESULTS / "summary.csv")
    ga = summary[("GA", "unlearn")]
    assert f"{ga['nll_start']:.3f} → {ga['nll_end']:.3f}" in readme  # spot check, straight from the CSV
    assert "CPU_KINDS" not in readme and (mod.RESULTS / "cpu_kinds.json").is_file()


def test_readme_defines_its_words_before_using_them():
    """The objectives, forget05 and the official defaults are defined in the glossary before the README uses them;
    each objective's line says what the commands' help and the catalog say."""
    from geffect_fast.app import catalog

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Words used here")
    end = readme.index("\n## ", start + 1)
    glossary = readme[start:end]
    terms = [catalog.display(n) for n in catalog.LIBRARY] + ["forget05", "official defaults"]
    for term in terms:
        first = re.search(rf"(?<![\w+-]){re.escape(term)}(?![\w])", readme)
        assert first and start <= first.start() < end, f"{term!r} is used before the glossary defines it"
    for name, line in catalog.LIBRARY.items():
        assert f"**{catalog.display(name)}** (`{name}`): {line}" in " ".join(glossary.split()), name


def test_readme_lists_every_test_extra():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("test = [", 1)[1].split("]", 1)[0]
    extras = [re.split(r"[<>=!~ \[]", line.strip().strip('",'))[0] for line in block.splitlines() if '"' in line]
    assert len(extras) >= 8, extras
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentence = readme.split("The test extras are ", 1)[1].split(".", 1)[0]
    assert all(e in sentence for e in extras), (extras, sentence)


def test_geffect_reproduce_output_is_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "geffect_demo/" in ignored and "geffect_reproduce/" in ignored


def test_readme_findings_are_the_committed_runs_verdicts():
    """The README's table of the paper's five findings says what the committed reproduce runs decided."""
    import json

    readme = (ROOT / "README.md").read_text()
    table = readme.split("### The paper's five findings", 1)[1].split("| # |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    for col, model in ((3, "demo"), (4, "smollm2")):
        meta = json.loads((ROOT / "benchmarks" / "results" / f"reproduce_{model}" / "meta.json").read_text())
        want = {str(f["id"]): (f["claim"], f["verdict"]) for f in meta["findings"]}
        got = {r[0].strip(): (r[1].strip(), r[col - 1].strip()) for r in rows}
        assert got == want, (model, got, want)
