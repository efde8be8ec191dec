"""torch.distributed: two CPU processes over gloo (geffect_fast/distributed.py; README "Several GPUs").

Each scenario runs in :mod:`dist_workers` on two spawned ranks holding uneven parts (3 and 2 rows) of one
union batch; the distributed result must equal one process measuring the union. A failing rank must make
every rank raise, and a missing one must not hang the others.
"""

from __future__ import annotations

import dist_workers as w
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ddp_equals_one_process_over_the_union(tmp_path, family):
    w.run_ranks(w.ddp_measure, str(tmp_path), family)


def test_ddp_tracker_equals_one_process(tmp_path):
    w.run_ranks(w.ddp_tracker, str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fsdp2_aggregate_and_per_instance(tmp_path, family):
    w.run_ranks(w.fsdp_measure, str(tmp_path), family)


def test_lora_under_ddp(tmp_path):
    pytest.importorskip("peft")
    w.run_ranks(w.lora_ddp, str(tmp_path))


def test_a_failing_rank_raises_on_every_rank(tmp_path):
    w.run_ranks(w.failures, str(tmp_path))


def test_a_failing_rank_under_fsdp2_stops_before_its_collectives(tmp_path):
    w.run_ranks(w.fsdp_failure, str(tmp_path))


def test_the_harness_reports_a_failing_rank(tmp_path):
    """run_ranks itself must fail when a rank fails (so the tests above cannot pass vacuously)."""
    with pytest.raises(AssertionError, match="rank 1"):
        w.run_ranks(w.fails_on_rank_1, str(tmp_path), timeout=60)
