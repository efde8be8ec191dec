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
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import data, objectives
from . import pipeline, report
from .common import atomic_output, cache_dir, load_model, peak_rss_gb, save_cached

#: the ten objectives of the paper's protocol, as named in the records
OBJECTIVES: dict[str, Callable[[Any], objectives.Objective]] = {
    "GA": lambda cfg: objectives.get("ga"),
    "GD": lambda cfg: objectives.get("gd"),
    "GA+KL": lambda cfg: objectives.get("ga", retain="kl"),
    "NPO": lambda cfg: objectives.get("npo"),
    "NPO+KL": lambda cfg: objectives.get("npo", retain="kl"),
    "WGA": lambda cfg: objectives.get("wga"),
    "TNPO": lambda cfg: objectives.get("tnpo"),
    "WTNPO": lambda cfg: objectives.get("wtnpo"),
    "RMU": lambda cfg: objectives.get("rmu", layer=cfg.rmu_layer),
    "IdkPO": lambda cfg: objectives.get("idkpo"),
}
DEPTHS = ("shallow", "middle", "deep")
WEIGHTED = ("NPO", "WGA", "TNPO", "WTNPO")

#: ours beside the official protocol (forget2.py, config/forget.yaml, data_module*.py, dataloader_ge.py)
PROTOCOL: list[tuple[str, str, str]] = [
    ("model", "{model_name} ({blocks} blocks, float32)", "Llama-2-7B-chat, Phi-1.5"),
    ("data", "synthetic fictitious authors, {n_authors} × {qa_per_author} QA", "TOFU, 200 authors × 20 QA"),
    ("fine-tune", "AdamW lr {ft_lr}, {ft_epochs} epochs, batch {ft_batch}", "AdamW lr 1e-5, 5 epochs, batch 16"),
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
    ("prompt", "llama2 format, truncation at the end, padding to the longest", "same format, padded to 500"),
    ("objectives", "official defaults (objectives.py table); RMU on hidden state {rmu_layer}", "same; rmu_<layer>"),
    (
        "G-effects",
        "every step, at θ before it; unsmoothed and smoothed (ḡ ← 0.6ḡ + 0.4g over steps)",
        "smoothed over the mini-batches of one pass at each saved checkpoint (every 5 steps)",
    ),
    ("groups", "thirds: embed/shallow/middle/deep(/lm) (blocks 0–9/10–19/20–29 of 30)", "embed/0–9/10–19/≥20/lm"),
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
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
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
        cfg = replace(cfg, objectives=("GA", "GD", "NPO", "RMU"), retain_probe=5, probe_batch=5, batch_size=5)
        if model == "demo":
            cfg = replace(cfg, rmu_layer=1)
    return cfg


# -- stages --------------------------------------------------------------------------------------------------------
def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _smollm2_finetuned(cfg: ReproConfig, splits, echo) -> tuple[Any, Any, dict[str, float], bool]:
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

    pipeline.finetune(model, full, cfg.ft_epochs, cfg.ft_lr, cfg.ft_batch, cfg.seed, on_batch=tick)
    bar.close()
    # the GGUF weights were de-quantised to float32 at load: plain weights, so the quantizer's refusal to save
    # does not apply
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_cached(model, tok, path)
    return model, tok, pipeline.answer_accuracy(model, full), False


def _load(cfg: ReproConfig, echo):
    if cfg.model == "demo":
        from .demo import QUICK, DemoConfig, finetuned

        dcfg = QUICK if cfg.quick else DemoConfig()
        model, tok, splits, acc, cached = finetuned(dcfg, echo)
        return model, tok, splits, acc, cached
    splits = data.synthetic_authors(cfg.n_authors, cfg.qa_per_author, cfg.seed)
    model, tok, acc, cached = _smollm2_finetuned(cfg, splits, echo)
    return model, tok, splits, acc, cached


@torch.no_grad()
def _nll(model, batch) -> float:
    from ..loss import risk

    was = model.training
    model.eval()
    try:
        return float(risk(model, batch))
    finally:
        model.train(was)


def run(out: str | Path, cfg: ReproConfig | None = None, force: bool = False, command: str = "", echo=print) -> Path:
    """Run the protocol into ``out`` (refused if it exists, unless ``force``); returns the folder."""

    cfg = cfg or config()
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    stages: dict[str, float] = {}
    with atomic_output(out, force) as tmp:
        model, tok, splits, ft_acc, cached = _load(cfg, echo)
        stages["load + fine-tune"] = time.perf_counter() - t0
        echo(f"answer accuracy after fine-tuning (teacher-forced): tokens {ft_acc['token']:.1%}")
        forget_recs = splits["forget05"]
        retain_all = splits["retain95"]
        probe_recs, retain_recs = retain_all[: cfg.retain_probe], retain_all[cfg.retain_probe :]

        def enc(recs):
            return data.encode_qa(recs, tok, prompt=cfg.prompt, max_length=cfg.max_length)

        forget, retain, probe = enc(forget_recs), enc(retain_recs), enc(probe_recs)
        idk = enc(data.idk_records(forget_recs))
        probes = {"unlearn": forget, "retain": probe}
        ref = pipeline.frozen_copy(model, inplace=True)
        del model
        acc0 = {"forget": pipeline.answer_accuracy(ref, forget), "retain": pipeline.answer_accuracy(ref, probe)}
        records: list[dict[str, Any]] = []
        outcomes: dict[str, dict[str, Any]] = {}
        tracking_s: dict[str, list[float]] = {}
        state_bytes = 0
        # R after each step is the next step's R before it: no separate forward for the measured change
        track = dict(groups="thirds", direction="gradient", probe_batch_size=cfg.probe_batch, measure_change=False)

        def unlearned(name: str, steps: int, smooth: bool, progress=None):
            """A trainable copy of the reference unlearned by ``name`` for ``steps`` steps, and its tracker."""
            m = pipeline.trainable_copy(ref)
            tr = pipeline.unlearn(
                m,
                OBJECTIVES[name](cfg),
                forget,
                retain,
                steps,
                cfg.lr,
                ref_model=ref,
                idk=idk,
                probes=probes,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                progress=progress,
                name=name,
                smooth=smooth,
                **track,
            )
            return m, tr

        for name in cfg.objectives:
            bar = _bar(cfg.steps, f"unlearn {name}")
            t1 = time.perf_counter()
            m, tr = unlearned(name, cfg.steps, True, progress=lambda s, n, bar=bar: bar.update(1))
            bar.close()
            stages[f"unlearn {name}"] = time.perf_counter() - t1
            tracking_s[name] = list(tr.step_seconds)
            state_bytes = max(state_bytes, tr.smoothed_state_bytes)
            records += tr.records
            series = {r: [x for x in tr.records if x["risk"] == r] for r in ("unlearn", "retain")}
            final = {"unlearn": _nll(m, forget), "retain": _nll(m, probe)}
            outcomes[name] = {
                "cumulative": {
                    **{r: sum(x["total"] for x in series[r]) for r in series},
                    **{f"smoothed_{r}": sum(x["smoothed_total"] for x in series[r]) for r in series},
                },
                "nll_before": {r: series[r][0]["loss"] for r in series},
                "nll_after": final,
                #: NLL at θ_0 … θ_steps: R before each step, then after the last
                "nll_curve": {r: [x["loss"] for x in series[r]] + [final[r]] for r in series},
                "acc_after": {
                    "forget": pipeline.answer_accuracy(m, forget),
                    "retain": pipeline.answer_accuracy(m, probe),
                },
                "seconds": round(stages[f"unlearn {name}"], 1),
            }
            o = outcomes[name]
            echo(
                f"{name:<7} forget NLL {o['nll_before']['unlearn']:.3f} -> {o['nll_after']['unlearn']:.3f}, retain NLL "
                f"{o['nll_before']['retain']:.3f} -> {o['nll_after']['retain']:.3f}; answer accuracy forget "
                f"{o['acc_after']['forget']['token']:.0%}, retain {o['acc_after']['retain']['token']:.0%} "
                f"({o['seconds']:.0f}s)"
            )
            del m, tr
            gc.collect()
        # the cost of the smoothed pass: the same objective's first steps, tracked without smoothing
        cost = None
        if cfg.cost_steps > 0:
            name = cfg.objectives[0]
            m, tr = unlearned(name, cfg.cost_steps, False)
            unsmoothed_s = list(tr.step_seconds)
            del m, tr
            gc.collect()
            n_params = sum(p.numel() for p in ref.parameters())
            cost = {
                "objective": name,
                "unsmoothed_s_per_step": statistics.median(unsmoothed_s),
                "smoothed_s_per_step": statistics.median(tracking_s[name][: cfg.cost_steps]),
                "state_gb": state_bytes / 2**30,
                "parameters": n_params,
                "per_instance": False,
            }
        verdicts = findings(records, outcomes)
        wall = time.perf_counter() - t0
        meta = {
            "command": command or "geffect-fast reproduce",
            "model": "SmolLM2-135M-Instruct (GGUF de-quantised)" if cfg.model == "smollm2" else "the demo's Llama",
            "blocks": _n_blocks(ref),
            "machine": _machine(),
            "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "finetune_cached": cached,
            "answer_accuracy_finetuned": ft_acc,
            "answer_accuracy_before": acc0,
            "config": asdict(cfg),
            "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "wall_time_s": round(wall, 1),
            "peak_rss_gb": round(peak_rss_gb(), 2),
            "smoothing_cost": cost,
            "outcomes": outcomes,
            "findings": verdicts,
            "objectives": ", ".join(cfg.objectives),
            "steps": cfg.steps,
            "lr": cfg.lr,
            "direction": "gradient of the objective (the paper's G-effect), unsmoothed and smoothed",
            "groups": "thirds",
            "data": f"synthetic authors: {cfg.n_authors} × {cfg.qa_per_author} QA; forget05 ({len(forget_recs)} QA); "
            f"{len(probe_recs)} held-out retain QA as the retaining probe",
        }
        with open(tmp / "geffects.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        images = findings_plots(records, outcomes, tmp)
        (tmp / "findings.md").write_text(findings_markdown(meta, verdicts, outcomes, cfg, images))
        report.render(tmp)
    echo(f"wrote {out}/findings.md in {time.perf_counter() - t0:.0f}s (peak RSS {peak_rss_gb():.2f} GB)")
    for v in verdicts:
        echo(f"  ({v['id']}) {v['claim']}: {v['verdict']} — {v['numbers']}")
    return Path(out)


def _n_blocks(model) -> int:
    from ..groups import find_layout

    return find_layout(model).n_blocks


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover - not Linux
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


# -- the findings --------------------------------------------------------------------------------------------------
def _series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Mapping[str, Any]]]]:
    out: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in records:
        if r.get("kind", "gradient") == "compare":
            continue
        out.setdefault(r["objective"], {}).setdefault(r["risk"], []).append(r)
    for by in out.values():
        for lst in by.values():
            lst.sort(key=lambda r: r["step"])
    return out


