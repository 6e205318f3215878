#!/usr/bin/env bash
# GPU check for a lent GPU machine (< 8 minutes): what TensorRT / TensorRT-RTX / CUDA is there, the GPU tests,
# and FP16 vs int8 engine timings of the default model. Output goes to stdout and to ${OUT:-out}/gpu_check/.
# Usage: bash tools/gpu_check.sh   (any Python with a CUDA torch: .venv if there is one, else python3; PY=... to choose)
# Runs from the repository root without installing it (PYTHONPATH); says plainly what could not be exercised.
set -u
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEST=${OUT:-out}/gpu_check
mkdir -p "$DEST"
exec > >(tee "$DEST/log.txt") 2>&1
echo "== machine"; date -u; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || echo "no nvidia-smi"
echo "== libraries"
ldconfig -p | grep -E "libnvinfer|libtensorrt_rtx" | head -5 || echo "no TensorRT libraries in ldconfig"
$PY - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("tensorrt", "tensorrt_rtx", "onnxruntime", "diffusers", "modelopt", "onnx", "trt_dm"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # report, don't stop: the answer is the point
        print(m, "NOT usable:", type(e).__name__, str(e).splitlines()[0][:200])
PY
echo "== tests/gpu"
timeout 240 $PY -m pytest -q tests/gpu -p no:warnings 2>&1 | tail -25
echo "== engines of the default model (int8 ptq4dm + FP16 baseline), built for this GPU"
CC=$($PY -c "import torch; print('SM%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo SM89)
timeout 240 $PY -m trt_dm.cli engine --model default --recipe ptq4dm --out-dir "$DEST/engines" --no-progress \
    --rtx-targets "$CC" --opt-batch 64 --max-batch 256 2>&1 | grep -v -i warn | tail -8
echo "== timing (median of 50 UNet calls after warm-up, CUDA graphs)"
timeout 120 $PY - "$DEST/engines" <<'PY'
import sys, json, torch
from pathlib import Path
from trt_dm.trt_runner import TrtRunner
d = Path(sys.argv[1]); rows = []
for plan in ("default-fp16.plan", "default-ptq4dm.plan"):
    if not (d / plan).exists():
        print("missing", plan); continue
    for batch in (1, 16, 64, 256):
        feed = {"sample": torch.randn(batch, 1, 32, 32, device="cuda"), "timestep": torch.full((batch,), 500, device="cuda")}
        with TrtRunner(d / plan, cuda_graph=True, eager_kernels=True) as r:
            for _ in range(5): r.infer(feed)
            ts = []
            for _ in range(50):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); r.infer(feed); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
        ts.sort(); rows.append({"plan": plan, "batch": batch, "median_ms": ts[25], "p90_ms": ts[45]})
        print(rows[-1])
for batch in (1, 16, 64, 256):
    f = [r for r in rows if r["batch"] == batch]
    if len(f) == 2: print(f"batch {batch}: int8 / fp16 latency = {f[1]['median_ms'] / f[0]['median_ms']:.2f}")
Path(sys.argv[1]).parent.joinpath("timing.json").write_text(json.dumps(rows, indent=1))
PY
echo "== done"; date -u
