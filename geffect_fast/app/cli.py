"""``geffect-fast``: the command-line entry point (``geffect-fast COMMAND --help`` lists every option with its
default).

    geffect-fast demo [--out DIR] [--force] [--quick] [--objectives NAME,...] [--steps N] [--groups G]
    geffect-fast run --model PATH|smollm2 --forget F --retain R --objective NAME[,NAME...] --out DIR
                     [--steps N] [--every K] [--lr LR] [--groups G] [--direction gradient|update] [--device cuda]
                     [--dtype bf16] [--grad-ckpt] [--prompt P] [--max-length T] [--batch-size B]
                     [--probe-size N] [--probe-batch K] [--smooth] [--per-instance] [--force]
    geffect-fast reproduce [--model smollm2|demo] [--out DIR] [--force] [--quick] [--steps N] [--objectives ...]
    geffect-fast report DIR

Bad input gets one clear line on stderr and exit code 2; a run writes into a temporary folder that becomes
``--out`` only when everything is written, so nothing half-written is left looking complete — also when the
run is stopped by Ctrl-C or SIGTERM (exit code 130 / 143, the temporary folder removed). ``--force`` replaces only
an empty folder or an earlier output of this tool (its ``.geffect-fast-output`` marker), never one holding what the
run reads, never through a symbolic link.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from .._version import __version__
from . import catalog
from .common import (
    CLIError,
    Terminated,
    atomic_output,
    check_device,
    check_output_folder,
    load_model,
    model_folder,
    peak_rss_gb,
    sigterm_unwinds,
)


class _Help(argparse.HelpFormatter):
    """Help lines end with the option's default, where it has one worth showing (not None, not a switch's off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


#: what ``--force`` replaces (``common.check_output_folder``)
FORCE_HELP = (
    "replace DIR if it is empty or an earlier output of geffect-fast (it holds .geffect-fast-output and nothing "
    "else the tool did not write); never a folder holding the run's inputs, nor a symbolic link"
)

