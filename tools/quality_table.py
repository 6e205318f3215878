"""The quantization quality table (docs/quality.md): run its rows (resumable, in parts) and print it.

    python tools/quality_table.py list                     # rows, their commands, which are done
    python tools/quality_table.py run [--only ROW ...] [--threads 1]   # start one per core
    python tools/quality_table.py table                    # Markdown table from reports/quality/*/result.json
    python tools/quality_table.py screen [--n 256]         # cheap small-N screening of candidate variants

Screening (reports/screen/<variant>/) ranks candidate calibrations by PSNR and noise-prediction error vs FP
on a few hundred images (FD-EffNet at that N is too noisy to rank); the winners earn a full N row above.

Every row is one `trt-dm eval` on the default model with the same seeds (0..N-1) and N, so rows compare.
A row whose result.json exists is never recomputed (delete the folder to redo it). Each worker takes the
next pending row in list order and claims it with a lock file (running.pid), so several workers on
several cores share the list without overlap, and a row left by a dead worker is taken up again.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from trt_dm.quant.config import DEFAULT_EXCLUDE

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "quality"
N = 2000

# the default recipe's graphs from `trt-dm export --model default --target openvino` (one per timestep group)
_G4_GRAPHS = [f"engines/default-ptq4dm-g4.g{k}.fp32.onnx" for k in range(4)]
# (row id, label, extra `trt-dm eval` arguments). DDIM 100 steps unless the arguments say otherwise.
ROWS: list[tuple[str, str, list[str]]] = [
    ("fp", "FP32", []),
    ("fp-seed100000", "FP32, other seeds (noise floor)", ["--seed", "100000"]),
    ("w8a8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled (ptq4dm, the paper's recipe)", ["--recipe", "ptq4dm"]),
    ("ort-int8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled, ONNX Runtime CPU int8 graph (uint8 asymmetric inputs)",
     ["--onnx", "engines/default-ptq4dm.ort-int8.onnx"]),
    ("ort-int8-all-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled, ONNX Runtime CPU int8 graph, all ops quantized",
     ["--onnx", "engines/default-ptq4dm.ort-int8-all.onnx"]),
    ("ov-int8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled, OpenVINO CPU int8, AVX2 CPU (the TensorRT Q/DQ graph; sums saturate)",
     ["--openvino", "engines/default-ptq4dm.fp32.onnx"]),
    ("ov-int8-w7-ndtc-ptq4dm", "W7A8 ndtc, mse@pooled, OpenVINO CPU int8 (7-bit weight codes: exact without VNNI)",
     ["--openvino", "engines/default-ptq4dm-w7.fp32.onnx"]),
    ("ov-int8-g4-onegraph", "W8A8 ptq4dm-g4 (default) as ONE graph, OpenVINO CPU int8, AVX-512 VNNI CPU (the deployed form)",
     ["--openvino", "engines/default-ptq4dm-g4.onegraph.fp32.onnx"]),
    ("w8a8-single-ptq4dm", "W8A8 single (t at the last step), mse@pooled",
     ["--recipe", "ptq4dm", "--timesteps", "single"]),
    ("w8a8-uniform-ptq4dm", "W8A8 uniform, mse@pooled", ["--recipe", "ptq4dm", "--timesteps", "uniform"]),
    ("w8a8-ndtc-max", "W8A8 ndtc, max@pooled", ["--recipe", "max"]),
    ("w4a8-ndtc-ptq4dm", "W4A8 ndtc, mse@pooled, abs-max weights", ["--recipe", "ptq4dm", "--weight-bits", "4"]),
    ("w4a8-ndtc-ptq4dm-split", "W4A8 ndtc, mse@pooled, abs-max weights, shortcut split",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--shortcut-split"]),
    ("w8a8-ndtc-percentile", "W8A8 ndtc, percentile 99.99@pooled", ["--recipe", "percentile"]),
    ("w4a8-ndtc-ptq4dm-wmse", "W4A8 ndtc, mse@pooled, MSE-searched weights (--weight-calib mse)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse"]),
    ("w8a8-ndtc-max-minmean", "W8A8 ndtc, max@min-mean (ModelOpt's merge; defined for max only)",
     ["--recipe", "minmean"]),
    ("w8a8-ndtc-mse-g4", "W8A8 ndtc, mse@groups=4 (ptq4dm-g4, default: 4 range sets)", ["--recipe", "ptq4dm-g4"]),
    ("w4a8-ndtc-ptq4dm-wmse-adaround-act", "W4A8 ndtc, mse@pooled, MSE-searched weights + learned rounding "
     "(adaround) + learned block input ranges (the best W4A8 screen)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500"]),
    ("w4a8-ndtc-ptq4dm-wmse-adaround-act-w8res0", "W4A8 as the row above, the first resolution's weights at 8 bits "
     "(--w8-layers 'down_blocks.0.*' 'up_blocks.2.*': 10 % of the weights)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500", "--w8-layers", "down_blocks.0.*", "up_blocks.2.*"]),
    ("w4a8-ndtc-ptq4dm-wmse-adaround-act-w8u2", "W4A8 as the adaround-act row, only the last up block's weights at "
     "8 bits (--w8-layers 'up_blocks.2.*': 7.2 % of the weights; the best W4 mix screened)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500", "--w8-layers", "up_blocks.2.*"]),
    ("w4a8-ndtc-g4-wmse-adaround-2k", "W4A8 ndtc, mse@groups=4 (ptq4dm-g4), MSE-searched weights + learned rounding "
     "with 2000 steps per block, every weight at 4 bits",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-iters", "2000"]),
    ("w4a8-ndtc-g4-wmse-adaround-5k", "W4A8 ndtc, mse@groups=4 (ptq4dm-g4), MSE-searched weights + learned rounding "
     "with 5000 steps per block, every weight at 4 bits",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-iters", "5000"]),
    ("w8a8-ndtc-g4-adaround", "W8A8 ndtc, mse@groups=4 (ptq4dm-g4, the default) + learned rounding (500 steps "
     "per block)", ["--recipe", "ptq4dm-g4", "--rounding", "adaround"]),
    ("ddpm250-fp", "FP32, DDPM 250", ["--sampler", "ddpm", "--steps", "250"]),
    ("ddpm250-w8a8-ndtc-ptq4dm", "W8A8 ndtc, mse@pooled (ptq4dm), DDPM 250",
     ["--sampler", "ddpm", "--steps", "250", "--recipe", "ptq4dm"]),
    ("ddpm250-w8a8-ndtc-mse-g4", "W8A8 ndtc, mse@groups=4 (ptq4dm-g4, default), DDPM 250",
     ["--sampler", "ddpm", "--steps", "250", "--recipe", "ptq4dm-g4"]),
]
# The class-conditional default model (issue #12): same seeds, every class in turn, guidance 1 and 3.
_COND = ["--model", "default-cond", "--classes", "all"]
_DIT = ["--model", "default-dit", "--classes", "all"]  # the class-conditional DiT (issue #37)
_T500 = "default-cond-ptq4dm-g4-fpf6039c-t500"  # stem of `trt-dm export --model default-cond --guidance-scale 3
# --keep-fp 'down_blocks.0.*' 'up_blocks.2.*' --keep-fp-from-t 500`
COND_ROWS: list[tuple[str, str, list[str]]] = [
    ("cond-fp-w1", "default-cond FP32, guidance 1", _COND),
    ("cond-fp-w3", "default-cond FP32, guidance 3", [*_COND, "--guidance-scale", "3"]),
    ("cond-w8a8-ptq4dm-w1", "default-cond W8A8 ptq4dm, guidance 1", [*_COND, "--recipe", "ptq4dm"]),
    ("cond-w8a8-ptq4dm-w3", "default-cond W8A8 ptq4dm, guidance 3", [*_COND, "--recipe", "ptq4dm", "--guidance-scale", "3"]),
    ("cond-w8a8-g4-w1", "default-cond W8A8 ptq4dm-g4 (4 range sets), guidance 1", [*_COND, "--recipe", "ptq4dm-g4"]),
    ("cond-w8a8-g4-w3", "default-cond W8A8 ptq4dm-g4 (4 range sets), guidance 3",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3"]),
    ("cond-w8a8-g4-fp-res0-w3", "default-cond W8A8 ptq4dm-g4, first resolution (down_blocks.0, up_blocks.2: 37.5 % "
     "of the MACs) in FP, guidance 3",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--exclude", *DEFAULT_EXCLUDE, "down_blocks.0.*",
      "up_blocks.2.*"]),
    ("cond-w8a8-g4-fp-res01u-w3", "default-cond W8A8 ptq4dm-g4, first resolution and the 16 x 16 decoder resnets "
     "(up_blocks.1.resnets: 60.1 % of the MACs) in FP, guidance 3",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--keep-fp", "down_blocks.0.*", "up_blocks.2.*",
      "up_blocks.1.resnets.*"]),
    ("cond-w8a8-g4-fp-res0-t500-w3", "default-cond W8A8 ptq4dm-g4, first resolution in FP at the noisy steps t >= 500 "
     "only (--keep-fp-from-t 500: 18.8 % of a run's MACs), guidance 3",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--keep-fp", "down_blocks.0.*", "up_blocks.2.*",
      "--keep-fp-from-t", "500"]),
    ("cond-w8a8-g4-fp-res01u-t500-w3", "default-cond W8A8 ptq4dm-g4, first resolution and the 16 x 16 decoder resnets "
     "in FP at the noisy steps t >= 500 only (30.0 % of a run's MACs), guidance 3",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--keep-fp", "down_blocks.0.*", "up_blocks.2.*",
      "up_blocks.1.resnets.*", "--keep-fp-from-t", "500"]),
]
# The same rows on the retrained default-cond (issue #41: 16,000 steps, guidance at t <= 300 by default, from its
# trt_dm.json), at guidance 1, at the scale where FP class accuracy peaks on its curve, and at 3.
COND2_ROWS: list[tuple[str, str, list[str]]] = [
    ("cond2-fp-w1", "default-cond FP32, guidance 1", _COND),
    ("cond2-fp-w3", "default-cond FP32, guidance 3 (t <= 300)", [*_COND, "--guidance-scale", "3"]),
    ("cond2-fp-w2", "default-cond FP32, guidance 2 (t <= 300; the curve's peak: 89.8 % as at 3, lower FD)",
     [*_COND, "--guidance-scale", "2"]),
    ("cond2-g4-w1", "default-cond W8A8 ptq4dm-g4 (the default recipe), guidance 1", [*_COND, "--recipe", "ptq4dm-g4"]),
    ("cond2-g4-w3", "default-cond W8A8 ptq4dm-g4, guidance 3 (t <= 300)",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3"]),
    ("cond2-g4-w2", "default-cond W8A8 ptq4dm-g4, guidance 2 (t <= 300)",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "2"]),
    ("cond2-g4-fp-res0-w3", "default-cond W8A8 ptq4dm-g4, first resolution (37.5 % of the MACs) in FP, guidance 3 "
     "(t <= 300): the best recipe measured on the first model",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--keep-fp", "down_blocks.0.*", "up_blocks.2.*"]),
]
# FP8 and the per-layer format search (issue #36): the whole model in E4M3, and the searched int8 / FP8 / FP16 mix
# (--formats auto: as many MACs in 8-bit formats as a budget on sampled images allows; docs/fp8.md)
_MIX = ["--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "1e-3", "--budget-on", "sampled"]
FP8_ROWS: list[tuple[str, str, list[str]]] = [
    ("cond2-mix-w3", "default-cond, searched int8 / FP8 / FP16 mix (budget 1e-3 on sampled images, search v2; 70.8 % "
     "of the MACs in 8-bit), guidance 3 (t <= 300)", [*_COND, *_MIX, "--guidance-scale", "3"]),
    ("cond2-fp8-w3", "default-cond FP8 (E4M3) W8A8 ptq4dm-g4, guidance 3 (t <= 300)",
     [*_COND, "--recipe", "ptq4dm-g4", "--format", "fp8", "--guidance-scale", "3"]),
    ("cond2-mix-w1", "default-cond, searched mix (the same budget, searched at guidance 1), guidance 1",
     [*_COND, *_MIX]),
    ("cond2-fp8-w1", "default-cond FP8 (E4M3) W8A8 ptq4dm-g4, guidance 1",
     [*_COND, "--recipe", "ptq4dm-g4", "--format", "fp8"]),
    ("fp8-ndtc-g4", "FP8 (E4M3) W8A8 ptq4dm-g4 (mse on the E4M3 grid)", ["--recipe", "ptq4dm-g4", "--format", "fp8"]),
    ("ddpm250-fp8-ndtc-g4", "FP8 (E4M3) W8A8 ptq4dm-g4, DDPM 250 steps",
     ["--recipe", "ptq4dm-g4", "--format", "fp8", "--sampler", "ddpm", "--steps", "250"]),
]
# The class-conditional DiT (issue #37: default-dit; guidance at t <= 300 from its trt_dm.json), FP and W8A8 at
# guidance 1 and 3.
DIT_ROWS: list[tuple[str, str, list[str]]] = [
    ("dit-fp-w1", "default-dit FP32, guidance 1", _DIT),
    ("dit-g4-w1", "default-dit W8A8 ptq4dm-g4 (the default recipe), guidance 1", [*_DIT, "--recipe", "ptq4dm-g4"]),
    ("dit-g4-ff1-w1", "default-dit W8A8 ptq4dm-g4, block 1's MLP in FP (its most sensitive layers), guidance 1",
     [*_DIT, "--recipe", "ptq4dm-g4", "--keep-fp", "transformer_blocks.1.ff.*"]),
    ("dit-g4-sq5-w1", "default-dit W8A8 ptq4dm-g4 with channel balancing (--smooth 0.5), guidance 1",
     [*_DIT, "--recipe", "ptq4dm-g4", "--smooth", "0.5"]),
    ("dit-fp-w3", "default-dit FP32, guidance 3 (t <= 300)", [*_DIT, "--guidance-scale", "3"]),
    ("dit-g4-w3", "default-dit W8A8 ptq4dm-g4, guidance 3 (t <= 300)",
     [*_DIT, "--recipe", "ptq4dm-g4", "--guidance-scale", "3"]),
]
ALL_ROWS = ROWS + COND_ROWS + COND2_ROWS + FP8_ROWS + DIT_ROWS

# Removed after their screens (256 images, `screen` below), being below the default recipe's 38.95 dB there:
# W8A8 uniform + percentile (36.2 dB) and W8A8 ptq4dm + learned rounding (30.1 dB; ptq4dm alone 31.1 dB).
# Workers take pending rows in this order (the rows the issue asks for first, the longest of them first);
# rows not named here follow in table order.
RUN_FIRST = ["ddpm250-w8a8-ndtc-ptq4dm", "w4a8-ndtc-ptq4dm-wmse", "w8a8-ndtc-max",
             "w8a8-ndtc-percentile", "w8a8-ndtc-max-minmean", "w8a8-ndtc-mse-g4", "w4a8-ndtc-ptq4dm",
             "w4a8-ndtc-ptq4dm-split"]


# (variant id, label, extra `trt-dm eval` arguments) for `screen`: one change at a time from the default,
# most promising first (uniform already has its full row).
SCREEN: list[tuple[str, str, list[str]]] = [
    ("w4a8-wmse-adaround", "W4A8, MSE-searched weight clip + learned rounding (block reconstruction, 500 steps/block)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround"]),
    ("w4a8-wmse-adaround-act", "W4A8, as w4a8-wmse-adaround + each block's input ranges learned after its rounding "
     "(--recon-act-iters 500)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500"]),
    ("w4a8-wmse-adaround-temb", "W4A8, as w4a8-wmse-adaround, the time-embedding projections reconstructed first "
     "on their own (--recon-temb separate, TFMQ-DM's time block)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-temb", "separate"]),
    ("w4a8-wmse-adaround-act-w8res0", "W4A8, as w4a8-wmse-adaround-act with the first resolution's weights at 8 bits "
     "(--w8-layers 'down_blocks.0.*' 'up_blocks.2.*', Q-Diffusion-style mixed precision)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500", "--w8-layers", "down_blocks.0.*", "up_blocks.2.*"]),
    ("w4a8-wmse-adaround-act-w8d0r0", "W4A8, as w4a8-wmse-adaround-act with only the block the W4 block report ranks "
     "first at 8 bits (--w8-layers 'down_blocks.0.resnets.0.*': 2.1 % of the weights)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500", "--w8-layers", "down_blocks.0.resnets.0.*"]),
    ("w4a8-wmse-adaround-act-w8u2", "W4A8, as w4a8-wmse-adaround-act with the last up block's weights at 8 bits "
     "(--w8-layers 'up_blocks.2.*': is the first resolution's decoder half what the images need?)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-act-iters", "500", "--w8-layers", "up_blocks.2.*"]),
    ("w4a8-wmse-g4", "W4A8, MSE-searched weight clip with the default's four activation range sets (ptq4dm-g4): "
     "how much of W4A8's error is the pooled activation ranges?",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse"]),
    ("w4a8-wmse-g4-adaround", "W4A8, MSE-searched weight clip + learned rounding under the four activation range "
     "sets (ptq4dm-g4; each calibration row reconstructed with its timestep group's ranges)",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround"]),
    ("w4a8-wmse-g4-adaround-2k", "W4A8, as w4a8-wmse-g4-adaround with 2000 reconstruction steps per block (--recon-iters "
     "2000; Q-Diffusion uses 20,000)",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-iters", "2000"]),
    ("w4a8-wmse-g4-adaround-uniform", "W4A8, as w4a8-wmse-g4-adaround with the calibration (and reconstruction) "
     "set's timesteps uniform instead of NDTC's skew toward the data end",
     ["--recipe", "ptq4dm-g4", "--timesteps", "uniform", "--weight-bits", "4", "--weight-calib", "mse", "--rounding",
      "adaround"]),
    ("w4a8-wmse-g4-adaround-5k", "W4A8, as w4a8-wmse-g4-adaround-2k with 5000 reconstruction steps per block "
     "(does longer training keep paying?)",
     ["--recipe", "ptq4dm-g4", "--weight-bits", "4", "--weight-calib", "mse", "--rounding", "adaround",
      "--recon-iters", "5000"]),
    ("w4a8-wmse-g4-adaround-2k-uniform", "W4A8, as w4a8-wmse-g4-adaround-2k with uniform calibration timesteps "
     "(both changes that helped, together)",
     ["--recipe", "ptq4dm-g4", "--timesteps", "uniform", "--weight-bits", "4", "--weight-calib", "mse", "--rounding",
      "adaround", "--recon-iters", "2000"]),
    ("w4a8-adaround", "W4A8, abs-max weight ranges + learned rounding (block reconstruction, 500 steps/block)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--rounding", "adaround"]),
    ("w8a8-adaround", "W8A8 ptq4dm + learned rounding (block reconstruction, 500 steps/block)",
     ["--recipe", "ptq4dm", "--rounding", "adaround"]),
    ("ptq4dm", "ptq4dm (the paper's; default before 2026-12-01): ndtc(0.5,0.35) n256, mse:2.4@pooled",
     ["--recipe", "ptq4dm"]),
    ("single-ex-temb", "single, with the resnets' time_emb_proj layers kept in FP (is their clipping the failure?)",
     ["--recipe", "ptq4dm", "--timesteps", "single", "--exclude", *DEFAULT_EXCLUDE, "*time_emb_proj"]),
    ("minmean-ex-temb", "max@min-mean, with the resnets' time_emb_proj layers kept in FP",
     ["--recipe", "minmean", "--exclude", *DEFAULT_EXCLUDE, "*time_emb_proj"]),
    ("w4a8-wmse", "W4A8, weight ranges by ModelOpt's data-free MSE search (--weight-calib mse)",
     ["--recipe", "ptq4dm", "--weight-bits", "4", "--weight-calib", "mse"]),
    ("w4a8", "W4A8, abs-max weight ranges (the full row's setting, at the screening size)",
     ["--recipe", "ptq4dm", "--weight-bits", "4"]),
    ("g2", "mse:2.4@groups=2 (two range sets: fewer engines than the groups=4 row)", ["--recipe", "mse:2.4@groups=2"]),
    ("uniform-g4", "uniform timesteps and mse:2.4@groups=4", ["--recipe", "ptq4dm-g4", "--timesteps", "uniform"]),
    ("percentile-g4", "percentile:99.99@groups=4", ["--recipe", "percentile:99.99@groups=4"]),
    ("g4", "mse:2.4@groups=4 (ptq4dm-g4, the default recipe, fake-quant, at the screening size)",
     ["--recipe", "ptq4dm-g4"]),
    ("g4-onegraph-ort", "ptq4dm-g4 as ONE graph (the default export), the FP32 Q/DQ graph run by ONNX Runtime",
     ["--onnx", "engines/default-ptq4dm-g4.onegraph.fp32.onnx"]),
    ("ov-int8-w8-vnni", "OpenVINO int8 on the 8-bit ptq4dm graph, on a CPU with AVX-512 VNNI (no saturation)",
     ["--openvino", "engines/default-ptq4dm.fp32.onnx"]),
    ("ov-int8-g4-groups", "ptq4dm-g4 as 4 graphs switched by timestep (the openvino target's default), OpenVINO "
     "int8, FP32 math, on a CPU with AMX", ["--openvino", *_G4_GRAPHS]),
    ("ov-int8-g4-groups-bf16", "the same 4 graphs with bf16 non-quantized math (--ov-precision bf16), on a CPU with "
     "AMX", ["--openvino", *_G4_GRAPHS, "--ov-precision", "bf16"]),
    ("cond-g4-w3", "default-cond, guidance 3: ptq4dm-g4 (does the default recipe hold under guidance?)",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3"]),
    ("cond-ptq4dm-w3", "default-cond, guidance 3: ptq4dm (the same images as cond-g4-w3)",
     [*_COND, "--recipe", "ptq4dm", "--guidance-scale", "3"]),
    ("cond-g4-w3-ex-d0r0c1", "default-cond, guidance 3: ptq4dm-g4 with the most sensitive quantized layer "
     "(down_blocks.0.resnets.0.conv1) kept in FP: does a lower per-half error survive guidance?",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--exclude", *DEFAULT_EXCLUDE,
      "down_blocks.0.resnets.0.conv1"]),
    ("cond-g4-w3-fp-d0", "default-cond, guidance 3: ptq4dm-g4 with the first down block (down_blocks.0, 8.6 % of "
     "the MACs) kept in FP",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--exclude", *DEFAULT_EXCLUDE, "down_blocks.0.*"]),
    ("cond-g4-w3-fp-res0", "default-cond, guidance 3: ptq4dm-g4 with the first resolution (down_blocks.0 and "
     "up_blocks.2, 37.5 % of the MACs) kept in FP",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--exclude", *DEFAULT_EXCLUDE, "down_blocks.0.*",
      "up_blocks.2.*"]),
    ("cond-g4-w3-fp-2r", "default-cond, guidance 3: ptq4dm-g4 with the two blocks `calibrate --sensitivity blocks` "
     "ranks first (down_blocks.0.resnets.0, up_blocks.2.resnets.0: 24.2 % of the MACs) kept in FP",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--exclude", *DEFAULT_EXCLUDE,
      "down_blocks.0.resnets.0.*", "up_blocks.2.resnets.0.*"]),
    ("cond-g4-w3-adaround", "default-cond, guidance 3: ptq4dm-g4 + learned rounding (500 steps per block, blocks "
     "reconstructed on both halves of the guided calls): does reconstruction lower the guided error?",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--rounding", "adaround"]),
    ("cond-g4-w3-fp-res0-t500", "default-cond, guidance 3: ptq4dm-g4 with the first resolution in FP at t >= 500 "
     "only (fake-quant: two models switched by t)",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3", "--keep-fp", "down_blocks.0.*", "up_blocks.2.*",
      "--keep-fp-from-t", "500"]),
    ("cond-g4-w3-fp-res0-t500-ort", "default-cond, guidance 3: the same as the two exported FP32 Q/DQ graphs "
     "(`trt-dm export ... --keep-fp-from-t 500`) in ONNX Runtime, switched by t",
     [*_COND, "--guidance-scale", "3", "--onnx", f"engines/{_T500}.t999-500.onegraph.fp32.onnx",
      f"engines/{_T500}.t499-0.onegraph.fp32.onnx"]),
    ("fp8-g4", "FP8 (E4M3) W8A8, ptq4dm-g4: mse:2.4@groups=4 searched on the E4M3 grid (--format fp8)",
     ["--recipe", "ptq4dm-g4", "--format", "fp8"]),
    ("fp8-max-g4", "FP8 (E4M3) W8A8, max@groups=4: abs-max ranges (NVIDIA's FP8 recipes calibrate with max)",
     ["--recipe", "max@groups=4", "--format", "fp8"]),
    ("fp8-ptq4dm", "FP8 (E4M3) W8A8, ptq4dm: mse:2.4@pooled on the E4M3 grid, one range set",
     ["--recipe", "ptq4dm", "--format", "fp8"]),
    ("fp8-max", "FP8 (E4M3) W8A8, max@pooled: one abs-max range set", ["--recipe", "max", "--format", "fp8"]),
    ("cond2-g4-w3", "default-cond (retrained), guidance 3: W8A8 ptq4dm-g4, every layer int8",
     [*_COND, "--recipe", "ptq4dm-g4", "--guidance-scale", "3"]),
    ("cond2-mix15-w3", "default-cond, guidance 3: searched mix, budget 1.5e-3 (87.0 % of the MACs in 8-bit)",
     [*_COND, "--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "1.5e-3", "--guidance-scale", "3"]),
    ("cond2-mix10-w3", "default-cond, guidance 3: searched mix, budget 1e-3 (76.8 % of the MACs in 8-bit)",
     [*_COND, "--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "1e-3", "--guidance-scale", "3"]),
    ("cond2-smix10-w3", "default-cond, guidance 3: searched mix, budget 1e-3 on sampled images (--budget-on sampled; "
     "63.2 % of the MACs in 8-bit)",
     [*_COND, "--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "1e-3", "--budget-on", "sampled",
      "--guidance-scale", "3"]),
    ("cond2-smix10v2-w3", "default-cond, guidance 3: searched mix, budget 1e-3 on sampled images, search v2 (the "
     "working budget also loosened: 70.8 % of the MACs in 8-bit)",
     [*_COND, "--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "1e-3", "--budget-on", "sampled",
      "--guidance-scale", "3"]),
    ("cond2-smix20v2-w3", "default-cond, guidance 3: searched mix, budget 2e-3 on sampled images, search v2",
     [*_COND, "--recipe", "ptq4dm-g4", "--formats", "auto", "--budget", "2e-3", "--budget-on", "sampled",
      "--guidance-scale", "3"]),
    ("cond2-fp8-w3", "default-cond, guidance 3: FP8 (E4M3) W8A8 ptq4dm-g4",
     [*_COND, "--recipe", "ptq4dm-g4", "--format", "fp8", "--guidance-scale", "3"]),
    ("dit-g4-w1", "default-dit, guidance 1: W8A8 ptq4dm-g4 (every attention / MLP / adaLN linear int8)",
     [*_DIT, "--recipe", "ptq4dm-g4"]),
    ("dit-ptq4dm-w1", "default-dit, guidance 1: W8A8 ptq4dm (one range set for every timestep)",
     [*_DIT, "--recipe", "ptq4dm"]),
    ("dit-g4-ff1-w1", "default-dit, guidance 1: W8A8 ptq4dm-g4, block 1's MLP (the most sensitive layers) in FP",
     [*_DIT, "--recipe", "ptq4dm-g4", "--keep-fp", "transformer_blocks.1.ff.*"]),
    ("dit-g4-sq8-w1", "default-dit, guidance 1: W8A8 ptq4dm-g4 with channel balancing (--smooth 0.8, every linear "
     "layer: the least prediction error in tools/smooth_study.py)", [*_DIT, "--recipe", "ptq4dm-g4", "--smooth", "0.8"]),
    ("dit-g4-sq5-w1", "default-dit, guidance 1: W8A8 ptq4dm-g4 with channel balancing (--smooth 0.5, SmoothQuant's "
     "default)", [*_DIT, "--recipe", "ptq4dm-g4", "--smooth", "0.5"]),
    ("dit-g4-sq5-ff1-w1", "default-dit, guidance 1: W8A8 ptq4dm-g4, --smooth 0.5 and block 1's MLP in FP",
     [*_DIT, "--recipe", "ptq4dm-g4", "--smooth", "0.5", "--keep-fp", "transformer_blocks.1.ff.*"]),
    ("ndtc-0.4-0.4", "ndtc mu=0.4 sigma=0.4 (PTQ4DM's published script)",
     ["--recipe", "ptq4dm", "--timesteps", "ndtc:0.4,0.4"]),
    ("ex-d0r0c1", "also keep down_blocks.0.resnets.0.conv1 in FP (most sensitive quantized layer)",
     ["--recipe", "ptq4dm", "--exclude", *DEFAULT_EXCLUDE, "down_blocks.0.resnets.0.conv1"]),
    ("uniform-percentile", "uniform timesteps and percentile 99.99 (the two best full rows, together)",
     ["--recipe", "percentile", "--timesteps", "uniform"]),
    ("mse2", "mse:2@pooled (lower exponent, tighter ranges)", ["--recipe", "mse:2@pooled"]),
    ("n1024", "1024 calibration samples (the paper's size)", ["--recipe", "ptq4dm", "--calib-n", "1024"]),
    ("all", "every timestep", ["--recipe", "ptq4dm", "--timesteps", "all"]),
    ("qdiffusion-merge", "mse:2.4 with timesteps weighted equally (qdiffusion preset)", ["--recipe", "qdiffusion"]),
]
SCREEN_OUT = ROOT / "reports" / "screen"


def command(row: str, extra: list[str], threads: int, *, n: int = N, out: Path = OUT, eps_n: int = 128) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "trt-dm"), "eval", "--model", "default", "--n", str(n),
            "--threads", str(threads), "--eps-n", str(eps_n), "--no-progress", "--out-dir", str(out / row), *extra]


def done(row: str) -> dict | None:
    p = OUT / row / "result.json"
    return json.loads(p.read_text()) if p.exists() else None


def cmd_list(args) -> int:
    for row, label, extra in ALL_ROWS:
        print(f"{'done ' if done(row) else '     '} {row:28s} {label}\n        {' '.join(command(row, extra, 1)[1:])}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def claim(row: str) -> bool:
    """Take a row: create OUT/row/running.pid exclusively; a lock whose process is gone is taken over."""
    lock = OUT / row / "running.pid"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if _alive(int(lock.read_text() or 0)):
                    return False
            except (OSError, ValueError):
                pass
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def prepare(extra: list[str], threads: int) -> None:
    """A row that evaluates an exported graph builds it first (from the cached calibration)."""
    if "--openvino" in extra and not (ROOT / (path := extra[extra.index("--openvino") + 1])).exists():
        bits = re.search(r"-w(\d)\.fp32\.onnx$", path)  # a graph with fewer weight bits: '-w7.fp32.onnx'
        subprocess.check_call([str(ROOT / ".venv" / "bin" / "trt-dm"), "export", "--target", "openvino", "--model",
                               "default", "--threads", str(threads), "--no-progress",
                               *(["--weight-bits", bits.group(1)] if bits else [])], cwd=ROOT)
    if "--onnx" in extra and not (ROOT / (path := extra[extra.index("--onnx") + 1])).exists():
        ops = "all" if path.endswith("-all.onnx") else "layers"
        subprocess.check_call([str(ROOT / ".venv" / "bin" / "trt-dm"), "export", "--target", "ort-cpu", "--model",
                               "default", "--ort-ops", ops, "--threads", str(threads), "--no-progress"], cwd=ROOT)


def cmd_run(args) -> int:
    while True:
        todo = [r for r in ALL_ROWS if not done(r[0]) and (not args.only or r[0] in args.only)]
        todo.sort(key=lambda r: RUN_FIRST.index(r[0]) if r[0] in RUN_FIRST else len(RUN_FIRST))
        row = next((r for r in todo if claim(r[0])), None)
        if row is None:
            return 0
        row, label, extra = row
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {row}: {label}", flush=True)
        try:
            prepare(extra, args.threads)
            with open(OUT / row / "log.txt", "w") as log:
                rc = subprocess.call(command(row, extra, args.threads), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        finally:
            (OUT / row / "running.pid").unlink(missing_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {row}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            return rc


def cmd_screen(args) -> int:
    """Run (resumably) and print the small-N screening of SCREEN's variants."""
    for row, label, extra in SCREEN:
        if args.only and row not in args.only:
            continue
        res = SCREEN_OUT / row / "result.json"
        if not res.exists() and not args.table:
            res.parent.mkdir(parents=True, exist_ok=True)
            print(f"[{time.strftime('%H:%M:%S')}] {row}: {label}", flush=True)
            with open(res.parent / "log.txt", "w") as log:
                rc = subprocess.call(command(row, extra, args.threads, n=args.n, out=SCREEN_OUT, eps_n=args.n),
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            if rc:
                print(f"{row}: exit {rc}, see {res.parent / 'log.txt'}")
                return rc
    print("| Variant | N | PSNR vs FP (dB) | eps MSE vs FP | eps MSE, t <= 100 | eps MSE, t >= 900 |")
    print("|---|---:|---:|---:|---:|---:|")
    for row, label, _ in SCREEN:
        p = SCREEN_OUT / row / "result.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())
        per = r["eps"]["per_timestep"]
        print(f"| {label} | {r['n']} | {r['psnr_vs_fp']:.2f} | {r['eps']['mse']:.2e} | {_band_mse(per, 0, 100):.2e} | "
              f"{_band_mse(per, 900, 999):.2e} |")
    return 0


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def cmd_table(args) -> int:
    if args.readme:  # rewrite the block between the markers in docs/quality.md
        import contextlib
        import io
        readme = ROOT / "docs" / "quality.md"
        text = readme.read_text()
        for marker, printer in (("quality-table", _print_table), ("cond-table", _print_cond_table),
                                ("cond2-table", lambda: _print_cond_table(COND2_ROWS)), ("cfg-table", _print_cfg_table),
                                ("dit-table", lambda: _print_cond_table(DIT_ROWS))):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                printer()
            a, b = f"<!-- {marker}:begin -->\n", f"<!-- {marker}:end -->"
            i, j = text.index(a) + len(a), text.index(b)
            text = text[:i] + buf.getvalue() + text[j:]
        readme.write_text(text)
        return 0
    _print_table()
    print()
    _print_cond_table()
    print()
    _print_cfg_table()
    return 0


def _table(columns: list[str], rows, cells, left: int = 1) -> None:
    """A Markdown table: one line per row, ``cells(row id, result)`` filling the columns after the label; the
    first ``left`` columns are left-aligned, the numbers right-aligned."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * left + "---:|" * (len(columns) - left))
    for row, label, _ in rows:
        r = done(row)
        print(f"| {label} | " + (" | ".join(cells(row, r)) if r else "pending" + " |" * (len(columns) - 2)) + " |")


def _print_cond_table(rows=COND_ROWS) -> None:
    """The conditional model's rows (the first model's; ``COND2_ROWS``: the retrained one's): FD-EffNet and class
    accuracy vs FP at each guidance scale, and the noise-prediction error of the guided prediction next to that of
    its conditional part (same x_t)."""
    def cells(row, r):
        acc = "" if r.get("class_accuracy") is None else f"{100 * r['class_accuracy']:.1f}%"
        if r.get("fp_class_accuracy") is not None:
            acc += f" ({100 * r['fp_class_accuracy']:.1f}%)"
        change = r.get("fd_change_vs_fp_pct")
        paired = r.get("class_accuracy_vs_fp")  # rows since 2026-12-01 (4): the paired change and its interval
        ci = "" if paired is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(paired["change_points"],
                                                                         *paired["ci95_points"])
        return [f"{r['fd']:.2f}", _fmt(change, "+.1f") + ("%" if change is not None else ""), acc, ci,
                _fmt(r.get("psnr_vs_fp"), ".2f"), _fmt(r.get("eps", {}).get("mse"), ".2e"),
                _fmt((r.get("eps_conditional") or {}).get("mse"), ".2e")]
    _table(["Configuration", "FD-EffNet", "vs FP", "class accuracy (FP)", "accuracy vs FP, points (95% CI)",
            "PSNR vs FP (dB)", "eps MSE, guided",
            "eps MSE, conditional part"], rows, cells)


# timestep bands of the guidance breakdown: the noise end, the middle, the data end
CFG_BANDS = [(900, 999), (500, 899), (100, 499), (0, 99)]


def _band_mse(per_timestep: list[dict], lo: int, hi: int) -> float:
    rows = [e for e in per_timestep if lo <= e["t"] <= hi]
    return sum(e["mse"] * e["n"] for e in rows) / sum(e["n"] for e in rows)


def _print_cfg_table() -> None:
    """What guidance does to the quantization error, per timestep band: the guided prediction's noise-prediction
    MSE vs FP next to its conditional part's on the same x_t, and their ratio (guided rows only)."""
    print("| Configuration | " + " | ".join(f"t {lo}-{hi}: guided / conditional" for lo, hi in CFG_BANDS) + " |")
    print("|---|" + "---:|" * len(CFG_BANDS))
    for row, label, _ in COND_ROWS:
        r = done(row)
        if not r or not r.get("eps_conditional"):
            continue
        g, c = r["eps"]["per_timestep"], r["eps_conditional"]["per_timestep"]
        cells = []
        for lo, hi in CFG_BANDS:
            a, b = _band_mse(g, lo, hi), _band_mse(c, lo, hi)
            cells.append(f"{a:.2e} / {b:.2e} ({a / b:.1f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")


def _print_table() -> None:
    fp = {}
    for key in ("fp", "ddpm250-fp"):
        r = done(key)
        if r:
            fp[(r["sampler"], r["steps"])] = r["fd"]

    def cells(row, r):
        ref = fp.get((r["sampler"], r["steps"]))
        change = None if ref is None or row in ("fp", "ddpm250-fp") else 100 * (r["fd"] - ref) / ref
        return [f"{r['sampler'].upper()} {r['steps']}", f"{r['fd']:.2f}",
                _fmt(change, "+.1f") + ("%" if change is not None else ""), _fmt(r.get("psnr_vs_fp"), ".2f"),
                _fmt(r.get("eps", {}).get("mse"), ".2e"), f"{r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}"]
    _table(["Configuration", "Sampler", "FD-EffNet", "vs FP", "PSNR vs FP (dB)", "eps MSE vs FP", "KID (x1e-3)"],
           ROWS, cells, left=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list").set_defaults(func=cmd_list)
    p = sub.add_parser("run")
    p.add_argument("--only", nargs="*", default=None, help="row ids to run (default: all pending)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("screen")
    p.add_argument("--n", type=int, default=256, help="images per variant (also the eps-error images)")
    p.add_argument("--only", nargs="*", default=None, help="variant ids (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print what is done")
    p.set_defaults(func=cmd_screen)
    p = sub.add_parser("table")
    p.add_argument("--readme", action="store_true", help="write the table into docs/quality.md between its markers")
    p.set_defaults(func=cmd_table)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