def _verdict(n_holds: int, n: int) -> str:
    """Reproduced when the claim holds in every case, not reproduced in none, mixed otherwise."""
    return "reproduced" if n_holds == n else "not reproduced" if n_holds == 0 else "mixed"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x == x else "n/a"


def findings(records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's five findings, each decided from the run: ``reproduced`` when the stated test holds in every
    case, ``not reproduced`` in none, ``mixed`` otherwise; with the numbers that decide it and the rule.

    e_t: a step's unsmoothed G-effect (total or per group), ē_t the smoothed one; E = Σ_t e_t the cumulative one;
    ΔNLL = NLL after − before. Retention cost per unit of unlearning: κ_G = E_retain / E_unlearn (G-effects; both
    negative when the objective unlearns and harms) and κ_NLL = ΔNLL_retain / ΔNLL_forget (measured); smaller is
    better, and an objective that does not raise the forget NLL has no finite κ_NLL (counted as not better).
    """
    S = _series(records)
    names = [n for n in outcomes if n in S]
    out: list[dict[str, Any]] = []

    def mag(lst, g, smoothed=False):
        key = "smoothed_groups" if smoothed else "groups"
        return sum(abs(r[key].get(g, 0.0)) for r in lst if r.get(key) is not None)

    # (1) shallow layers are affected most: Σ_t |e_t,g| on the forget set is largest for g = shallow
    cands = [n for n in names if n != "RMU"]
    rows, holds, holds_s = [], 0, 0
    for n in cands:
        lst = S[n]["unlearn"]
        m = {g: mag(lst, g) for g in DEPTHS}
        ms = {g: mag(lst, g, True) for g in DEPTHS}
        top, top_s = max(m, key=m.get), max(ms, key=ms.get)
        holds += top == "shallow"
        holds_s += top_s == "shallow"
        rows.append(f"{n} {top} ({'/'.join(_fmt(m[g]) for g in DEPTHS)})")
    out.append(
        {
            "id": 1,
            "claim": "unlearning affects shallow layers most",
            "verdict": _verdict(holds, len(cands)),
            "numbers": f"shallow largest for {holds}/{len(cands)} objectives (smoothed: {holds_s}/{len(cands)}); "
            "largest group (Σ|e| shallow/middle/deep): " + "; ".join(rows),
            "rule": "Σ_t |e_t,g| of the unlearning G-effect is largest in the shallow third, per objective (RMU, whose "
            "target sits at a fixed depth, excluded); reproduced if for all",
        }
    )

    # (2) every objective compromises retention: E_retain < 0 and the retain NLL rises
    rows, holds = [], 0
    for n in names:
        E = sum(r["total"] for r in S[n]["retain"])
        d = outcomes[n]["nll_after"]["retain"] - outcomes[n]["nll_before"]["retain"]
        ok = E < 0 and d > 0
        holds += ok
        rows.append(f"{n} E {_fmt(E)}, ΔNLL {d:+.3f}")
    out.append(
        {
            "id": 2,
            "claim": "every objective compromises retention",
            "verdict": _verdict(holds, len(names)),
            "numbers": f"{holds}/{len(names)} objectives with E_retain < 0 and a rising retain NLL: " + "; ".join(rows),
            "rule": "cumulative retaining G-effect E_retain < 0 and measured retain ΔNLL > 0, for every objective",
        }
    )

    # (3) excessive unlearning is harmful: GA's damage to retention per step grows as unlearning goes on
    def late_early(n):
        ret = S[n]["retain"]
        k = max(1, len(ret) // 3)
        g_early = statistics.fmean(abs(r["total"]) for r in ret[:k])
        g_late = statistics.fmean(abs(r["total"]) for r in ret[-k:])
        curve = outcomes[n]["nll_curve"]["retain"]
        d = [b - a for a, b in zip(curve, curve[1:])]  # the retain NLL's change at each step
        d_early, d_late = statistics.fmean(d[:k]), statistics.fmean(d[-k:])
        return g_late / g_early if g_early else float("nan"), (d_late / d_early if d_early > 0 else float("nan"))

    rows = []
    for n in names:
        rg, rd = late_early(n)
        rows.append(f"{n} {_fmt(rg)}/{_fmt(rd)}")
    ga = late_early("GA") if "GA" in S else (float("nan"), float("nan"))
    checks = [ga[0] > 1, ga[1] > 1]
    out.append(
        {
            "id": 3,
            "claim": "excessive unlearning is harmful",
            "verdict": _verdict(sum(checks), 2) if "GA" in S else "not tested",
            "numbers": f"GA: late/early |e_retain| {_fmt(ga[0])}, late/early retain ΔNLL per step {_fmt(ga[1])}"
            + (
                f" (forget accuracy after: {outcomes['GA']['acc_after']['forget']['token']:.0%})"
                if "GA" in outcomes
                else ""
            )
            + "; all (G/NLL): "
            + "; ".join(rows),
            "rule": "for GA, the mean per-step |retaining G-effect| and the per-step rise of the retain NLL are larger "
            "in the last third of the steps than in the first (both > 1: reproduced)",
        }
    )

    # (4) risk weighting helps: κ of NPO/WGA/TNPO/WTNPO below GA's, in G-effects and in NLL
    def kappa(n):
        Eu = sum(r["total"] for r in S[n]["unlearn"])
        Er = sum(r["total"] for r in S[n]["retain"])
        o = outcomes[n]
        df = o["nll_after"]["unlearn"] - o["nll_before"]["unlearn"]
        dr = o["nll_after"]["retain"] - o["nll_before"]["retain"]
        return (Er / Eu if Eu < 0 else float("nan")), (dr / df if df > 0 else float("nan"))

    def better(a, b):  # a's κ below b's (a NaN — no unlearning — is never better)
        return a == a and (b != b or a < b)

    if "GA" in S:
        kg = kappa("GA")
        ws = [w for w in WEIGHTED if w in S]
        rows, n_ok = [], 0
        for w in ws:
            k = kappa(w)
            ok = better(k[0], kg[0]) and better(k[1], kg[1])
            n_ok += ok
            rows.append(f"{w} {_fmt(k[0])}/{_fmt(k[1])}")
        out.append(
            {
                "id": 4,
                "claim": "risk weighting (NPO/WGA/TNPO/WTNPO) helps",
                "verdict": _verdict(n_ok, len(ws)) if ws else "not tested",
                "numbers": f"κ_G/κ_NLL: GA {_fmt(kg[0])}/{_fmt(kg[1])}; "
                + "; ".join(rows)
                + f" — {n_ok}/{len(ws)} below GA in both",
                "rule": "retention cost per unit of unlearning κ (G-effects and NLL) below GA's in both, per weighted "
                "objective; reproduced if for all",
            }
        )

    # (5) regularisation matters, KL better than GD for retention
    wanted = (("GD", "GA"), ("GA+KL", "GA"), ("NPO+KL", "NPO"), ("GA+KL", "GD"))
    pairs = [(a, b) for a, b in wanted if a in S and b in S]
    if pairs:
        rows, n_ok = [], 0
        for a, b in pairs:
            ka, kb = kappa(a), kappa(b)
            ok = better(ka[0], kb[0]) and better(ka[1], kb[1])
            n_ok += ok
            rows.append(f"{a} {_fmt(ka[0])}/{_fmt(ka[1])} vs {b} {_fmt(kb[0])}/{_fmt(kb[1])}: {'yes' if ok else 'no'}")
        out.append(
            {
                "id": 5,
                "claim": "regularisation matters; KL retains better than GD",
                "verdict": _verdict(n_ok, len(pairs)),
                "numbers": "κ_G/κ_NLL: " + "; ".join(rows),
                "rule": "κ (G-effects and NLL) of the regularised objective below the unregularised one's (GD and "
                "GA+KL vs GA, NPO+KL vs NPO) and of GA+KL below GD's; reproduced if every comparison holds",
            }
        )
    return out


# -- output --------------------------------------------------------------------------------------------------------
def findings_plots(
    records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Mapping[str, Any]], out: Path
) -> list[tuple[str, str]]:
    """PNG figures for the findings; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = _series(records)
    names = [n for n in outcomes if n in S]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    images = []

    # 1: Σ_t |e_t,g| per depth, per objective (unlearning and retaining)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(DEPTHS)
    for ax, risk in zip(axes, ("unlearn", "retain")):
        for j, g in enumerate(DEPTHS):
            vals = [sum(abs(r["groups"].get(g, 0.0)) for r in S[n][risk]) for n in names]
            ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=g)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"Σ over steps of |{report.TITLES[risk]}| per depth")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "findings_depth.png", dpi=110)
    plt.close(fig)
    images.append(("findings_depth.png", "Finding 1: G-effect magnitude per depth third, summed over the steps."))

    # 2: unsmoothed and smoothed totals per step
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for i, risk in enumerate(("unlearn", "retain")):
        for j, key in enumerate(("total", "smoothed_total")):
            ax = axes[i][j]
            for n in names:
                lst = S[n][risk]
                ax.plot([r["step"] for r in lst], [r.get(key) for r in lst], marker="o", ms=3, label=n, c=colors[n])
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.axhline(0, c="k", lw=0.5)
            ax.set_title(f"{report.TITLES[risk]}, {'unsmoothed' if key == 'total' else 'smoothed (0.6/0.4)'}")
            ax.set_xlabel("unlearning step")
    axes[0][0].legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "findings_geffects.png", dpi=110)
    plt.close(fig)
    images.append(("findings_geffects.png", "G-effects per step: unsmoothed (left), official smoothing (right)."))

    # 3: NLL curves
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, risk in zip(axes, ("unlearn", "retain")):
        for n in names:
            ys = outcomes[n]["nll_curve"][risk]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=n, c=colors[n])
        ax.set_title(f"{'forget' if risk == 'unlearn' else 'held-out retain'} NLL")
        ax.set_xlabel("unlearning step")
        ax.set_yscale("log")
    axes[0].legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "findings_nll.png", dpi=110)
    plt.close(fig)
    images.append(("findings_nll.png", "Finding 3: forget and retain NLL along the run."))

    # 4: trade-off
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for n in names:
        o = outcomes[n]
        df = o["nll_after"]["unlearn"] - o["nll_before"]["unlearn"]
        dr = o["nll_after"]["retain"] - o["nll_before"]["retain"]
        ax.scatter(df, dr, c=[colors[n]], s=40)
        ax.annotate(n, (df, dr), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("forget NLL rise (unlearning)")
    ax.set_ylabel("retain NLL rise (damage)")
    ax.set_title("the trade-off after the run (lower right is better)")
    fig.tight_layout()
    fig.savefig(out / "findings_tradeoff.png", dpi=110)
    plt.close(fig)
    images.append(("findings_tradeoff.png", "Findings 2, 4, 5: what each objective unlearned against what it cost."))
    return images


def findings_markdown(
    meta: Mapping[str, Any],
    verdicts: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, Mapping[str, Any]],
    cfg: ReproConfig,
    images: Sequence[tuple[str, str]],
) -> str:
    fmt = {
        **asdict(cfg),
        "n_forget": round(cfg.n_authors * cfg.qa_per_author * 0.05),
        "model_name": meta["model"],
        "blocks": meta["blocks"],
    }
    lines = [
        f"# The paper's five findings on {meta['model']} ({meta['blocks']} blocks)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; load average {meta['load_average_start']} at the start, "
        f"{meta['load_average_end']} at the end (a shared machine when above the core count)  ",
        f"Wall time: {meta['wall_time_s'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f}s" for k, v in meta["stages_s"].items())
        + f"){' — fine-tuned model from the cache' if meta['finetune_cached'] else ''}  ",
        f"Peak memory (RSS): {meta['peak_rss_gb']:.2f} GB",
        "",
        "## Findings",
        "",
        "| # | the paper's finding | here | deciding numbers | rule |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        cells = [str(v["id"]), v["claim"], f"**{v['verdict']}**", v["numbers"], v["rule"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    acc0 = meta["answer_accuracy_before"]
    lines += [
        "",
        "Sign convention: a step −η·v changes R by ≈ −η·e; e < 0 on the forget set is unlearning, on the retain set "
        "damage. κ = retention cost per unit of unlearning (κ_G = E_retain/E_unlearn from cumulative G-effects, "
        "κ_NLL = ΔNLL_retain/ΔNLL_forget measured); smaller is better.",
        "",
        "## Per objective",
        "",
        f"Before unlearning: forget NLL {next(iter(outcomes.values()))['nll_before']['unlearn']:.3f}, retain NLL "
        f"{next(iter(outcomes.values()))['nll_before']['retain']:.3f}; answer accuracy (teacher-forced tokens) forget "
        f"{acc0['forget']['token']:.1%}, retain {acc0['retain']['token']:.1%} (fine-tuned set: "
        f"{meta['answer_accuracy_finetuned']['token']:.1%}).",
        "",
        "| objective | forget NLL after | retain NLL after | forget acc after | retain acc after | E_unlearn | "
        "E_retain | Ē_unlearn (smoothed) | Ē_retain (smoothed) | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, o in outcomes.items():
        e = o.get("cumulative", {})
        lines.append(
            f"| {n} | {o['nll_after']['unlearn']:.3f} | {o['nll_after']['retain']:.3f} | "
            f"{o['acc_after']['forget']['token']:.1%} | {o['acc_after']['retain']['token']:.1%} | "
            f"{_fmt(e.get('unlearn', float('nan')))} | {_fmt(e.get('retain', float('nan')))} | "
            f"{_fmt(e.get('smoothed_unlearn', float('nan')))} | {_fmt(e.get('smoothed_retain', float('nan')))} | "
            f"{o['seconds']:.0f} |"
        )
    cost = meta.get("smoothing_cost")
    if cost:
        lines += [
            "",
            "## What the smoothed G-effect costs",
            "",
            f"Tracking one step of {cost['objective']} (median over the steps timed): unsmoothed "
            f"(the tap pass, `smooth=False`) {cost['unsmoothed_s_per_step']:.1f} s, smoothed "
            f"(`smooth=True`: one ordinary backward per probe set for ∇R, the unsmoothed values taken from it) "
            f"{cost['smoothed_s_per_step']:.1f} s; the smoothed state ḡ_R (2 probe sets) + ḡ_u (1 direction) holds "
            f"{cost['state_gb']:.2f} GB = 3 × {cost['parameters'] / 1e6:.1f}M parameters × 4 bytes, plus one transient "
            "∇R while it is formed.",
        ]
    lines += ["", "## Protocol: ours beside the official", "", "| | here | official |", "|---|---|---|"]
    for what, ours, official in PROTOCOL:
        lines.append(f"| {what} | {ours.format(**fmt)} | {official} |")
    lines += [""]
    for name, caption in images:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)