#: ``--groups auto`` uses the paper's depth groups from this many transformer blocks on (the official code's
#: 0–9 / 10–19 / ≥ 20 split is then about thirds); shallower models get one group per block
AUTO_PAPER_BLOCKS = 30


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geffect-fast",
        description="Exact per-instance, per-layer G-effects of LLM unlearning objectives "
        "(e = <grad R, v>), computed without materialising per-sample gradients.",
    )
    p.add_argument("--version", action="version", version=f"geffect-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_run(sub)
    _add_reproduce(sub)
    _add_report(sub)
    return p


def _objectives_help() -> str:
    """The library's objectives, as the registry lists them (through the torch-free catalog)."""
    names = ", ".join(catalog.LIBRARY)
    return (
        f"{catalog.count(len(catalog.LIBRARY))} objectives: {names}; a suffix +kl or +gd adds a retain term "
        "(e.g. npo+kl)"
    )


def _add_demo(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="fine-tune a small Llama on synthetic authors, unlearn, report (offline)",
        description="Fine-tune a small Llama until it knows 1000 QA about 100 fictitious authors (cached after "
        "the first run), unlearn forget05 (the 5% of authors to forget) with each objective while tracking "
        "G-effects per layer group and per instance, and write a report (report.html) into DIR.",
        formatter_class=_Help,
    )
    d.add_argument("--out", metavar="DIR", default="geffect_demo", help="output folder")
    d.add_argument("--force", action="store_true", help=FORCE_HELP)
    d.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds")
    d.add_argument(
        "--steps", type=int, default=None, metavar="N", help="unlearning steps per objective (default: 12; --quick 3)"
    )
    d.add_argument(
        "--objectives",
        "--objective",
        metavar="NAME,...",
        default=None,
        help=f"comma-separated objectives (default: {','.join(catalog.DEMO)}; --quick {','.join(catalog.DEMO_QUICK)})"
        f"; {_objectives_help()}",
    )
    d.add_argument(
        "--groups",
        default="block",
        metavar="G",
        help="layer groups: block, paper, thirds (the paper's shallow/middle/deep thirds at any depth) or module",
    )


def _add_run(sub) -> None:
    r = sub.add_parser(
        "run",
        help="track G-effects of objectives on your model and TOFU-format data",
        description="Unlearn the forget records with each objective (AdamW, one copy of the model per objective) "
        "and record the G-effects of every K-th step on the forget and retain probes, per layer group (and per "
        "instance), with the probes' NLL; writes geffects.jsonl, summary.csv, plots, report.md and report.html "
        "into DIR.",
        formatter_class=_Help,
    )
    r.add_argument(
        "--model", required=True, metavar="PATH|smollm2", help="a local Hugging Face causal-LM folder, or smollm2"
    )
    r.add_argument("--forget", required=True, metavar="F", help="forget records (JSON/JSONL with question, answer)")
    r.add_argument("--retain", required=True, metavar="R", help="retain records (JSON/JSONL with question, answer)")
    r.add_argument(
        "--objectives",
        "--objective",
        required=True,
        metavar="NAME,...",
        help=f"objective name(s), comma-separated (e.g. ga,npo); {_objectives_help()}",
    )
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, unless --force)")
    r.add_argument("--steps", type=int, default=10, metavar="N", help="unlearning steps per objective")
    r.add_argument("--every", type=int, default=1, metavar="K", help="measure the G-effects every K steps")
    r.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the unlearning steps")
    r.add_argument(
        "--groups",
        default="auto",
        metavar="G",
        help=f"layer groups: auto (paper for models with >= {AUTO_PAPER_BLOCKS} blocks, else block), block (embed, "
        "each block, final_norm, lm_head), paper (embed/shallow 0-9/middle 10-19/deep/lm), thirds (the paper's "
        "depths at any depth) or module",
    )
    r.add_argument(
        "--direction",
        default="gradient",
        choices=("gradient", "update"),
        help="gradient: the objective's gradient, the paper's G-effect (predicted_dR is then a plain-SGD step's "
        "prediction, not AdamW's); update: the step AdamW took (predicted_dR checked against measured_dR)",
    )
    r.add_argument("--force", action="store_true", help=FORCE_HELP)
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    r.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the model's weights")
    r.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing during unlearning")
    r.add_argument("--prompt", default="llama2", help="llama2, phi, phi_masked or chat (the tokenizer's template)")
    r.add_argument(
        "--max-length",
        type=int,
        default=256,
        metavar="T",
        help="tokens per sample (the whole text cut at T, as the official data module)",
    )
    r.add_argument("--batch-size", type=int, default=8, metavar="B", help="forget (and retain) rows per step")
    r.add_argument(
        "--probe-size", type=int, default=32, metavar="N", help="samples of each set used as G-effect probes"
    )
    r.add_argument("--per-instance", action="store_true", help="also record every probe sample's G-effects")
    r.add_argument(
        "--smooth",
        action="store_true",
        help="also record the official smoothed G-effect <g_R, g_u> per group (0.6/0.4 moving average of both "
        "gradients; one ordinary backward per probe set and 3 copies of the parameters)",
    )
    r.add_argument(
        "--probe-batch",
        type=int,
        default=8,
        metavar="K",
        help="rows of a probe set per pass (bounds peak memory; pooled exactly)",
    )
    _add_guide(r)


