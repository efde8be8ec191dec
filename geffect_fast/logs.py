"""The JSON-lines logs the Tracker and the Guide append to: created empty, never overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


def empty_log(log: str | Path | None, who: str) -> Path | None:
    """The log's path, its file created empty (and its folder); refused where it holds records already (never
    overwritten). ``who`` names the owner in the error."""
    if log is None:
        return None
    path = Path(log)
    if path.is_file() and path.stat().st_size > 0:
        raise FileExistsError(
            f"log file {path} exists and holds records (of an earlier run?); remove it or pass another path — the "
            f"{who} starts its log empty and will not overwrite it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def append(path: Path | None, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON line per row at the end of the log (nothing without a log)."""
    if path is not None:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
