"""Deployment targets behind one interface (``base.Target``): what each can express, how it exports a
calibrated model, and what it builds. A target is one module in this folder that defines ``TARGET``; the
registry finds it, so adding a target (e.g. OpenVINO) is one new module. Targets never import the runtime
(``trt_dm.runtime``): running an artifact is the runtime's job.

    target = get_target("tensorrt")
    target.check(qcfg, recipe, options)      # refuse what it cannot express, before any work
    graphs = target.export(job)              # checked graphs + reports
    engines = target.build(graphs, options)  # TensorRT: engines + sidecars; ONNX Runtime: nothing to build
"""
from __future__ import annotations

import importlib
import pkgutil

from trt_dm.targets.base import Target


def _discover() -> dict[str, Target]:
    found: dict[str, Target] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        target = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TARGET", None)
        if isinstance(target, Target):
            found[target.name] = target
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


_REGISTRY: dict[str, Target] | None = None


def targets() -> dict[str, Target]:
    """{name: target}, the default (TensorRT) first."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _discover()
    return _REGISTRY


def names() -> list[str]:
    return list(targets())


def get_target(name: str) -> Target:
    if name not in targets():
        raise ValueError(f"unknown deployment target {name!r}; accepted: {', '.join(targets())}")
    return targets()[name]
