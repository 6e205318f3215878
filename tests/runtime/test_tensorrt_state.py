"""The TensorRT runner's bookkeeping (trt_dm.trt_runner.BindingState), on CPU: what each call does for a
sequence of input shapes, a shape the engine refuses, and a CUDA-graph capture that fails."""
import logging

import pytest

from trt_dm.runtime.tensorrt import BindingState, rtx_supports


def _call(state: BindingState, shape, refuse: bool = False, capture_ok: bool = True) -> str:
    """What TrtRunner.infer_impl does, minus CUDA: bind on a new shape, then eager / capture / replay."""
    shapes = {"sample": shape}
    did = []
    if state.needs_bind(shapes):
        state.unbound()
        if refuse:
            return "refused"
        state.bound(shapes)
        did.append("bind")
    action = state.action()
    if action == "capture":
        if capture_ok:
            state.captured()
        else:
            state.failed_capture("capture_end: operation not permitted when stream is capturing")
            state.ran_eager()
            action = "eager"
    elif action == "eager":
        state.ran_eager()
    return "+".join(did + [action])


def test_shape_sequence_captures_after_warmup_and_drops_graphs_on_new_shapes():
    s = BindingState(cuda_graph=True, warmup=1)
    seq = [(2, 1), (2, 1), (2, 1), (3, 1), (3, 1), (2, 1), (2, 1), (2, 1)]
    assert [_call(s, x) for x in seq] == ["bind+eager", "capture", "replay", "bind+eager", "capture", "bind+eager",
                                         "capture", "replay"]
    s2 = BindingState(cuda_graph=True, warmup=3)
    assert [_call(s2, (1,)) for _ in range(5)] == ["bind+eager", "eager", "eager", "capture", "replay"]
    off = BindingState(cuda_graph=False)
    assert {_call(off, (1,)) for _ in range(4)} == {"bind+eager", "eager"}


def test_a_refused_shape_leaves_nothing_bound():
    """The review's defect 2: after a shape outside the profile, the previous shape must be bound again."""
    s = BindingState(cuda_graph=True)
    assert _call(s, (2,)) == "bind+eager" and _call(s, (2,)) == "capture"
    assert _call(s, (99,), refuse=True) == "refused"
    assert s.shapes is None and not s.graph_ready
    assert _call(s, (2,)) == "bind+eager"  # rebinds instead of replaying a graph over freed buffers


def test_a_failed_capture_falls_back_to_eager_once_and_says_so(caplog):
    s = BindingState(cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="trt_dm.runtime.tensorrt"):
        calls = [_call(s, (2,), capture_ok=False) for _ in range(4)] + [_call(s, (3,)), _call(s, (3,))]
    assert calls == ["bind+eager", "eager", "eager", "eager", "bind+eager", "eager"]  # no capture retried
    assert len([r for r in caplog.records if "capture failed" in r.message]) == 1
    with pytest.raises(ValueError, match="warmup"):
        BindingState(cuda_graph=True, warmup=0)


def test_a_moved_shared_memory_block_drops_the_graph():
    """K group engines share one device-memory block; when it grows (moves), a graph captured on it is dropped."""
    s = BindingState(cuda_graph=True)
    assert [_call(s, (2,)) for _ in range(3)] == ["bind+eager", "capture", "replay"]
    s.memory_moved()
    assert [_call(s, (2,)) for _ in range(3)] == ["eager", "capture", "replay"]


def test_rtx_targets_exclude_hopper():
    trt = pytest.importorskip("tensorrt_rtx")
    ok, known = rtx_supports(trt, (9, 0))
    assert not ok and "SM89" in known and "SM90" not in known
    assert rtx_supports(trt, (8, 9))[0]
