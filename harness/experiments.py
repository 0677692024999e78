"""Import an experiment folder's module by its file path, as running the folder's script would.

The experiment folders are not packages (three have hyphens in their names) and their modules import their
siblings by plain name (``from e2e_data import ...``), which works when Python runs a script of the folder because
the folder is then first on ``sys.path``. :func:`load_module` reproduces that for code that imports such a module
from outside (``main_figures/``, the tests), and keeps the one name clash the folders have apart: each has its own
``train.py`` (two have a ``make_figure.py``), so those are loaded under a name of their own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .paths import REPO_ROOT

__all__ = ["load_module"]


def load_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """The module in the file ``path`` (absolute, or relative to the repository root), imported as ``name``.

    ``name`` defaults to the file's stem: the name its siblings import it by. The module's folder goes first on
    ``sys.path`` (if it is not on it already) so that its own sibling imports resolve. Loading a file again under
    the same name returns the module already loaded; a name that another file already holds is an error (give a
    distinct ``name``, e.g. ``load_module("GPT-2/train.py", "gpt2_train")``).
    """
    path = Path(path)
    path = (path if path.is_absolute() else REPO_ROOT / path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"module file '{path}' does not exist")
    name = name or path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        loaded_file = getattr(loaded, "__file__", None)
        if loaded_file and Path(loaded_file).resolve() == path:
            return loaded
        raise ValueError(f"module name '{name}' is already taken by {loaded_file or loaded!r}; "
                         f"load '{path}' under another name")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
