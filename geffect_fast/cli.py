"""``geffect-fast``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geffect-fast",
        description="Exact per-instance, per-layer G-effects of LLM unlearning objectives "
        "(e = <grad R, v>), computed without materialising per-sample gradients.",
    )
    p.add_argument("--version", action="version", version=f"geffect-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run a short offline example on an embedded tiny model and print the G-effects")
    d.add_argument("--out", metavar="DIR", default=None, help="also write geffects.json to DIR")
    d.add_argument("--steps", type=int, default=80, help="fine-tuning steps before measuring (default 80)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "demo":
        if args.steps < 0:
            print("geffect-fast demo: --steps must be >= 0", file=sys.stderr)
            return 2
        from .demo import run_demo

        run_demo(out=args.out, steps=args.steps, seed=args.seed)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
