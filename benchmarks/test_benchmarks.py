"""pytest-benchmark entries: ``pytest benchmarks --benchmark-only`` (not part of the test suite).

Small Llama cases timed by pytest-benchmark with its own statistics; the side-by-side suite with peers,
memory and agreement is ``python -m benchmarks.run``.
"""

import pytest
import torch

from benchmarks import methods as M
from benchmarks.run import build

torch.set_num_threads(2)
CASES = {"llama-tiny B4 T32": ("llama-tiny", 4, 32), "llama-10M B4 T64": ("llama-10M", 4, 64)}
METHODS = [
    "ours[auto]",
    "ours[reference]",
    "ours[native]",
    "plain_fwd_bwd",
    "per_sample_loop",
    "torch.func_vmap",
    "opacus",
]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    model, batch, query, V = build(*CASES[name])
    return name, model, batch, V, M.group_of(model)


@pytest.mark.parametrize("method", METHODS)
def test_method(benchmark, case, method):
    name, model, batch, V, grouping = case
    try:
        run = M.METHODS[method](model, batch, V, grouping)
    except M.Unsupported as e:
        pytest.skip(str(e))
    benchmark.group = name
    benchmark.extra_info["method"] = method
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
