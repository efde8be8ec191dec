"""Text from user input or data, made safe for the files the application writes: Markdown that cannot break a
table or inject markup (:func:`md`), and CSV cells a spreadsheet does not run as formulas (:func:`write_csv`)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Sequence

#: characters with a meaning inside a line of Markdown (table cells, code, HTML, links and images, emphasis,
#: strikethrough, entities, GitHub's math) that :func:`md` escapes with a backslash
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~$])")
_MD_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")


def md(text: Any) -> str:
    """``text`` as literal Markdown text: one line (line breaks and tabs become spaces), every character with a
    meaning in Markdown or HTML backslash-escaped, so it cannot end a table cell, open code, a link or a tag."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split("\n")).replace("\r", " ").replace("\t", " "))


def md_unescape(text: str) -> str:
    """Undo Markdown's backslash escapes (``\\|`` -> ``|``): the literal text that Markdown shows."""
    return _MD_ESCAPED.sub(r"\1", text)


def md_code(text: Any) -> str:
    """``text`` as one line of inline code, fenced with more backticks than it holds in a row."""
    one = " ".join(str(text).replace("\r", " ").split("\n"))
    run = max((len(m) for m in re.findall(r"`+", one)), default=0)
    fence = "`" * (run + 1)
    pad = " " if one.startswith("`") or one.endswith("`") else ""
    return f"{fence}{pad}{one}{pad}{fence}"


#: what a spreadsheet takes for the start of a formula in a cell
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as written: text starting like a formula (=, +, -, @, tab, CR) gets a ``'``
    in front; numbers — and text that is a signed number, such as ``-1.5e-3`` — stay as they are."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    if value[0] in "+-" and re.fullmatch(r"[+-](\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-](inf|nan)", value):
        return value
    return "'" + value


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``rows`` (dicts; the columns are every key, in the order first seen) as a CSV file at ``path``, every
    header and cell through :func:`csv_cell`; None is an empty cell."""
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([csv_cell(k) for k in keys])
        w.writerows([[csv_cell(r.get(k)) for k in keys] for r in rows])
