"""Denoiser weight files and configs on disk: the one safetensors file or its shards (``<name>.index.json``),
pickled ``.bin`` weights only on opt-in (then ``torch.load(weights_only=True)``), JSON configs; each read checked,
every failure a ``ModelLoadError`` naming the path and what is accepted."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the path and what is accepted."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: the {what} is not valid JSON ({e}); expected the JSON object "
                             "that diffusers' save_pretrained writes") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: the {what} must be a JSON object, found {type(data).__name__}")
    return data


def _shards(index: Path) -> list[Path]:
    weight_map = read_json(index, "weights index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index}: shard files listed in the index are missing: {missing[:5]}")
    return files


def find_weights(unet_dir: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """Weight files, safetensors first; returns (files, are_pickles)."""
    if (unet_dir / SAFE_WEIGHTS).is_file():
        return [unet_dir / SAFE_WEIGHTS], False
    if (unet_dir / f"{SAFE_WEIGHTS}.index.json").is_file():
        return _shards(unet_dir / f"{SAFE_WEIGHTS}.index.json"), False
    for pkl in (unet_dir / PICKLE_WEIGHTS, unet_dir / f"{PICKLE_WEIGHTS}.index.json"):
        if pkl.is_file():
            if not allow_pickle:
                raise ModelLoadError(
                    f"{pkl}: weights exist only as a pickle, which is refused by default (pickles can run "
                    "code). Opt in with load_model(..., allow_pickle=True) / CLI flag --allow-pickle (loads "
                    "with torch.load(weights_only=True)), or better, convert once to safetensors: "
                    "model.save_pretrained(dir, safe_serialization=True)")
            return ([pkl] if pkl.name == PICKLE_WEIGHTS else _shards(pkl)), True
    found = sorted(p.name for p in unet_dir.iterdir())[:8]
    raise ModelLoadError(f"{unet_dir}: no weights found (files: {found}); expected {SAFE_WEIGHTS}, or shards "
                         f"with {SAFE_WEIGHTS}.index.json, or (with allow_pickle=True) {PICKLE_WEIGHTS}")


def read_weights(files: list[Path], pickles: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = torch.load(f, map_location="cpu", weights_only=True) if pickles else load_file(str(f))
        except Exception as e:  # safetensors/pickle raise many types for truncated or corrupt files
            raise ModelLoadError(f"{f}: cannot read the weights ({type(e).__name__}: {e}); the file is "
                                 "truncated, corrupt or not a plain tensor dict. Re-save the model with "
                                 "save_pretrained(dir, safe_serialization=True)") from e
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelLoadError(f"{f}: expected a dict of tensor name -> tensor, found {type(part).__name__}")
        state.update(part)
    return state


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = [f"{len(v)} {what} (e.g. {', '.join(v[:4])})" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("with wrong shape (file vs config)", wrong))
                if v]
    if problems:
        raise ModelLoadError(f"{where}: the weights do not match the model built from config.json: "
                             + "; ".join(problems) + ". Accepted: the weights save_pretrained wrote for this config")
