"""Where things are: the repository, the shared data folder, and a check that a path the run needs exists."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "default_data_root", "require_path"]

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
