"""Where things are: the repository, the shared data folder, and the checks a run makes before it starts: a path it
reads exists, a folder it writes is writable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["REPO_ROOT", "default_data_root", "require_path", "require_writable_folder", "is_local_path"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """``$RPLORA_DATA`` if set, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("RPLORA_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_path(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)`` if it exists, else a FileNotFoundError naming ``what`` and the path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: '{path}' does not exist")
    return path


def require_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``Path(path)``, created if needed, once a file could be created and removed in it; else a PermissionError
    (or the OSError met) naming ``what`` and the path. What a run checks before training for every folder it will
    write to later."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PermissionError(f"{what} '{path}' is not writable: {err}") from err
    return path


def is_local_path(name: str | os.PathLike) -> bool:
    """Whether a model or dataset name can only be a local path (absolute, ``./``, ``../``, ``~``), never a hub
    name: such a path is checked to exist before a run loads anything."""
    name = str(name)
    return Path(name).is_absolute() or name.startswith(("./", "../", "~"))
