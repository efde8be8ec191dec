"""``geffect-fast demo``: the paper's story on a laptop, offline.

1. A seeded synthetic set of fictitious authors (TOFU-style QA) and a byte-level BPE tokenizer trained on it.
2. A small Llama fine-tuned from scratch until it knows the answers (teacher-forced answer accuracy is
   reported). The fine-tuned model is cached (``$GEFFECT_FAST_CACHE``, default ``~/.cache/geffect_fast``),
   so a second run skips this stage.
3. From that checkpoint, each objective (GA, NPO, WGA, TNPO, WTNPO, RMU, IdkPO by default) unlearns forget05
   for a few AdamW steps while a tracker records, at every step, the unlearning and retaining G-effects of
   the objective's gradient per layer group (and per instance), with the forget and retain NLL.
4. The run folder: geffects.jsonl, summary.csv, PNG plots, report.md and a self-contained report.html.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import data, objectives
from . import catalog, pipeline, report
from .common import ThreadBudget, atomic_output, cache_dir, cpu_kind, cpu_name, save_cached, threads_for_load
from .text import md_unescape


@dataclass
class DemoConfig:
    n_authors: int = 100
    qa_per_author: int = 10
    forget_split: str = "forget05"
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    vocab: int = 1024
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    # unlearning
    objectives: tuple[str, ...] = catalog.DEMO
    steps: int = 12
    unlearn_lr: float = 3e-4
    unlearn_batch: int = 16
    retain_probe: int = 50
    rmu_layer: int = 2
    #: layer groups of the report: "block" (each block), "thirds" (the paper's shallow/middle/deep), ...
    groups: str = "block"
    extra: dict = field(default_factory=dict)

    def finetune_key(self) -> str:
        keys = (
            "n_authors",
            "qa_per_author",
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "vocab",
            "epochs",
            "lr",
            "batch_size",
            "seed",
        )
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: a configuration that runs in seconds (tests, smoke checks)
QUICK = DemoConfig(
    n_authors=20,
    qa_per_author=5,
    hidden=32,
    layers=2,
    heads=4,
    intermediate=64,
    vocab=512,
    epochs=3,
    objectives=catalog.DEMO_QUICK,
    steps=3,
    retain_probe=10,
    rmu_layer=1,
)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _model(cfg: DemoConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(mc)


def finetuned(cfg: DemoConfig, echo: Callable[[str], None] = print, threads: ThreadBudget | None = None):
    """(model, tokenizer, splits, accuracy, cached) — loaded from the cache when it holds this config.
    ``threads`` is re-sized to the free cores after every fine-tuning epoch."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only
    splits = data.synthetic_authors(cfg.n_authors, cfg.qa_per_author, cfg.seed)
    path = cache_dir() / f"demo-{cfg.finetune_key()}"
    full = None
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        echo(f"loaded the fine-tuned model from the cache ({path})")
        cached = True
    else:
        tok = data.build_tokenizer(vocab_size=cfg.vocab)
        model = _model(cfg, tok)
        full = data.encode_qa(splits["full"], tok)
        n = sum(p.numel() for p in model.parameters())
        echo(
            f"fine-tuning a {n / 1e6:.2f}M-parameter Llama on {len(splits['full'])} QA about {cfg.n_authors} "
            f"fictitious authors ({cfg.epochs} epochs; cached afterwards)"
        )
        bar = _progress(cfg.epochs, "fine-tune")

        def tick(ep, total, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if threads is not None:
                threads.adjust()

        pipeline.finetune(model, full, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, progress=tick)
        bar.close()
        save_cached(model, tok, path)
        cached = False
    if full is None:
        full = data.encode_qa(splits["full"], tok)
    acc = pipeline.answer_accuracy(model, full)
    echo(f"answer accuracy (teacher-forced): tokens {acc['token']:.1%}, whole answers {acc['exact']:.1%}")
    return model, tok, splits, acc, cached


def most_harmful(model, forget, retain, forget_recs, n: int = 5) -> list[dict]:
    """Up to ``n`` forget samples whose gradient-ascent step raises the retain NLL: negative column sums of the
    pairwise G-effect matrix E[i, j] = ⟨∇ℓ_i(retain), ∇ℓ^GA_j(forget)⟩, most negative first."""
    from ..pairwise import measure_pairwise

    res = measure_pairwise(model, objectives.get("ga"), forget, {"retain": retain})
    return [
        {"question": forget_recs[j]["question"], "answer": forget_recs[j]["answer"], "retain_g_effect": v}
        for j, v in res.most_harmful("retain", n)
    ]


def npo_scatter(model, npo, forget, ref, records) -> dict:
    """NPO's per-sample weights w_j (after unlearning) beside each forget sample's own unlearning G-effect at the
    last tracked step (summed over groups): the paper's Fig. 5 view of which samples NPO turns down."""
    w = npo.weights(model, forget, ref).tolist()
    last = max((r for r in records if r["risk"] == "unlearn"), key=lambda r: r["step"])
    e = [sum(x for x in row if x is not None) for row in last["per_instance"]]
    return {"weights": w, "geffect": e, "step": last["step"]}


def _demo_objective(cfg: DemoConfig, name: str):
    base = name.partition("+")[0].strip().lower()
    return objectives.resolve(name, layer=cfg.rmu_layer) if base == "rmu" else objectives.resolve(name)


def unlearn_each(cfg: DemoConfig, model, ref, sets: dict, threads: ThreadBudget, echo) -> tuple[list, dict | None]:
    """Each objective of ``cfg`` unlearns its own copy of ``model`` for ``cfg.steps`` steps (G-effects of every
    step, per group and per instance); returns the records and NPO's weights-vs-G-effect scatter (None without
    NPO)."""
    records, scatter = [], None
    for name in cfg.objectives:
        shown = catalog.display(name)
        obj = _demo_objective(cfg, name)
        m = copy.deepcopy(model)
        threads.adjust()
        bar = _progress(cfg.steps, f"unlearn {shown}")
        tr = pipeline.unlearn(
            m,
            obj,
            sets["forget"],
            sets["retain"],
            cfg.steps,
            cfg.unlearn_lr,
            ref_model=ref,
            idk=sets["idk"],
            batch_size=cfg.unlearn_batch,
            seed=cfg.seed,
            progress=lambda s, n, bar=bar: bar.update(1),
            direction="gradient",
            per_instance=True,
            name=shown,
            groups=cfg.groups,
        )
        bar.close()
        records += tr.records
        if shown == "NPO":
            scatter = npo_scatter(m, obj, sets["forget"], ref, tr.records)
        last = {r["risk"]: r for r in tr.records if r["step"] == cfg.steps}
        echo(
            f"{shown:<6} cumulative G-effect: unlearning {tr.cumulative[(shown, 'unlearn')]:+.3e}, "
            f"retaining {tr.cumulative[(shown, 'retain')]:+.3e}; forget NLL "
            f"{last['unlearn']['loss'] + last['unlearn']['measured_dR']:.3f}, retain NLL "
            f"{last['retain']['loss'] + last['retain']['measured_dR']:.3f}"
        )
    return records, scatter


def _meta(cfg: DemoConfig, tok, sets: dict, acc: dict, cached: bool, threads: ThreadBudget, load: float) -> dict:
    """The run's meta.json (what the report's setup section says)."""
    return {
        "model": f"Llama {cfg.layers}x{cfg.hidden} from scratch, vocab {len(tok)} "
        f"(fine-tuned {'earlier, cached' if cached else 'now'})",
        "data": f"synthetic authors: {cfg.n_authors} x {cfg.qa_per_author} QA; {cfg.forget_split} "
        f"({len(sets['forget_recs'])} QA) forgotten, {len(sets['retain_recs'])} retain QA as probe",
        "objectives": ", ".join(catalog.display(o) for o in cfg.objectives),
        "steps": cfg.steps,
        "lr": cfg.unlearn_lr,
        "direction": "gradient of the objective (the paper's G-effect)",
        "groups": cfg.groups,
        "answer_accuracy": f"tokens {acc['token']:.1%}, whole answers {acc['exact']:.1%}",
        "machine": f"{cpu_name()} ({platform.machine()}, {cpu_kind()} kernels), {os.cpu_count()} cores "
        f"({threads.n} torch thread"
        f"{'s' * (threads.n != 1)} at the end; 1-minute load average {load:.1f} at the start), "
        f"torch {torch.__version__}",
        "config": asdict(cfg),
    }


def run_demo(
    out: str | Path,
    cfg: DemoConfig | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
    command: str = "",
) -> Path:
    """Run the demo into ``out`` (refused if it exists, unless ``force`` and it is empty or an earlier output of
    this tool); returns the folder. ``command``: the command line, for the folder's marker."""
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with atomic_output(out, force, command=command) as tmp, threads_for_load(echo) as threads:
        model, tok, splits, acc, cached = finetuned(cfg, echo, threads)
        forget_recs = splits[cfg.forget_split]
        retain_recs = splits[f"retain{100 - int(cfg.forget_split[-2:])}"][: cfg.retain_probe]
        sets = {
            "forget_recs": forget_recs,
            "retain_recs": retain_recs,
            "forget": data.encode_qa(forget_recs, tok),
            "retain": data.encode_qa(retain_recs, tok),
            "idk": data.encode_qa(data.idk_records(forget_recs), tok),
        }
        ref = pipeline.frozen_copy(model)
        harmful = most_harmful(model, sets["forget"], sets["retain"], forget_recs)
        echo(
            "forget samples whose GA gradient raises the retain NLL most (pairwise G-effects): "
            + "; ".join(f"{h['question']!r} ({h['retain_g_effect']:+.2e})" for h in harmful[:3])
            if harmful
            else "no forget sample's GA gradient raises the retain NLL (pairwise G-effects all >= 0)"
        )
        records, scatter = unlearn_each(cfg, model, ref, sets, threads, echo)
        with open(tmp / "geffects.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        meta = {**_meta(cfg, tok, sets, acc, cached, threads, load), "most_harmful": harmful}
        if scatter is not None:
            meta["npo_scatter"] = scatter
        meta["wall_time_s"] = round(time.perf_counter() - t0, 1)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        report.render(tmp)
    echo(
        f"wrote {out}/ (report.html, report.md, summary.csv, geffects.jsonl, plots) in {time.perf_counter() - t0:.0f}s"
    )
    for line in report.findings(records):
        echo("  - " + md_unescape(line.replace("**", "")))
    return Path(out)
