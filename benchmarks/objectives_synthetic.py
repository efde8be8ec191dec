"""Per objective: signs of the unlearning and retaining G-effects on the synthetic author set after a few
unlearning steps, and how well the first- and second-order predictions match the measured risk change.

    python -m benchmarks.objectives_synthetic     # writes benchmarks/results/objectives_synthetic.md

A 4-block Llama (hidden 128) learns 400 QA about 40 fictitious authors; then, from that same checkpoint,
each objective unlearns forget05 (2 authors) for STEPS AdamW steps. The tracker follows the optimiser's
real update (direction="update", the "go beyond" G-effect) and, at the same θ, the objective's own
gradient (the paper's G-effect, "compare").
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

import geffect_fast as gf
from benchmarks._common import cpu_name
from geffect_fast import data, objectives
from geffect_fast.app import pipeline

STEPS = 8
LR = 3e-4
OBJECTIVES = ["ga", "gd", "npo", "simnpo", "wga", "tnpo", "wtnpo", "rmu", "idkpo"]


def main() -> int:
    torch.set_num_threads(2)
    tok = data.build_tokenizer()
    splits = data.synthetic_authors(n_authors=40, qa_per_author=10, seed=0)
    full = data.encode_qa(splits["full"], tok)
    forget = data.encode_qa(splits["forget05"], tok)
    retain = data.encode_qa(splits["retain95"][:40], tok)
    idk = data.encode_qa(data.idk_records(splits["forget05"]), tok)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    with pipeline.Timer() as t_ft:
        pipeline.finetune(base, full, epochs=25, lr=3e-3, batch_size=32)
    acc = pipeline.answer_accuracy(base, full)
    print(f"fine-tuned in {t_ft.seconds:.0f}s: answer token accuracy {acc['token']:.3f}, exact {acc['exact']:.3f}")
    ref = pipeline.frozen_copy(base)
    rows = []
    for name in OBJECTIVES:
        obj = objectives.get(name, layer=2) if name == "rmu" else objectives.get(name)
        model = copy.deepcopy(base)
        inputs = {"forget": forget, "retain": retain, "idk": idk}
        tr = pipeline.unlearn(
            model,
            obj,
            forget,
            retain,
            steps=STEPS,
            lr=LR,
            ref_model=ref,
            idk=idk,
            direction="update",
            curvature=True,
            compare={"gradient": obj},
            compare_batch=inputs,
        )
        upd = pipeline.signs(tr.records, "update")
        grad = pipeline.signs(tr.records, "gradient")
        fid = tr.fidelity()
        e1 = statistics.median(abs(f["predicted_dR"] - f["measured_dR"]) / abs(f["measured_dR"]) for f in fid)
        e2 = statistics.median(abs(f["predicted_dR_2nd"] - f["measured_dR"]) / abs(f["measured_dR"]) for f in fid)
        first = [r for r in tr.records if r["objective"] == "update" and r["step"] == 1]
        nll0 = {r["risk"]: r["loss"] for r in first}
        nll1 = {r: float(gf.risk(model, b)) for r, b in (("unlearn", forget), ("retain", retain))}
        rows.append((name, grad, upd, nll0, nll1, e1, e2))
        print(
            f"{name:<8} grad e: unlearn {grad['unlearn']:+.3e} retain {grad['retain']:+.3e} | update e: unlearn "
            f"{upd['unlearn']:+.3e} retain {upd['retain']:+.3e} | fidelity {e1:.1%} / {e2:.1%}",
            flush=True,
        )

    def fmt(x):
        return f"{'−' if x < 0 else '+'}{abs(x):.2e}"

    lines = [
        f"# Objectives on the synthetic author set (CPU: {cpu_name()}, torch {torch.__version__})",
        "",
        "Command: `python -m benchmarks.objectives_synthetic`. A 4-block Llama (hidden 128, byte-level BPE",
        f"vocabulary of {len(tok)}) fine-tuned on 400 QA about 40 fictitious authors (answer token accuracy",
        f"{acc['token']:.3f}, exact {acc['exact']:.3f}); then each objective unlearns forget05 for {STEPS} AdamW steps",
        f"at lr {LR}. G-effects are cumulative over the {STEPS} steps; 'gradient' is the paper's (the",
        "objective's own gradient), 'update' the optimiser's real step. Good unlearning: unlearning G-effect < 0;",
        "good retention: retaining G-effect ≥ 0. Fidelity: median over steps and probes of |predicted − measured ΔR| /",
        "|measured ΔR| at first and second order.",
        "",
        "| objective | gradient: unlearn | gradient: retain | update: unlearn | update: retain | forget NLL | "
        "retain NLL | fidelity 1st | fidelity 2nd |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for name, grad, upd, nll0, nll1, e1, e2 in rows:
        lines.append(
            f"| {name} | {fmt(grad['unlearn'])} | {fmt(grad['retain'])} | {fmt(upd['unlearn'])} | "
            f"{fmt(upd['retain'])} | "
            f"{nll0['unlearn']:.3f} → {nll1['unlearn']:.3f} | {nll0['retain']:.3f} → {nll1['retain']:.3f} | "
            f"{e1:.2%} | {e2:.2%} |"
        )
    out = Path(__file__).parent / "results" / "objectives_synthetic.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
