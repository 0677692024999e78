"""The config groups of Mistral-7B/conf that are generated instead of written file by file.

Registered in Hydra's ConfigStore by :func:`register_config_groups` before ``@hydra.main`` composes anything:

* ``task/<name>``: one option per GLUE task of ``glue_metrics.GLUE_TASKS``, node ``{name: <name>}`` (the column
  layouts live in ``glue_data.LAYOUTS``, the metrics in ``glue_metrics``);
* ``table/<table>``: one option per per-task table ``conf/tables/<table>.yaml``, node ``{name: <table>}``;
* ``tuned/<table>_<task>_<optim>``: one option per entry of those tables, package ``_global_``, node
  ``{optim: {lr: ..., reg: ...}}``.

A table file is ONE mapping ``task -> optimizer -> {lr, reg}``::

    mrpc:
      adamw: {lr: 5.0e-5}
      scaled_adamw: {lr: 5.0e-5, reg: 100.0}

The defaults list of ``conf/config.yaml`` holds ``optional tuned: ${table}_${task}_${optim}`` after ``_self_``:
``task=mrpc optim=scaled_adamw`` therefore composes with ``optim.lr: 5.0e-05`` and ``optim.reg: 100.0`` as literal
values (``--cfg job`` shows them), a command-line ``optim.lr=...`` still wins, and a (task, optimizer) without an
entry keeps the optimizer preset's ``conf/optim/<optim>.yaml`` values.

Every entry is checked when it is registered: a task or optimizer the configs do not know, a key other than
``lr`` / ``reg``, a missing ``lr``, a value that is not a number, ``lr <= 0``, ``reg < 0``, or ``reg`` for an
optimizer whose preset has none (core rejects ``reg`` for ``sgd`` / ``adamw``) is a :class:`TableError` that names
the file and the key.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from glue_metrics import GLUE_TASKS

CONF_DIR = Path(__file__).resolve().parent / "conf"
ENTRY_KEYS = ("lr", "reg")


class TableError(ValueError):
    """A malformed per-task table (the message names the file and the key)."""


def optimizer_presets(conf_dir: Path = CONF_DIR) -> dict[str, set[str]]:
    """``{optimizer name: keys of conf/optim/<name>.yaml}``."""
    presets = {p.stem: set(OmegaConf.load(p)) for p in sorted((Path(conf_dir) / "optim").glob("*.yaml"))}
    if not presets:
        raise FileNotFoundError(f"no optimizer presets (*.yaml) in {Path(conf_dir) / 'optim'}")
    return presets


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TableError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def load_table(path: str | Path, presets: dict[str, set[str]]) -> dict[str, dict[str, dict[str, float]]]:
    """The table in ``path`` as ``{task: {optimizer: {"lr": float[, "reg": float]}}}``, checked against the GLUE
    tasks and the optimizer ``presets`` (``{name: preset keys}``, see :func:`optimizer_presets`)."""
    path = Path(path)
    table = OmegaConf.load(path)
    if not isinstance(table, DictConfig) or not table:
        raise TableError(f"{path}: expected a mapping task -> optimizer -> {{lr, reg}}, got {table!r}")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, by_optim in table.items():
        if task not in GLUE_TASKS:
            raise TableError(f"{path}: unknown task {task!r}; the tasks are {', '.join(GLUE_TASKS)}")
        if not isinstance(by_optim, DictConfig) or not by_optim:
            raise TableError(f"{path}: {task} must map optimizer names to {{lr, reg}}, got {by_optim!r}")
        out[task] = {}
        for optim, entry in by_optim.items():
            key = f"{path}: {task}.{optim}"
            if optim not in presets:
                raise TableError(f"{key}: unknown optimizer {optim!r}; the optimizers are {', '.join(presets)}")
            if not isinstance(entry, DictConfig):
                raise TableError(f"{key} must be a mapping {{lr: ..., reg: ...}}, got {entry!r}")
            unknown = [k for k in entry if k not in ENTRY_KEYS]
            if unknown:
                raise TableError(f"{key}: unknown key(s) {unknown}; an entry holds {' and '.join(ENTRY_KEYS)} only")
            if "lr" not in entry:
                raise TableError(f"{key}: missing lr")
            values = {k: _number(entry[k], f"{key}.{k}") for k in ENTRY_KEYS if k in entry}
            if values["lr"] <= 0:
                raise TableError(f"{key}.lr must be > 0, got {values['lr']!r}")
            if "reg" in values and "reg" not in presets[optim]:
                raise TableError(f"{key}.reg: optimizer {optim!r} takes no reg (its preset conf/optim/{optim}.yaml "
                                 "has none)")
            if values.get("reg", 0.0) < 0:
                raise TableError(f"{key}.reg must be >= 0, got {values['reg']!r}")
            out[task][optim] = values
    return out


def load_tables(conf_dir: str | Path = CONF_DIR) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Every ``conf/tables/<table>.yaml`` of ``conf_dir``: ``{table: {task: {optimizer: {lr[, reg]}}}}``."""
    paths = sorted((Path(conf_dir) / "tables").glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no per-task tables (*.yaml) in {Path(conf_dir) / 'tables'}")
    presets = optimizer_presets(conf_dir)
    return {path.stem: load_table(path, presets) for path in paths}


def register_config_groups(conf_dir: str | Path = CONF_DIR) -> None:
    """Store the ``task``, ``table`` and ``tuned`` options in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    tables = load_tables(conf_dir)  # every table is checked before anything is stored
    store = ConfigStore.instance()
    for task in GLUE_TASKS:
        store.store(group="task", name=task, node={"name": task})
    for table, by_task in tables.items():
        store.store(group="table", name=table, node={"name": table})
        for task, by_optim in by_task.items():
            for optim, values in by_optim.items():
                store.store(group="tuned", name=f"{table}_{task}_{optim}", node={"optim": values},
                            package="_global_")
