"""The deployment-target interface: one small class per target (``trt_dm/targets/<name>.py``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

from trt_dm.core.flavour import Flavour
from trt_dm.export.job import Exported, ExportJob


class Target(ABC):
    """A deployment target. ``check`` runs before any calibration work; ``export`` writes checked graphs and
    reports; ``build`` turns them into what the target runs (engines), when it has a build step."""

    name: str = ""
    help: str = ""
    order: int = 50  # position in listings (the default target first)
    builds: bool = False  # has a build step (engines) after export

    def check(self, qcfg, recipe, options: dict | None = None) -> None:
        """Raise ValueError, before any work, for what this target cannot express (``recipe``: a Recipe;
        ``options``: the export job's)."""

    @abstractmethod
    def export(self, job: ExportJob, progress: Callable[[str], None] = print) -> list[Exported]:
        """The checked graphs of ``job``, each with its report (written beside it)."""

    def build(self, graphs: list[Exported], options=None, *, flavour: str | Flavour | None = None,
              progress: Callable[[str], None] = print) -> list:
        """What the target runs, made from ``graphs`` (engines: their sidecars); nothing by default."""
        return []

    def usage(self, paths: list[Path]) -> str:
        """One line telling the user how to run what was produced."""
        return ""
