"""The objectives the commands name, without importing torch (``geffect-fast --help`` reads them).

:data:`LIBRARY` mirrors :data:`geffect_fast.objectives.REGISTRY` (a test keeps the two equal), with one line each
on what the objective does — the README's glossary and the commands' help say the same; :data:`PROTOCOL` is the
ten objectives of the paper's protocol that ``geffect-fast reproduce`` runs; :func:`display` is how records and
reports name an objective.
"""

from __future__ import annotations

#: the library's objectives in registry order, one line each
LIBRARY: dict[str, str] = {
    "ga": "gradient ascent: raise the forget set's NLL",
    "gd": "gradient difference: GA on the forget set plus the NLL of the retain set",
    "npo": "negative preference optimisation: GA whose per-sample weight falls as the sample's NLL rises above the "
    "reference model's",
    "simnpo": "NPO without a reference model, on the length-normalised NLL (ours: not in the paper)",
    "wga": "weighted GA: each token's NLL weighted by its probability p^α, so forgotten tokens stop counting",
    "tnpo": "token-wise NPO: NPO's weight per token instead of per sample",
    "wtnpo": "weighted token-wise NPO: TNPO's weight times p^α",
    "rmu": "representation misdirection: push one layer's hidden states towards a fixed random vector",
    "idkpo": 'train the model to answer the forget questions with a refusal ("I don\'t know")',
}
#: a ``+kl`` / ``+gd`` suffix adds the retain regulariser (``npo+kl``); see geffect_fast.objectives.resolve
RETAIN_SUFFIXES: dict[str, str] = {
    "kl": "plus the KL divergence from the reference model's predictions on the retain set",
    "gd": "plus the NLL of the retain set",
}
#: how records and reports spell the names (the paper's spelling)
_DISPLAY = {"idkpo": "IdkPO", "simnpo": "SimNPO"}

#: ``geffect-fast demo``'s objectives (and those of ``--quick``)
DEMO = ("ga", "npo", "wga", "tnpo", "wtnpo", "rmu", "idkpo")
DEMO_QUICK = ("ga", "npo", "rmu")
#: the paper's protocol (``geffect-fast reproduce``): its ten objectives as the records name them
PROTOCOL = ("GA", "GD", "GA+KL", "NPO", "NPO+KL", "WGA", "TNPO", "WTNPO", "RMU", "IdkPO")
PROTOCOL_QUICK = ("GA", "GD", "NPO", "RMU")

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def count(n: int) -> str:
    """``10`` -> "ten" (help texts say how many objectives in words, from the lists above)."""
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def display(name: str) -> str:
    """How records and reports name an objective: ``"npo+kl"`` -> "NPO+KL", ``"idkpo"`` -> "IdkPO"."""
    base, plus, suffix = name.strip().partition("+")
    key = base.strip().lower()
    shown = _DISPLAY.get(key, key.upper())
    return shown + (f"+{suffix.strip().upper()}" if plus else "")


def parse_names(spec: str, known: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Comma-separated names, stripped, empty parts dropped; with ``known``, each matched case-insensitively to its
    spelling there (KeyError naming the unknown ones and every known one)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if known is None:
        return names
    by_key = {k.lower(): k for k in known}
    unknown = [n for n in names if n.lower() not in by_key]
    if unknown:
        raise KeyError(f"unknown objective(s) {unknown}; choose from {', '.join(known)}")
    return [by_key[n.lower()] for n in names]
