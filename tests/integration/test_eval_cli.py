"""`trt-dm eval` and the reference-statistics tool, end to end."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from support import needs_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@needs_data
def test_reference_stats_tool_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("reference_stats", ROOT / "tools" / "reference_stats.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--split", "test", "--limit", "4", "--noise", "4", "--cache-dir", str(tmp_path), "--quiet",
               "--threads", "1"])
    out = capsys.readouterr().out
    assert "test: 4 images" in out and "FD-EffNet noise" in out and "FID" not in out
    assert len(list(tmp_path.glob("fashion-mnist-test-n4-*.safetensors"))) == 1
