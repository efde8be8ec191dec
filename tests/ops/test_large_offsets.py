"""Tensors past 2^31 elements: every Triton kernel computes offsets in 64 bits (issue: an lm_head's g of
[N, 128k] passes 2^31 elements at N ≥ 16,745 tokens; a 128256 × 4096 table at K ≥ 5 directions).

The kernels run in a subprocess (tests/ops/large_offsets_worker.py): with 32-bit offsets they read far
outside their tensors, which crashes the process (seen: SIGSEGV under the interpreter) or returns garbage.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from geffect_fast.ops import dispatch

WORKER = Path(__file__).with_name("large_offsets_worker.py")


def test_triton_kernels_address_past_2_pow_31():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = dispatch.backends(dev)["triton"]["reason"]
    assert not why, why  # the test extras install triton; conftest turns the interpreter on without a GPU
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[2]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"worker died (rc {r.returncode}): {r.stderr[-2000:]}"
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errors) == 10, errors
    bad = {k: e for k, e in errors.items() if not e <= 2e-5}  # the same fp16 inputs, float32 sums
    assert not bad, bad
