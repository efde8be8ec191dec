"""Result: shapes with one and several directions, JSON export, the printed table."""

import json

import pytest
import torch
from helpers import make_batch, make_model, random_direction

import geffect_fast as gf


def test_single_direction_shapes_and_export():
    model = make_model("gpt_neox")
    V = {n: t[0] for n, t in random_direction(model).items()}
    res = gf.measure(
        model,
        gf.Direction(V, "npo"),
        {"unlearn": make_batch(model), "retain": make_batch(model, B=3, seed=4)},
        per_instance=True,
    )
    assert set(res.total) == {"unlearn", "retain"}
    assert list(res.by_group["retain"]) == list(res.groups)
    assert res.per_instance["unlearn"].shape == (4, len(res.groups))
    assert res.per_instance["retain"].shape == (3, len(res.groups))
    assert res.loss["retain"] > 0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["directions"] == ["npo"] and d["total"]["npo"]["unlearn"] == res.total["unlearn"]
    assert len(d["per_instance"]["npo"]["retain"]) == 3
    text = str(res)
    for g in res.groups:
        assert g in text
    assert "unlearn" in text and "retain" in text and "total" in text
    assert "Result(" in repr(res)


def test_several_directions_are_keyed_by_name_and_per_instance_needs_asking():
    model = make_model("llama")
    res = gf.measure(model, gf.Direction(random_direction(model, K=2), names=["ga", "npo"]), make_batch(model))
    assert set(res.total) == {"ga", "npo"} and set(res.total["ga"]) == {"risk"}
    assert res["npo"].total["risk"] == res.total["npo"]["risk"]
    with pytest.raises(ValueError, match=r"per_instance=True"):
        _ = res.per_instance
    assert "per_instance" not in res.to_dict()
    assert str(res).count("direction=") == 2
    assert torch.isfinite(torch.tensor(res.total["ga"]["risk"]))
