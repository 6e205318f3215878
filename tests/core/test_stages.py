"""Per-stage wall time and peak memory (trt_dm.core.stages): nested stages get their own peaks, outer stages the
maximum over everything inside; the memory check refuses with numbers."""
import sys
import time

import numpy as np
import pytest

from trt_dm.core import stages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_nested_stages_have_their_own_peaks_and_outer_ones_the_maximum():
    with stages.recording() as log:
        with stages.stage("outer"):
            with stages.stage("big"):
                a = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
                del a
            with stages.stage("small"):
                time.sleep(0.01)
    rows = {r["stage"]: r for r in log.rows}
    assert [r["stage"] for r in log.rows] == ["big", "small", "outer"]  # in the order they end
    assert rows["big"]["peak_rss_mb"] >= rows["small"]["peak_rss_mb"] + 350
    assert rows["outer"]["peak_rss_mb"] >= rows["big"]["peak_rss_mb"]
    assert rows["small"]["seconds"] >= 0.01 and rows["outer"]["seconds"] >= rows["small"]["seconds"]
    assert "peak RSS GiB" in log.table() and "big" in log.table()


def test_table_columns_line_up_for_long_stage_names():
    log = stages.StageLog(rows=[{"stage": "calibration", "seconds": 8.7, "peak_rss_mb": 1023},
                {"stage": "export " + "m-r-fp1234-t500.t999-500.onegraph" * 2 + ": FP16 conversion", "seconds": 30.5,
                 "peak_rss_mb": None}])
    lines = log.table().splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header: the numbers in one column
    assert lines[1].endswith("8.7          1.00") and lines[2].endswith("30.5           n/a")


def test_stage_outside_a_recording_does_nothing():
    with stages.stage("nowhere"):
        pass
    with stages.recording() as log:
        pass
    assert log.rows == []


def test_require_memory_refuses_with_the_numbers():
    stages.require_memory(1.0, "a tiny stage", "a guess")  # 1 MiB: always there
    with pytest.raises(stages.InsufficientMemoryError, match=r"needs about .* GiB of memory \(measured\).* available here; free memory"):
        stages.require_memory(1e12, "an impossible stage", "measured")