def _add_guide(r) -> None:
    """The run command's --guide options."""
    r.add_argument(
        "--guide",
        default=None,
        metavar="POLICIES",
        help="steer the unlearning by the G-effects (gf.Guide at its defaults), comma-separated: stop (end the run "
        "once a step would raise the retain NLL more than the forget NLL, 2 steps running), layers (zero the "
        "gradient of the layer groups that harm retention most per unit of unlearning), samples (weight each "
        "forget sample by its unlearning against its harm), project (remove from each layer group's step its component "
        "along the retain gradient where it would raise the retain NLL; opt-in); writes guide.jsonl; default: none",
    )
    r.add_argument(
        "--guide-every",
        type=int,
        default=1,
        metavar="K",
        help="with --guide: measure the probe gradients every K steps and reuse them between (1: every step, "
        "exact; K > 1 divides the probes' cost by K, a first-order approximation as θ moves)",
    )


def _add_reproduce(sub) -> None:
    n = catalog.count(len(catalog.PROTOCOL))
    rp = sub.add_parser(
        "reproduce",
        help="test the paper's five findings on a real model (SmolLM2-135M)",
        description=f"Fine-tune on synthetic fictitious authors, unlearn forget05 with the {n} objectives of the "
        "paper's protocol at the official defaults while tracking unsmoothed and smoothed G-effects per depth "
        "third, NLL and answer accuracy, and decide each of the paper's five findings (findings.md, plots, a run "
        "folder) in DIR.",
        formatter_class=_Help,
    )
    rp.add_argument("--model", default="smollm2", choices=("smollm2", "demo"), help="the model to unlearn")
    rp.add_argument("--out", metavar="DIR", default="geffect_reproduce", help="output folder")
    rp.add_argument("--force", action="store_true", help=FORCE_HELP)
    rp.add_argument("--quick", action="store_true", help="a tiny configuration (minutes on SmolLM2)")
    rp.add_argument(
        "--steps", type=int, default=None, metavar="N", help="unlearning steps per objective (default: 6; --quick 3)"
    )
    rp.add_argument(
        "--objectives",
        "--objective",
        default=None,
        metavar="NAME,...",
        help=f"comma-separated subset of the {n}: {', '.join(catalog.PROTOCOL)} (default: all {n}; --quick "
        f"{','.join(catalog.PROTOCOL_QUICK)})",
    )


