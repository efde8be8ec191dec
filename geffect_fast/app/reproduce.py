"""``geffect-fast reproduce``: the paper's five findings, tested on a real pretrained model.

The protocol is the official one (``forget2.py`` + ``dataloader_ge.py`` of tmlr-group/G-effect) scaled to two
CPU cores; :data:`PROTOCOL` lists every choice beside its official counterpart:

1. a synthetic TOFU-like set of fictitious authors (:func:`geffect_fast.data.synthetic_authors`);
2. the model fine-tuned on all of it (cached, so a rerun skips this stage);
3. from that checkpoint, each objective (GA, GD, GA+KL, NPO, NPO+KL, WGA, TNPO, WTNPO, RMU, IdkPO, at the official
   defaults of :mod:`geffect_fast.objectives`) unlearns forget05 with AdamW while a :class:`~geffect_fast.Tracker`
   records, at every step and per depth group (``thirds``: the paper's embed/shallow/middle/deep/lm, identical to
   ``paper`` on SmolLM2's 30 blocks), the unsmoothed G-effect ⟨∇R, v⟩ and the official smoothed one ⟨ḡ_R, ḡ_u⟩
   on the forget set (unlearning) and on held-out retain questions (retaining), with both NLLs;
4. teacher-forced answer accuracy before and after, the cost of the smoothed pass against the unsmoothed one, and
   the verdict on each finding (:func:`findings`: reproduced / not reproduced / mixed, with the numbers that
   decide it), written with plots to the output folder (``findings.md``).

Sign convention: a step −η·v changes R by ≈ −η·e, so e < 0 on the forget set is unlearning and e < 0 on the
retain set is damage to retention.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import data, objectives
from . import catalog, figures, pipeline, report
from .common import (
    atomic_output,
    cache_dir,
    cpu_kind,
    cpu_name,
    load_model,
    model_folder,
    note_written,
    peak_rss_gb,
    save_cached,
    threads_for_load,
)
from .records import (
    INTEGER,
    NUMBER,
    REPORT_META,
    Maybe,
    common_scale,
    load_records,
    per_unit,
    read_meta,
    series,
    value_of,
)
from .text import md, md_code


def _protocol_objective(cfg: Any, name: str) -> objectives.Objective:
    """A protocol objective by its record name ("GA+KL" is ``resolve("ga+kl")``; RMU at the configured layer)."""
    if name == "RMU":
        return objectives.resolve("rmu", layer=cfg.rmu_layer)
    return objectives.resolve(name.lower())


#: the paper's protocol, as named in the records: name -> objective for a config
OBJECTIVES: dict[str, Callable[[Any], objectives.Objective]] = {
    n: (lambda cfg, n=n: _protocol_objective(cfg, n)) for n in catalog.PROTOCOL
}
DEPTHS = ("shallow", "middle", "deep")
WEIGHTED = ("NPO", "WGA", "TNPO", "WTNPO")
#: below this share of the forget set's answer tokens predicted right (teacher-forced) after fine-tuning, the model
#: never learned what it is asked to forget, and no finding is decided
LEARNED_MIN = 0.8

#: ours beside the official protocol (forget2.py, config/forget.yaml, data_module*.py, dataloader_ge.py)
PROTOCOL: list[tuple[str, str, str]] = [
    ("model", "{model_name} ({blocks} blocks, float32)", "Llama-2-7B-chat, Phi-1.5"),
    ("data", "synthetic fictitious authors, {n_authors} × {qa_per_author} QA", "TOFU, 200 authors × 20 QA"),
    (
        "fine-tune",
        "AdamW lr {ft_lr}, {ft_epochs} epoch{ft_epochs_s}, batch {ft_batch}{ft_cached}",
        "AdamW lr 1e-5, 5 epochs, batch 16",
    ),
    ("forget set", "forget05: the last 5 % of authors ({n_forget} QA)", "forget05: 200 QA"),
    (
        "retain data",
        "retain95 minus {retain_probe} held-out QA (the retaining probe)",
        "retain95 minus 400 held-out QA (evaluation)",
    ),
    (
        "unlearning",
        "AdamW lr {lr}, constant, {steps} steps, batch {batch_size}, fp32",
        "paged AdamW lr 1e-5, 1 epoch warm-up then linear decay, 5 epochs (62 steps), batch 4×4, bf16",
    ),
    (
        "prompt",
        "{prompt} format, cut at {max_length} tokens from the end, padding to the longest",
        "llama2 format, padded to 500",
    ),
    ("objectives", "official defaults (objectives.py table); RMU on hidden state {rmu_layer}", "same; rmu_<layer>"),
    (
        "G-effects",
        "every step, at θ before it; unsmoothed and smoothed (ḡ ← 0.6ḡ + 0.4g over steps)",
        "smoothed over the mini-batches of one pass at each saved checkpoint (every 5 steps)",
    ),
    ("groups", "thirds: embed/shallow/middle/deep(/lm) (blocks {thirds} of {blocks})", "embed/0–9/10–19/≥20/lm"),
]


@dataclass
class ReproConfig:
    model: str = "smollm2"  #: "smollm2", or "demo" (the demo's tiny Llama, trained from scratch)
    n_authors: int = 40
    qa_per_author: int = 5
    prompt: str = "llama2"
    max_length: int = 128
    ft_epochs: int = 2
    ft_lr: float = 2e-4
    ft_batch: int = 16
    steps: int = 6
    lr: float = 1e-4
    batch_size: int = 10
    retain_probe: int = 10
    probe_batch: int = 10
    rmu_layer: int = 10
    objectives: tuple[str, ...] = catalog.PROTOCOL
    cost_steps: int = 2  #: GA steps timed without smoothing, for the cost of the smoothed pass
    seed: int = 0
    quick: bool = False

    def finetune_key(self) -> str:
        import hashlib

        keys = ("model", "n_authors", "qa_per_author", "prompt", "max_length", "ft_epochs", "ft_lr", "ft_batch", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config(model: str = "smollm2", quick: bool = False) -> ReproConfig:
    """The configuration of the committed run (``quick``: a few minutes on SmolLM2, seconds on the demo model)."""
    if model not in ("smollm2", "demo"):
        raise ValueError(f"model must be 'smollm2' or 'demo', got {model!r}")
    cfg = ReproConfig(model=model)
    if model == "demo":  # the demo's model and data (100 × 10 QA; 4 blocks), already fine-tuned by the demo
        cfg = replace(cfg, n_authors=100, qa_per_author=10, lr=3e-4, batch_size=16, retain_probe=50, probe_batch=50)
        cfg = replace(cfg, rmu_layer=2)
    if quick:
        cfg = replace(cfg, quick=True, n_authors=20, qa_per_author=5, ft_epochs=1, steps=3, cost_steps=1)
        cfg = replace(cfg, objectives=catalog.PROTOCOL_QUICK, retain_probe=5, probe_batch=5, batch_size=5)
        if model == "demo":
            cfg = replace(cfg, rmu_layer=1)
    return cfg


# -- stages --------------------------------------------------------------------------------------------------------
def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _smollm2_finetuned(cfg: ReproConfig, splits, echo, threads=None) -> tuple[Any, Any, dict[str, float], bool]:
    """SmolLM2 fine-tuned on the synthetic authors (cached); (model, tokenizer, accuracy on the full set, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_dir() / f"reproduce-smollm2-{cfg.finetune_key()}"
    if (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32).eval()
        full = data.encode_qa(splits["full"], tok, prompt=cfg.prompt, max_length=cfg.max_length)
        echo(f"loaded the fine-tuned SmolLM2 from the cache ({path})")
        return model, tok, pipeline.answer_accuracy(model, full), True
    model, tok = load_model("smollm2", torch.float32, "cpu")
    full = data.encode_qa(splits["full"], tok, prompt=cfg.prompt, max_length=cfg.max_length)
    before = pipeline.answer_accuracy(model, full)
    n_batches = -(-full["input_ids"].shape[0] // cfg.ft_batch)
    echo(
        f"fine-tuning SmolLM2-135M on {len(splits['full'])} QA about {cfg.n_authors} fictitious authors "
        f"({cfg.ft_epochs} epochs × {n_batches} batches; answer accuracy before: tokens {before['token']:.1%})"
    )
    bar = _bar(cfg.ft_epochs * n_batches, "fine-tune (batches)")

    def tick(loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if threads is not None:
            threads.adjust()

    pipeline.finetune(model, full, cfg.ft_epochs, cfg.ft_lr, cfg.ft_batch, cfg.seed, on_batch=tick)
    bar.close()
    # the GGUF weights were de-quantised to float32 at load: plain weights, so the quantizer's refusal to save
    # does not apply
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_cached(model, tok, path)
    return model, tok, pipeline.answer_accuracy(model, full), False


def load_finetuned(cfg: ReproConfig, echo, threads=None) -> tuple[Any, Any, dict, dict, dict]:
    """(model, tokenizer, splits, accuracy on the fine-tuning set, the fine-tune as run: its data, epochs, lr, batch
    and whether it came from the cache)."""
    if cfg.model == "demo":
        from .demo import QUICK, DemoConfig, finetuned

        dcfg = QUICK if cfg.quick else DemoConfig()
        model, tok, splits, acc, cached = finetuned(dcfg, echo, threads)
        ft = dict(n_authors=dcfg.n_authors, qa_per_author=dcfg.qa_per_author, epochs=dcfg.epochs, lr=dcfg.lr)
        return model, tok, splits, acc, {**ft, "batch": dcfg.batch_size, "cached": cached}
    splits = data.synthetic_authors(cfg.n_authors, cfg.qa_per_author, cfg.seed)
    model, tok, acc, cached = _smollm2_finetuned(cfg, splits, echo, threads)
    ft = dict(n_authors=cfg.n_authors, qa_per_author=cfg.qa_per_author, epochs=cfg.ft_epochs, lr=cfg.ft_lr)
    return model, tok, splits, acc, {**ft, "batch": cfg.ft_batch, "cached": cached}


@torch.no_grad()
def _nll(model, batch) -> float:
    from ..loss import risk

    was = model.training
    model.eval()
    try:
        return float(risk(model, batch))
    finally:
        model.train(was)


class _Protocol:
    """One run of the protocol: the fine-tuned reference model, the encoded sets, and the unlearning of each
    objective from it (:meth:`unlearn`), with what it measured."""

    def __init__(self, cfg: ReproConfig, echo, threads=None):
        self.cfg, self.echo = cfg, echo
        t0 = time.perf_counter()
        model, tok, splits, self.ft_acc, self.finetune = load_finetuned(cfg, echo, threads)
        self.stages = {"load + fine-tune": time.perf_counter() - t0}
        echo(f"answer accuracy after fine-tuning (teacher-forced): tokens {self.ft_acc['token']:.1%}")
        self.forget_recs = splits["forget05"]
        self.probe_recs = splits["retain95"][: cfg.retain_probe]

        def enc(recs):
            return data.encode_qa(recs, tok, prompt=cfg.prompt, max_length=cfg.max_length)

        self.forget, self.probe = enc(self.forget_recs), enc(self.probe_recs)
        self.retain = enc(splits["retain95"][cfg.retain_probe :])
        self.idk = enc(data.idk_records(self.forget_recs))
        self.ref = pipeline.frozen_copy(model, inplace=True)
        del model
        self.acc0 = {
            "forget": pipeline.answer_accuracy(self.ref, self.forget),
            "retain": pipeline.answer_accuracy(self.ref, self.probe),
        }
        self.records: list[dict[str, Any]] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.step_seconds: dict[str, list[float]] = {}
        self.state_bytes = 0

    def unlearned(self, name: str, steps: int, smooth: bool, progress=None):
        """A trainable copy of the reference unlearned by ``name`` for ``steps`` steps, and its tracker."""
        cfg = self.cfg
        m = pipeline.trainable_copy(self.ref)
        tr = pipeline.unlearn(
            m,
            OBJECTIVES[name](cfg),
            self.forget,
            self.retain,
            steps,
            cfg.lr,
            ref_model=self.ref,
            idk=self.idk,
            probes={"unlearn": self.forget, "retain": self.probe},
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            progress=progress,
            name=name,
            smooth=smooth,
            groups="thirds",
            direction="gradient",
            probe_batch_size=cfg.probe_batch,
            measure_change=False,  # R after each step is the next step's R before it
        )
        return m, tr

    def unlearn(self, name: str) -> None:
        """Unlearn with ``name`` (smoothed tracking), keeping its records and its outcome."""
        bar = _bar(self.cfg.steps, f"unlearn {name}")
        t1 = time.perf_counter()
        m, tr = self.unlearned(name, self.cfg.steps, True, progress=lambda s, n: bar.update(1))
        bar.close()
        self.stages[f"unlearn {name}"] = time.perf_counter() - t1
        self.step_seconds[name] = list(tr.step_seconds)
        self.state_bytes = max(self.state_bytes, tr.smoothed_state_bytes)
        self.records += tr.records
        o = self.outcomes[name] = self._outcome(m, tr.records, self.stages[f"unlearn {name}"])
        self.echo(
            f"{name:<7} forget NLL {o['nll_before']['unlearn']:.3f} -> {o['nll_after']['unlearn']:.3f}, retain NLL "
            f"{o['nll_before']['retain']:.3f} -> {o['nll_after']['retain']:.3f}; answer accuracy forget "
            f"{o['acc_after']['forget']['token']:.0%}, retain {o['acc_after']['retain']['token']:.0%} "
            f"({o['seconds']:.0f}s)"
        )
        del m, tr
        gc.collect()

    def _outcome(self, m, recs, seconds: float) -> dict[str, Any]:
        series = {r: [x for x in recs if x["risk"] == r] for r in ("unlearn", "retain")}
        final = {"unlearn": _nll(m, self.forget), "retain": _nll(m, self.probe)}
        units = {r: [per_unit(x) for x in series[r]] for r in series}
        return {
            "cumulative": {
                **{r: sum(x["total"] for x in series[r]) for r in series},
                **{f"{r}_per_unit": None if None in units[r] else sum(units[r]) for r in series},
                **{f"smoothed_{r}": sum(x["smoothed_total"] for x in series[r]) for r in series},
            },
            "nll_before": {r: series[r][0]["loss"] for r in series},
            "nll_after": final,
            #: NLL at θ_0 … θ_steps: R before each step, then after the last
            "nll_curve": {r: [x["loss"] for x in series[r]] + [final[r]] for r in series},
            "acc_after": {
                "forget": pipeline.answer_accuracy(m, self.forget),
                "retain": pipeline.answer_accuracy(m, self.probe),
            },
            "seconds": round(seconds, 1),
        }

    def smoothing_cost(self) -> dict[str, Any] | None:
        """The cost of the smoothed pass: the first objective's first steps again, tracked without smoothing."""
        cfg = self.cfg
        if cfg.cost_steps <= 0:
            return None
        name = cfg.objectives[0]
        m, tr = self.unlearned(name, cfg.cost_steps, False)
        unsmoothed_s = list(tr.step_seconds)
        del m, tr
        gc.collect()
        return {
            "objective": name,
            "unsmoothed_s_per_step": statistics.median(unsmoothed_s),
            "smoothed_s_per_step": statistics.median(self.step_seconds[name][: cfg.cost_steps]),
            "state_gb": self.state_bytes / 2**30,
            "parameters": sum(p.numel() for p in self.ref.parameters()),
            "per_instance": False,
        }

    def meta(self, command: str, load0, wall: float, cost, verdicts) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "command": command or "geffect-fast reproduce",
            "model": "SmolLM2-135M-Instruct (GGUF de-quantised)" if cfg.model == "smollm2" else "the demo's Llama",
            "blocks": _n_blocks(self.ref),
            "machine": _machine(),
            "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "finetune": self.finetune,
            "n_forget": len(self.forget_recs),
            "n_probe": len(self.probe_recs),
            "common_scale": common_scale(self.records),
            "finetune_cached": self.finetune["cached"],
            "answer_accuracy_finetuned": self.ft_acc,
            "answer_accuracy_before": self.acc0,
            "config": asdict(cfg),
            "stages_s": {k: round(v, 1) for k, v in self.stages.items()},
            "wall_time_s": round(wall, 1),
            "peak_rss_gb": round(peak_rss_gb(), 2),
            "smoothing_cost": cost,
            "outcomes": self.outcomes,
            "findings": verdicts,
            "objectives": ", ".join(cfg.objectives),
            "steps": cfg.steps,
            "lr": cfg.lr,
            "direction": "gradient of the objective (the paper's G-effect), unsmoothed and smoothed",
            "groups": "thirds",
            "data": f"synthetic authors: {self.finetune['n_authors']} × {self.finetune['qa_per_author']} QA; "
            f"forget05 ({len(self.forget_recs)} QA); {len(self.probe_recs)} held-out retain QA as the retaining probe",
        }


def run(out: str | Path, cfg: ReproConfig | None = None, force: bool = False, command: str = "", echo=print) -> Path:
    """Run the protocol into ``out`` (refused if it exists, unless ``force`` and it is empty or an earlier output
    of this tool); returns the folder."""
    cfg = cfg or config()
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    inputs = [("the model's folder", model_folder(cfg.model))] if cfg.model == "smollm2" else []
    with atomic_output(out, force, inputs, command) as tmp, threads_for_load(echo) as threads:
        p = _Protocol(cfg, echo, threads)
        for name in cfg.objectives:
            threads.adjust()  # as the demo: torch's threads sized to the cores free now
            p.unlearn(name)
        cost = p.smoothing_cost()
        verdicts = findings(p.records, p.outcomes, learned=p.acc0["forget"]["token"])
        meta = p.meta(command, load0, time.perf_counter() - t0, cost, verdicts)
        with open(tmp / "geffects.jsonl", "w") as f:
            for r in p.records:
                f.write(json.dumps(r) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        images = figures.findings_plots(p.records, p.outcomes, tmp)
        (tmp / "findings.md").write_text(findings_markdown(meta, verdicts, p.outcomes, cfg, images))
        report.render(tmp)
    echo(f"wrote {out}/findings.md in {time.perf_counter() - t0:.0f}s (peak RSS {peak_rss_gb():.2f} GB)")
    for v in verdicts:
        echo(f"  ({v['id']}) {v['claim']}: {v['verdict']} — {v['numbers']}")
    return Path(out)


_ACC = {"token": NUMBER, "exact?": NUMBER}
_BY_RISK = {"unlearn": NUMBER, "retain": NUMBER}
#: the fields of a reproduce folder's meta.json that :func:`render_findings` reads, and their shapes
META = {
    **REPORT_META,
    "command": str,
    "model": str,
    "blocks": INTEGER,
    "machine": str,
    "load_average_start": [NUMBER],
    "load_average_end": [NUMBER],
    "wall_time_s": NUMBER,
    "stages_s": {"*": NUMBER},
    "finetune_cached": bool,
    "peak_rss_gb": NUMBER,
    "answer_accuracy_before": {"forget": _ACC, "retain": _ACC},
    "answer_accuracy_finetuned": _ACC,
    "finetune?": {
        "n_authors?": INTEGER,
        "qa_per_author?": INTEGER,
        "epochs?": INTEGER,
        "lr?": NUMBER,
        "batch?": INTEGER,
    },
    "n_forget?": INTEGER,
    "n_probe?": INTEGER,
    "smoothing_cost?": Maybe(
        {
            "objective": str,
            "unsmoothed_s_per_step": NUMBER,
            "smoothed_s_per_step": NUMBER,
            "state_gb": NUMBER,
            "parameters": INTEGER,
        }
    ),
    "config": {
        f"{f.name}?": [str]
        if f.name == "objectives"
        else {int: INTEGER, float: NUMBER, str: str, bool: bool}[type(f.default)]
        for f in fields(ReproConfig)
    },
    "outcomes": {
        "*": {
            "cumulative?": {"*": Maybe(NUMBER)},
            "nll_before": _BY_RISK,
            "nll_after": _BY_RISK,
            "nll_curve": {"unlearn?": [NUMBER], "retain": [NUMBER]},
            "acc_after": {"forget": _ACC, "retain": _ACC},
            "seconds": NUMBER,
        }
    },
}


def load_meta(folder: str | Path) -> dict[str, Any]:
    """A reproduce folder's meta.json, every field :func:`render_findings` reads checked (a ValueError naming
    the file and the field)."""
    path = Path(folder) / "meta.json"
    meta = read_meta(path, META, required=True)
    known = {f.name for f in fields(ReproConfig)}
    unknown = sorted(set(meta["config"]) - known)
    short = [n for n, o in meta["outcomes"].items() if len(o["nll_curve"]["retain"]) < 2]
    problem = None
    if unknown:
        problem = f"config.{unknown[0]} is not a setting of reproduce (known: {', '.join(sorted(known))})"
    elif not meta["outcomes"]:
        problem = "outcomes must name at least one objective"
    elif short:
        problem = f"outcomes.{short[0]}.nll_curve.retain must hold at least 2 values (the NLL before and after)"
    if problem:
        raise ValueError(f"{path}: {problem}")
    return meta


def render_findings(folder: str | Path) -> Path:
    """Re-render a reproduce folder's findings.md and findings_*.png from its geffects.jsonl and meta.json (the
    verdicts recomputed by today's rules; ``geffect-fast report DIR`` calls it for a reproduce folder). The meta
    and the records are checked before anything is written."""
    folder = Path(folder)
    meta = load_meta(folder)
    records = load_records(folder / "geffects.jsonl")
    cfg = ReproConfig(**{**meta["config"], "objectives": tuple(meta["config"].get("objectives", catalog.PROTOCOL))})
    acc = meta.get("answer_accuracy_before", {}).get("forget", {}).get("token")
    meta["findings"] = findings(records, meta["outcomes"], learned=acc)
    meta["common_scale"] = common_scale(records)
    images = figures.findings_plots(records, meta["outcomes"], folder)
    (folder / "findings.md").write_text(findings_markdown(meta, meta["findings"], meta["outcomes"], cfg, images))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    note_written(folder, ["findings.md", "meta.json", *(name for name, _ in images)])
    return folder / "findings.md"


def _n_blocks(model) -> int:
    from ..groups import find_layout

    return find_layout(model).n_blocks


def _machine() -> str:
    return (
        f"{cpu_name()} ({cpu_kind()} kernels), {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)} at the end)"
    )


# -- the findings --------------------------------------------------------------------------------------------------
def _verdict(n_holds: int, n: int) -> str:
    """Reproduced when the claim holds in every case, not reproduced in none, mixed otherwise."""
    return "reproduced" if n_holds == n else "not reproduced" if n_holds == 0 else "mixed"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x == x else "n/a"


#: each finding: (claim, the objectives it needs — all of them, or "any" of them —, the rule)
CLAIMS: dict[int, tuple[str, tuple[str, ...], str, str]] = {
    1: (
        "unlearning affects shallow layers most",
        tuple(n for n in catalog.PROTOCOL if n != "RMU"),
        "any",
        "Σ_t |e_t,g| of the unlearning G-effect is largest in the shallow third, per objective (RMU, whose target sits "
        "at a fixed depth, excluded); reproduced if for all",
    ),
    2: (
        "every objective compromises retention",
        catalog.PROTOCOL,
        "any",
        "cumulative retaining G-effect E_retain < 0 and measured retain ΔNLL > 0, for every objective",
    ),
    3: (
        "excessive unlearning is harmful",
        ("GA",),
        "all",
        "for GA, the mean per-step |retaining G-effect| and the per-step rise of the retain NLL are larger in the "
        "last third of the steps than in the first (both > 1: reproduced)",
    ),
    4: (
        "risk weighting (NPO/WGA/TNPO/WTNPO) helps",
        ("GA", *WEIGHTED),
        "GA and any",
        "retention cost per unit of unlearning κ (G-effects and NLL) below GA's in both, per weighted objective; "
        "reproduced if for all",
    ),
    5: (
        "regularisation matters; KL retains better than GD",
        ("GA", "GD", "GA+KL"),
        "all",
        "κ (G-effects and NLL) of the regularised objective below the unregularised one's (GD and GA+KL vs GA, NPO+KL "
        "vs NPO when run) and of GA+KL below GD's; reproduced if every comparison holds",
    ),
}


def _missing(i: int, ran: Sequence[str]) -> list[str] | None:
    """The objectives finding ``i`` needs that were not run (None when it can be decided)."""
    _, needs, how, _ = CLAIMS[i]
    if how == "all":
        lacking = [n for n in needs if n not in ran]
        return lacking or None
    if how == "GA and any":
        lacking = [] if "GA" in ran else ["GA"]
        if not any(n in ran for n in needs[1:]):
            lacking.append(" or ".join(needs[1:]))
        return lacking or None
    return None if any(n in ran for n in needs) else [" or ".join(needs)]


class _Run:
    """What the findings read off a run: per objective its records by risk and its outcome; ``value(r)`` is a
    step's G-effect on the scale objectives compare on (e/‖v‖ when the records carry ‖v‖, else e)."""

    def __init__(self, records, outcomes):
        self.S = series(records)
        self.outcomes = outcomes
        self.names = [n for n in outcomes if n in self.S]
        self.scaled = common_scale(records)
        self.value = value_of(self.scaled)
        self.e = "e/‖v‖" if self.scaled else "e"

    def cum(self, n: str, risk: str) -> float:
        return sum(self.value(r) for r in self.S[n][risk])

    def d_nll(self, n: str, risk: str) -> float:
        o = self.outcomes[n]
        return o["nll_after"][risk] - o["nll_before"][risk]

    def kappa(self, n: str) -> tuple[float, float]:
        """(κ_G, κ_NLL): retention cost per unit of unlearning; NaN where the objective does not unlearn."""
        Eu, Er = self.cum(n, "unlearn"), self.cum(n, "retain")
        df, dr = self.d_nll(n, "unlearn"), self.d_nll(n, "retain")
        return (Er / Eu if Eu < 0 else float("nan")), (dr / df if df > 0 else float("nan"))


def _better(a: float, b: float) -> bool:
    """a's κ below b's (a NaN — no unlearning — is never better)."""
    return a == a and (b != b or a < b)


def _finding_depth(run: _Run) -> tuple[int, int, str]:
    """(1) Σ_t |e_t,g| on the forget set is largest for g = shallow (raw per-group values: one objective's groups
    compare among themselves)."""

    def mag(lst, g, key="groups"):
        return sum(abs(r[key].get(g, 0.0)) for r in lst if r.get(key) is not None)

    cands = [n for n in run.names if n != "RMU"]
    rows, holds, holds_s = [], 0, 0
    for n in cands:
        lst = run.S[n]["unlearn"]
        m = {g: mag(lst, g) for g in DEPTHS}
        ms = {g: mag(lst, g, "smoothed_groups") for g in DEPTHS}
        top = max(m, key=m.get)
        holds += top == "shallow"
        holds_s += max(ms, key=ms.get) == "shallow"
        rows.append(f"{n} {top} ({'/'.join(_fmt(m[g]) for g in DEPTHS)})")
    numbers = (
        f"shallow largest for {holds}/{len(cands)} objectives (smoothed: {holds_s}/{len(cands)}); "
        "largest group (Σ|e| shallow/middle/deep): " + "; ".join(rows)
    )
    return holds, len(cands), numbers


def _finding_retention(run: _Run) -> tuple[int, int, str]:
    """(2) every objective compromises retention: E_retain < 0 and the retain NLL rises."""
    rows, holds = [], 0
    for n in run.names:
        E, d = run.cum(n, "retain"), run.d_nll(n, "retain")
        holds += E < 0 and d > 0
        rows.append(f"{n} Σ{run.e} {_fmt(E)}, ΔNLL {d:+.3f}")
    numbers = f"{holds}/{len(run.names)} objectives with E_retain < 0 and a rising retain NLL: " + "; ".join(rows)
    return holds, len(run.names), numbers


def _late_early(run: _Run, n: str) -> tuple[float, float]:
    """(late/early mean |retaining G-effect| per step, late/early retain NLL rise per step), thirds of the steps."""
    ret = run.S[n]["retain"]
    k = max(1, len(ret) // 3)
    g_early = statistics.fmean(abs(run.value(r)) for r in ret[:k])
    g_late = statistics.fmean(abs(run.value(r)) for r in ret[-k:])
    curve = run.outcomes[n]["nll_curve"]["retain"]
    d = [b - a for a, b in zip(curve, curve[1:])]  # the retain NLL's change at each step
    d_early, d_late = statistics.fmean(d[:k]), statistics.fmean(d[-k:])
    return g_late / g_early if g_early else float("nan"), (d_late / d_early if d_early > 0 else float("nan"))


def _finding_excessive(run: _Run) -> tuple[int, int, str]:
    """(3) excessive unlearning is harmful: GA's damage to retention per step grows as unlearning goes on."""
    rows = [f"{n} {'/'.join(_fmt(x) for x in _late_early(run, n))}" for n in run.names]
    ga = _late_early(run, "GA")
    acc = run.outcomes["GA"].get("acc_after", {}).get("forget", {}).get("token")
    numbers = (
        f"GA: late/early |{run.e}_retain| {_fmt(ga[0])}, late/early retain ΔNLL per step {_fmt(ga[1])}"
        + (f" (forget accuracy after: {acc:.0%})" if acc is not None else "")
        + "; all (G/NLL): "
        + "; ".join(rows)
    )
    return int(ga[0] > 1) + int(ga[1] > 1), 2, numbers


def _finding_weighting(run: _Run) -> tuple[int, int, str]:
    """(4) risk weighting helps: κ of NPO/WGA/TNPO/WTNPO below GA's, in G-effects and in NLL."""
    kg = run.kappa("GA")
    ws = [w for w in WEIGHTED if w in run.names]
    rows, n_ok = [], 0
    for w in ws:
        k = run.kappa(w)
        n_ok += _better(k[0], kg[0]) and _better(k[1], kg[1])
        rows.append(f"{w} {_fmt(k[0])}/{_fmt(k[1])}")
    numbers = f"κ_G/κ_NLL: GA {_fmt(kg[0])}/{_fmt(kg[1])}; " + "; ".join(rows) + f" — {n_ok}/{len(ws)} below GA in both"
    return n_ok, len(ws), numbers


def _finding_regularisation(run: _Run) -> tuple[int, int, str]:
    """(5) regularisation matters, KL better than GD for retention."""
    wanted = (("GD", "GA"), ("GA+KL", "GA"), ("NPO+KL", "NPO"), ("GA+KL", "GD"))
    pairs = [(a, b) for a, b in wanted if a in run.names and b in run.names]
    rows, n_ok = [], 0
    for a, b in pairs:
        ka, kb = run.kappa(a), run.kappa(b)
        ok = _better(ka[0], kb[0]) and _better(ka[1], kb[1])
        n_ok += ok
        rows.append(f"{a} {_fmt(ka[0])}/{_fmt(ka[1])} vs {b} {_fmt(kb[0])}/{_fmt(kb[1])}: {'yes' if ok else 'no'}")
    return n_ok, len(pairs), "κ_G/κ_NLL: " + "; ".join(rows)


_DECIDE = {
    1: _finding_depth,
    2: _finding_retention,
    3: _finding_excessive,
    4: _finding_weighting,
    5: _finding_regularisation,
}


def findings(
    records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Mapping[str, Any]], learned: float | None = None
) -> list[dict[str, Any]]:
    """The paper's five findings, each decided from the run: ``reproduced`` when the stated test holds in every
    case, ``not reproduced`` in none, ``mixed`` otherwise, with the numbers that decide it and the rule;
    ``not tested`` when the objectives it needs were not run; ``inconclusive`` for all of them when ``learned`` —
    the share of the forget set's answer tokens the fine-tuned model predicts — is below LEARNED_MIN (a model that
    never learned the forget set cannot show what unlearning it does).

    e_t: a step's G-effect (total or per group) on the common scale — e_t/‖v_t‖ when the records carry ‖v_t‖,
    else the raw e_t —, ē_t the smoothed one; E = Σ_t e_t the cumulative one; ΔNLL = NLL after − before. Retention
    cost per unit of unlearning: κ_G = E_retain / E_unlearn (G-effects; both negative when the objective unlearns
    and harms) and κ_NLL = ΔNLL_retain / ΔNLL_forget (measured); smaller is better, and an objective that does not
    raise the forget NLL has no finite κ_NLL (counted as not better).
    """
    run = _Run(records, outcomes)
    out = []
    for i, (claim, _needs, _how, rule) in CLAIMS.items():
        lacking = _missing(i, run.names)
        if lacking:
            verdict, numbers = "not tested", f"needs {', '.join(lacking)}, which this run did not unlearn with"
        else:
            holds, n, numbers = _DECIDE[i](run)
            verdict = _verdict(holds, n)
            if learned is not None and learned < LEARNED_MIN:
                verdict = "inconclusive"
                numbers = (
                    f"the fine-tuned model predicts {learned:.1%} of the forget set's answer tokens (< "
                    f"{LEARNED_MIN:.0%}): it never learned what it is asked to forget. As measured: {numbers}"
                )
        out.append({"id": i, "claim": claim, "verdict": verdict, "numbers": numbers, "rule": rule})
    return out


# -- output --------------------------------------------------------------------------------------------------------
def _thirds(blocks: int) -> str:
    """Which blocks each depth third holds: "0–9/10–19/20–29" at 30 blocks, "0/none/1" at 2."""
    from ..groups import thirds_bucket

    parts = []
    for g in DEPTHS:
        ids = [i for i in range(blocks) if thirds_bucket(f"block.{i}", blocks) == g]
        parts.append("none" if not ids else str(ids[0]) if len(ids) == 1 else f"{ids[0]}–{ids[-1]}")
    return "/".join(parts)


def _protocol_rows(meta: Mapping[str, Any], cfg: ReproConfig) -> list[str]:
    ft = meta.get("finetune") or {}
    fmt = {
        **asdict(cfg),
        "n_authors": ft.get("n_authors", cfg.n_authors),
        "qa_per_author": ft.get("qa_per_author", cfg.qa_per_author),
        "ft_lr": ft.get("lr", cfg.ft_lr),
        "ft_epochs": ft.get("epochs", cfg.ft_epochs),
        "ft_epochs_s": "" if ft.get("epochs", cfg.ft_epochs) == 1 else "s",
        "ft_batch": ft.get("batch", cfg.ft_batch),
        "ft_cached": " (cached from an earlier run)" if meta.get("finetune_cached") else "",
        "n_forget": meta.get("n_forget", round(cfg.n_authors * cfg.qa_per_author * 0.05)),
        "retain_probe": meta.get("n_probe", cfg.retain_probe),
        "model_name": md(meta["model"]),
        "blocks": meta["blocks"],
        "thirds": _thirds(meta["blocks"]),
    }
    return [f"| {what} | {ours.format(**fmt)} | {official} |" for what, ours, official in PROTOCOL]


def _header(meta: Mapping[str, Any]) -> list[str]:
    return [
        f"# The paper's five findings on {md(meta['model'])} ({meta['blocks']} blocks)",
        "",
        f"Command: {md_code(meta['command'])}  ",
        f"Machine: {md(meta['machine'])}; load average {meta['load_average_start']} at the start, "
        f"{meta['load_average_end']} at the end (a shared machine when above the core count)  ",
        f"Wall time: {meta['wall_time_s'] / 60:.1f} min ("
        + ", ".join(f"{md(k)} {v:.0f}s" for k, v in meta["stages_s"].items())
        + f"){' — fine-tuned model from the cache' if meta['finetune_cached'] else ''}  ",
        f"Peak memory (RSS): {meta['peak_rss_gb']:.2f} GB",
    ]


def _findings_table(verdicts: Sequence[Mapping[str, Any]], scaled: bool) -> list[str]:
    lines = [
        "## Findings",
        "",
        "| # | the paper's finding | here | deciding numbers | rule |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        cells = [md(v["id"]), md(v["claim"]), f"**{md(v['verdict'])}**", md(v["numbers"]), md(v["rule"])]
        lines.append("| " + " | ".join(cells) + " |")
    scale = (
        "G-effects are compared on the common scale e/‖v‖ (each step's G-effect divided by the size ‖v‖ of its "
        "direction, so that objectives with gradients of different sizes compare); the per-objective table also "
        "gives the raw sums. "
        if scaled
        else ""
    )
    return lines + [
        "",
        f"Sign convention: a step −η·v changes R by ≈ −η·e; e < 0 on the forget set is unlearning, on the retain set "
        f"damage. {scale}κ = retention cost per unit of unlearning (κ_G = E_retain/E_unlearn from cumulative "
        "G-effects, κ_NLL = ΔNLL_retain/ΔNLL_forget measured); smaller is better.",
    ]


def _outcomes_table(meta: Mapping[str, Any], outcomes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    acc0 = meta["answer_accuracy_before"]
    first = next(iter(outcomes.values()))
    lines = [
        "## Per objective",
        "",
        f"Before unlearning: forget NLL {first['nll_before']['unlearn']:.3f}, retain NLL "
        f"{first['nll_before']['retain']:.3f}; answer accuracy (teacher-forced tokens) forget "
        f"{acc0['forget']['token']:.1%}, retain {acc0['retain']['token']:.1%} (fine-tuned set: "
        f"{meta['answer_accuracy_finetuned']['token']:.1%}).",
        "",
        "| objective | forget NLL after | retain NLL after | forget acc after | retain acc after | E_unlearn | "
        "E_retain | Σ e/‖v‖ unlearn | Σ e/‖v‖ retain | Ē_unlearn (smoothed) | Ē_retain (smoothed) | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for n, o in outcomes.items():
        e = o.get("cumulative", {})
        unit = [_fmt(nan if e.get(f"{r}_per_unit") is None else e[f"{r}_per_unit"]) for r in ("unlearn", "retain")]
        lines.append(
            f"| {md(n)} | {o['nll_after']['unlearn']:.3f} | {o['nll_after']['retain']:.3f} | "
            f"{o['acc_after']['forget']['token']:.1%} | {o['acc_after']['retain']['token']:.1%} | "
            f"{_fmt(e.get('unlearn', nan))} | {_fmt(e.get('retain', nan))} | {unit[0]} | {unit[1]} | "
            f"{_fmt(e.get('smoothed_unlearn', nan))} | {_fmt(e.get('smoothed_retain', nan))} | "
            f"{o['seconds']:.0f} |"
        )
    return lines


def _cost_lines(cost: Mapping[str, Any] | None) -> list[str]:
    if not cost:
        return []
    return [
        "",
        "## What the smoothed G-effect costs",
        "",
        f"Tracking one step of {md(cost['objective'])} (median over the steps timed): unsmoothed "
        f"(the tap pass, `smooth=False`) {cost['unsmoothed_s_per_step']:.1f} s, smoothed "
        f"(`smooth=True`: one ordinary backward per probe set for ∇R, the unsmoothed values taken from it) "
        f"{cost['smoothed_s_per_step']:.1f} s; the smoothed state ḡ_R (2 probe sets) + ḡ_u (1 direction) holds "
        f"{cost['state_gb']:.2f} GB = 3 × {cost['parameters'] / 1e6:.1f}M parameters × 4 bytes, plus one transient "
        "∇R while it is formed.",
    ]


def findings_markdown(
    meta: Mapping[str, Any],
    verdicts: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, Mapping[str, Any]],
    cfg: ReproConfig,
    images: Sequence[tuple[str, str]],
) -> str:
    lines = [*_header(meta), "", *_findings_table(verdicts, bool(meta.get("common_scale"))), ""]
    lines += _outcomes_table(meta, outcomes)
    lines += _cost_lines(meta.get("smoothing_cost"))
    lines += ["", "## Protocol: ours beside the official", "", "| | here | official |", "|---|---|---|"]
    lines += _protocol_rows(meta, cfg)
    lines += [""]
    for name, caption in images:
        lines += [f"![{md(caption)}]({name})", "", f"*{md(caption)}*", ""]
    return "\n".join(lines)
