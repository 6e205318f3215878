"""The wheel users `pip install`: every module and every embedded model file is in it, and the installed copy
finds its default models and classifier inside itself (offline, out of the box), not in a source checkout."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy of what the build reads, so that setuptools' build/ and egg-info never land in the tree;
    # no index and no build isolation: the venv's setuptools, offline.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("trt_dm", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("trt_dm-*.whl")
    return whl


def test_wheel_holds_every_module_and_model_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "trt_dm").rglob("*.py")}
    assert modules and modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    model_files = {p.relative_to(ROOT / "models").as_posix() for p in (ROOT / "models").rglob("*") if p.is_file()}
    packaged = {n.removeprefix("trt_dm/embedded/") for n in names if n.startswith("trt_dm/embedded/")}
    assert {"default/unet/diffusion_pytorch_model.safetensors", "default-cond/trt_dm.json",
            "default-dit/transformer/diffusion_pytorch_model.safetensors", "classifier/classifier.safetensors"
            } <= model_files
    assert model_files == packaged, f"in models/ only: {sorted(model_files - packaged)}; " \
                                    f"in the wheel only: {sorted(packaged - model_files)}"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(meta).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_loads_its_own_embedded_models(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                           str(site), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The installed copy first on the path (ahead of the editable install of this checkout).
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import trt_dm, trt_dm.eval.classify as c, trt_dm.models.loading as m\n"
        "loaded = m.load_model('default'); cond = m.load_model('default-cond'); c.load_classifier()\n"
        "dit = m.load_model('default-dit')\n"
        "print(trt_dm.__file__); print(m.DEFAULT_MODEL_DIR); print(c.CLASSIFIER_DIR)\n"
        "print(loaded.data_key()); print(cond.data_key()); print(dit.data_key())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, default_dir, classifier_dir, key, cond_key, dit_key = proc.stdout.splitlines()[-6:]
    for path in (module, default_dir, classifier_dir):
        assert Path(path).resolve().is_relative_to(site.resolve()), path
    assert Path(default_dir) == site / "trt_dm" / "embedded" / "default"
    # The same weights as the checkout's: the installed default model has the checkout's data key.
    from trt_dm.models.loading import load_model
    assert key == load_model("default").data_key()
    assert cond_key == load_model("default-cond").data_key()
    assert dit_key == load_model("default-dit").data_key()
    shipped = site / "trt_dm" / "embedded" / "default" / "unet" / "diffusion_pytorch_model.safetensors"
    source = ROOT / "models" / "default" / "unet" / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(shipped.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