def _add_report(sub) -> None:
    rep = sub.add_parser(
        "report",
        help="re-render a run folder's report from its geffects.jsonl",
        description="Re-render summary.csv, the plots, report.md and report.html of a run folder from its "
        "geffects.jsonl (and meta.json).",
        formatter_class=_Help,
    )
    rep.add_argument("dir", metavar="DIR", help="a run folder (holds geffects.jsonl)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--lr -1e-5`` as ``--lr=-1e-5``: argparse takes a token that starts with "-" for an option unless it looks
    like a plain negative integer or decimal, so ``-1e-5`` after a space was a usage dump while ``--lr=-1e-5``
    reached the option's own check. Every option of any command that takes one value is joined with a following
    token that parses as a number."""
    takes_value = set()
    actions = list(parser._actions)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                actions += sp._actions
    for a in actions:
        if a.option_strings and a.nargs is None:
            takes_value.update(a.option_strings)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(join_negative_values(parser, raw))
    args.argv = raw
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with sigterm_unwinds():
            if args.command == "demo":
                return _demo(args)
            if args.command == "run":
                return _run(args)
            if args.command == "reproduce":
                return _reproduce(args)
            if args.command == "report":
                return _report(args)
    except CLIError as e:
        print(f"geffect-fast {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"geffect-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"geffect-fast {args.command}: {what}; no partial output left", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    return 2  # pragma: no cover - argparse rejects unknown commands


def _demo(args) -> int:
    from dataclasses import replace

    check_output_folder(args.out, args.force)  # before anything big is imported or loaded
    from .demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if args.quick else DemoConfig()
    if args.steps is not None:
        cfg = replace(cfg, steps=_at_least_one("--steps", args.steps))
    if args.objectives:
        cfg = replace(cfg, objectives=tuple(_objective_names(args.objectives)))
    if args.groups is not None:
        cfg = replace(cfg, groups=_groups(args.groups))
    run_demo(args.out, cfg, force=args.force, command=_command(args))
    return 0


def _at_least_one(flag: str, value: int) -> int:
    if value < 1:
        raise CLIError(f"{flag} must be >= 1")
    return value


def _groups(spec: str) -> str:
    from ..groups import SCHEMES

    if spec not in SCHEMES:
        raise CLIError(f"unknown groups {spec!r}; use one of {', '.join(SCHEMES)}")
    return spec


def _reproduce(args) -> int:
    from dataclasses import replace

    check_output_folder(args.out, args.force)  # before anything big is imported or loaded
    from . import reproduce

    cfg = reproduce.config(args.model, quick=args.quick)
    if args.steps is not None:
        cfg = replace(cfg, steps=_at_least_one("--steps", args.steps))
    if args.objectives:
        try:
            names = catalog.parse_names(args.objectives, catalog.PROTOCOL)
        except KeyError as e:
            raise CLIError(e.args[0]) from None
        if not names:
            raise CLIError(f"no objective given; choose from {', '.join(catalog.PROTOCOL)}")
        cfg = replace(cfg, objectives=tuple(names))
    reproduce.run(args.out, cfg, force=args.force, command=_command(args))
    return 0


def _objective_names(spec: str) -> list[str]:
    """The names of ``--objectives``, each one the library resolves (``npo``, ``NPO``, ``npo+kl``), lower-cased."""
    from .. import objectives

    names = [n.lower() for n in catalog.parse_names(spec)]
    if not names:
        raise CLIError("no objective given")
    for n in names:
        try:
            objectives.resolve(n)
        except (KeyError, TypeError) as e:
            raise CLIError(
                f"unknown objective {n!r}; known: {', '.join(objectives.names())} (+kl or +gd adds a retain term)"
                if isinstance(e, KeyError)
                else str(e)
            ) from None
    return names


def _check_run_args(args) -> list[str]:
    """Everything cheap about ``run``'s arguments, before anything big loads; returns the objective names."""
    from .. import data
    from ..groups import SCHEMES

    names = _objective_names(args.objectives)
    if args.groups not in ("auto", *SCHEMES):
        raise CLIError(f"unknown groups {args.groups!r}; use one of {', '.join(('auto', *SCHEMES))}")
    if args.prompt not in (*data.PROMPTS, "chat"):
        raise CLIError(f"unknown --prompt {args.prompt!r}; use one of {', '.join([*data.PROMPTS, 'chat'])}")
    for flag in ("steps", "every", "batch_size", "probe_size", "probe_batch", "guide_every"):
        _at_least_one("--" + flag.replace("_", "-"), getattr(args, flag))
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.guide is not None:
        from ..guide import parse_policies

        try:
            args.guide = ",".join(parse_policies(args.guide))
        except ValueError as e:
            raise CLIError(f"--guide: {e}") from None
    check_device(args.device)
    check_output_folder(args.out, args.force, _run_inputs(args))
    return names


def _run_inputs(args) -> list[tuple[str, object]]:
    """What ``run`` reads, which its output folder must never be or hold: the data files' folders, the model's."""
    return [
        ("the --forget file's folder", Path(args.forget).parent),
        ("the --retain file's folder", Path(args.retain).parent),
        ("the --model folder", model_folder(args.model)),
    ]


def _command(args) -> str:
    """The command line as typed (for the output folder's marker and meta.json)."""
    return " ".join(["geffect-fast", *args.argv])


def _run_batches(args, tok, forget_recs, retain_recs) -> dict:
    """forget, retain, idk (refusals to the forget questions) and the probes, encoded and on the device."""
    from .. import data

    def enc(recs):
        b = data.encode_qa(recs, tok, prompt=args.prompt, max_length=args.max_length)
        return {k: v.to(args.device) for k, v in b.items()}

    forget, retain = enc(forget_recs), enc(retain_recs)
    idk_recs = [{**r, "answer": r.get("idk", data.REFUSALS[i % len(data.REFUSALS)])} for i, r in enumerate(forget_recs)]
    probes = {"unlearn": _head(forget, args.probe_size), "retain": _head(retain, args.probe_size)}
    return {"forget": forget, "retain": retain, "idk": enc(idk_recs), "probes": probes}


def _unlearn_each(args, names, ref, batches, groups, threads) -> tuple[list[dict], list[dict]]:
    """Each objective unlearns its own trainable copy of ``ref``; the records of all of them, and the guide's
    decisions (each labelled with its objective; none without ``--guide``)."""
    from .. import objectives
    from . import pipeline

    records, decisions = [], []
    for name in names:
        shown = catalog.display(name)
        m = pipeline.trainable_copy(ref)
        tracker: dict = {}
        guide = _make_guide(args, m, batches["probes"], groups)
        tr = pipeline.unlearn(
            m,
            objectives.resolve(name),
            batches["forget"],
            batches["retain"],
            args.steps,
            args.lr,
            ref_model=ref,
            idk=batches["idk"],
            probes=batches["probes"],
            batch_size=args.batch_size,
            every=args.every,
            groups=groups,
            direction=args.direction,
            per_instance=args.per_instance,
            name=shown,
            mode="train" if args.grad_ckpt else "eval",
            on_tracker=lambda t, box=tracker: box.update(t=t),
            progress=_step_progress(shown, tracker, threads),
            smooth=args.smooth,
            probe_batch_size=args.probe_batch,
            guide=guide,
        )
        records += tr.records
        if guide is not None:
            decisions += [{"objective": shown, **d} for d in guide.decisions]
        print(f"{shown} cumulative G-effect: " + ", ".join(f"{r} {v:+.3e}" for (o, r), v in tr.cumulative.items()))
        tracker.clear()
        del m, tr, guide  # the tracker holds the model: free both before the next copy
    return records, decisions


def _make_guide(args, model, probes, groups):
    """The ``--guide`` policies' Guide of ``model`` (None without the flag), measuring as the tracker does."""
    if args.guide is None:
        return None
    from ..guide import Guide
    from . import pipeline

    backend = pipeline.CPU_BACKEND if args.device == "cpu" else "auto"
    return Guide(model, probes, policies=args.guide, groups=groups, backend=backend, every=args.guide_every,
                 probe_batch=args.probe_batch, mode="train" if args.grad_ckpt else "eval")  # fmt: skip


def _run(args) -> int:
    import torch

    from .. import data
    from . import pipeline, report

    names = _check_run_args(args)  # everything cheap before loading anything big
    forget_recs = data.load_records(args.forget)
    retain_recs = data.load_records(args.retain)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    inputs = _run_inputs(args)
    with atomic_output(args.out, args.force, inputs, _command(args)) as tmp, _cpu_threads(args.device) as threads:
        model, tok = load_model(args.model, dtype, args.device)
        if args.grad_ckpt:
            model.activation_checkpointing_enable() if hasattr(model, "activation_checkpointing_enable") else (
                model.gradient_checkpointing_enable()
            )
        batches = _run_batches(args, tok, forget_recs, retain_recs)
        groups, groups_note = _resolve_groups(args.groups, model)
        print(
            f"{len(names)} objective(s) x {args.steps} steps on {len(forget_recs)} forget / {len(retain_recs)} retain "
            f"records; G-effects every {args.every} step(s) on {batches['probes']['unlearn']['input_ids'].shape[0]} + "
            f"{batches['probes']['retain']['input_ids'].shape[0]} probe samples, groups {groups_note}",
            flush=True,
        )
        # the reference is the loaded model itself, frozen; each objective unlearns a trainable copy of it (one
        # copy of the weights fewer than keeping the loaded model beside its reference)
        ref = pipeline.frozen_copy(model, inplace=True)
        del model
        records, decisions = _unlearn_each(args, names, ref, batches, groups, threads)
        with open(tmp / "geffects.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        if args.guide is not None:
            (tmp / "guide.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
        meta = {
            "model": args.model,
            "data": f"forget {args.forget} ({len(forget_recs)}), retain {args.retain} ({len(retain_recs)})",
            "objectives": ", ".join(catalog.display(n) for n in names),
            "steps": args.steps,
            "lr": args.lr,
            "direction": DIRECTION_NOTE[args.direction],
            "groups": groups_note,
            "smoothed": args.smooth,
            "guide": args.guide or "none",
            **({"guide_every": args.guide_every} if args.guide else {}),
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(peak_rss_gb(), 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        report.render(tmp)
    print(f"wrote {args.out}/")
    return 0


#: what each ``--direction`` means for the records' predicted_dR (the report's setup line)
DIRECTION_NOTE = {
    "gradient": "gradient of the objective (the paper's G-effect); predicted_dR = −lr·e is a plain-SGD step's "
    "prediction, not the AdamW step taken (measured_dR)",
    "update": "update: the step AdamW took, v = (θ_before − θ_after)/lr; predicted_dR = −lr·e predicts its measured_dR",
}


def _resolve_groups(spec: str, model) -> tuple[str, str]:
    """(scheme, how the report names it): ``auto`` is ``paper`` from AUTO_PAPER_BLOCKS blocks on, else ``block``."""
    if spec != "auto":
        return spec, spec
    from ..groups import find_layout

    n = find_layout(model).n_blocks
    scheme = "paper" if n >= AUTO_PAPER_BLOCKS else "block"
    return scheme, f"{scheme} (auto: {n} blocks)"


def _cpu_threads(device: str):
    """On a CPU, a :class:`~geffect_fast.demo.ThreadBudget` (torch threads sized to the free cores, restored
    afterwards); elsewhere None."""
    import torch

    if torch.device(device).type != "cpu":
        return contextlib.nullcontext(None)
    from .common import threads_for_load

    return threads_for_load(lambda s: print(s, flush=True))


def _step_progress(name: str, box: dict, threads=None):
    """A ``progress(step, steps)`` callback printing one line per step: time, and at measured steps the probes'
    NLL after the step and the step's G-effects (from the tracker in ``box['t']``); then it re-sizes ``threads``
    (a ThreadBudget, or None) to the cores free now."""
    t0 = [time.perf_counter()]

    def tick(step: int, steps: int) -> None:
        now = time.perf_counter()
        line = f"  {name} step {step}/{steps} ({now - t0[0]:.1f} s)"
        t0[0] = now
        recs = {r["risk"]: r for r in box["t"].records if r["step"] == step and r["kind"] != "compare"}
        if recs:
            nll = ", ".join(
                f"{'forget' if k == 'unlearn' else k} NLL {r['loss'] + r['measured_dR']:.4g}"
                for k, r in recs.items()
                if r.get("loss") is not None and r.get("measured_dR") is not None
            )
            e = ", ".join(
                f"{'unlearning' if k == 'unlearn' else 'retaining'} {r['total']:+.3g}" for k, r in recs.items()
            )
            line += f": {nll}; G-effect {e}"
        print(line, flush=True)
        if threads is not None:
            threads.adjust()

    return tick


def _head(batch, n):
    return {k: v[:n] for k, v in batch.items()}


def _report(args) -> int:
    from . import report
    from .records import read_meta

    run = Path(args.dir)
    if not run.is_dir():
        raise CLIError(f"{run} is not a folder")
    repro = "outcomes" in read_meta(run / "meta.json")  # a reproduce folder: its findings too
    if repro:
        from . import reproduce

        reproduce.load_meta(run)  # checked before anything is rewritten
    paths = report.render(run)
    names = sorted(p.name for p in paths.values())
    if repro:
        names.append(reproduce.render_findings(run).name)
    print(f"rendered {', '.join(names)} in {run}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
