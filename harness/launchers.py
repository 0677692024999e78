"""What the shared sweep launchers (``harness/conf/hydra/launcher/``: ``slurm``, ``local``) need from a sweep.

Their jobs run in new Python processes (submitit unpickles each job there), which import the entry point's
modules by name: the experiment folder's own modules (``e2e_data``, ``glue_data``, ...) and ``core`` / ``harness``.
:class:`ExportImportPath`, a Hydra callback every experiment's ``config.yaml`` names, puts the folders the sweep
imports them from into ``PYTHONPATH`` before its jobs start, and the jobs inherit it (submitit's local processes
and Slurm's ``sbatch``, which exports the submitting environment).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .paths import REPO_ROOT

__all__ = ["ExportImportPath", "import_path"]


def import_path() -> list[str]:
    """The entry point's folder, the repository root, then what ``PYTHONPATH`` already holds."""
    entry_point = getattr(sys.modules["__main__"], "__file__", None)  # None in an interactive session
    entry_folder = [str(Path(entry_point).resolve().parent)] if entry_point else []
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys(entry_folder + [str(REPO_ROOT)] + existing))


class ExportImportPath(Callback):
    """``hydra.callbacks``: export :func:`import_path` as ``PYTHONPATH`` when a ``-m`` sweep starts."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        os.environ["PYTHONPATH"] = os.pathsep.join(import_path())
