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
