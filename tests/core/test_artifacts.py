"""Artifacts as types: range sets (pooled and grouped), per-row group lookup, sidecar and report round trips,
atomic writes."""
import json
import os

import pytest
import torch

from trt_dm.core.artifacts import ExportReport, Sidecar, check_sidecar
from trt_dm.core.flavour import EngineError
from trt_dm.core.io import atomic_write, sha256_file
from trt_dm.core.ranges import RangeGroup, RangeSet, group_index


def test_range_set_pooled_and_grouped_round_trip():
    pooled = RangeSet.pooled({"b": 2.0, "a": 0.5})
    assert pooled.names == ["a", "b"] and not pooled.is_grouped and pooled.t_ranges is None
    assert RangeSet.from_dict(pooled.to_dict()) == pooled and pooled.widest() == {"a": 0.5, "b": 2.0}
    d = {"a": [{"t_max": 999, "t_min": 500, "amax": 1.0}, {"t_max": 490, "t_min": 0, "amax": 3.0}],
         "b": [{"t_max": 999, "t_min": 500, "amax": 4.0}, {"t_max": 490, "t_min": 0, "amax": 2.0}]}
    g = RangeSet.from_dict(d)
    assert g.is_grouped and g.t_ranges == [(999, 500), (490, 0)] and g.to_dict() == d
    assert g.amax(1) == {"a": 3.0, "b": 2.0} and g.widest() == {"a": 3.0, "b": 4.0} and len(g) == 2


@pytest.mark.parametrize("bad,msg", [
    ({"a": 1.0, "b": [{"t_max": 9, "t_min": 0, "amax": 1.0}]}, "mix pooled values and timestep groups"),
    ({"a": [{"t_max": 9, "t_min": 5, "amax": 1.0}], "b": [{"t_max": 9, "t_min": 0, "amax": 1.0}]}, "differ"),
    ({"a": 0.0}, "finite and > 0"),
    ({}, "no ranges"),
])
def test_range_set_refuses_inconsistent_ranges(bad, msg):
    with pytest.raises(ValueError, match=msg):
        RangeSet.from_dict(bad)
    with pytest.raises(ValueError, match="same quantizers"):
        RangeSet((RangeGroup({"a": 1.0}, 9, 5), RangeGroup({"b": 1.0}, 4, 0)))


def test_group_index_per_row_and_nearest():
    ranges = [(999, 500), (499, 100), (99, 0)]
    t = torch.tensor([999, 500, 499, 100, 0, 42, 1000, 250])
    assert group_index(t, ranges).tolist() == [0, 0, 1, 1, 2, 2, 0, 1]
    # gaps between groups (a sampler that never visits them): the nearest group, ties to the noisier one
    assert group_index(torch.tensor([55, 60, 45]), [(100, 60), (50, 0)]).tolist() == [0, 0, 1]


def test_sidecar_and_report_round_trip(tmp_path):
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"plan bytes")
    side = Sidecar(flavour="tensorrt_rtx", trt_version="1.7", plan_sha256=sha256_file(plan), onnx="e.onnx",
                   rtx_targets=["SM89"], t_range=[999, 500], signature={"inputs": []})
    side.save(plan)
    assert Sidecar.load(plan) == side
    assert check_sidecar(plan, flavour="tensorrt_rtx", trt_version="1.7", compute_capability="8.9") == side
    with pytest.raises(EngineError, match="this GPU is SM90"):
        check_sidecar(plan, flavour="tensorrt_rtx", trt_version="1.7", compute_capability="9.0")
    (tmp_path / "e.plan.json").write_text("[1, 2")
    with pytest.raises(EngineError, match="not valid JSON"):
        Sidecar.load(plan)
    (tmp_path / "e.plan.json").write_text(json.dumps({"flavour": "tensorrt"}))
    with pytest.raises(EngineError, match="not an engine sidecar"):
        Sidecar.load(plan)
    rep = ExportReport(onnx="g.onnx", target="tensorrt", int8=True, recipe="ptq4dm", t_range=[9, 0])
    rep.save(tmp_path / "g.onnx")
    assert ExportReport.load(tmp_path / "g.onnx") == rep and ExportReport.load(tmp_path / "none.onnx") is None


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"one")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"two")
    monkeypatch.undo()
    assert target.read_bytes() == b"one" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
