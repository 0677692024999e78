"""The layouts of records that older versions of the experiments wrote, and what makes two records one
configuration.

* :func:`migrate_config` gives a stored config in today's layout: keys renamed (:data:`LEGACY_CONFIG_KEYS`), keys
  that today's configs add (:data:`ADDED_CONFIG_KEYS`), and paths as today's records store them
  (:func:`harness.records.portable_paths`).
* :func:`run_identity` is what a record's configuration is today: its default run name computed from its stored
  fields through that migration, wherever and by whichever version it was written.
* :func:`one_per_configuration` keeps the newest record of each identity, with a warning naming the others:
  :func:`harness.load_records` applies it, so that no table counts one configuration twice (e.g. as two seeds).

``python -m harness.rename_records RESULTS_DIR`` rewrites a results folder into today's layout and names.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from .records import RunRecord, default_run_name, portable_paths
from .settings import setting

_ABSENT = object()  # a key the config lacks

__all__ = ["ADDED_CONFIG_KEYS", "DuplicateRecordWarning", "LEGACY_CONFIG_KEYS", "migrate_config",
           "one_per_configuration", "run_identity"]


class DuplicateRecordWarning(UserWarning):
    """Two records of one configuration (:func:`run_identity`); the newest is kept, the warning names both."""


# (experiment or "*", old dotted key, new dotted key, old value -> new value or None to keep it) that older versions
# of the experiments wrote. A key renamed to None is dropped (it no longer exists and never changed a result).
LEGACY_CONFIG_KEYS: tuple[tuple[str, str, str | None, dict[Any, Any] | None], ...] = (
    ("glue", "data.hub_id", "data.hub_path", {"nyu-mll/glue": "hf://datasets/nyu-mll/glue"}),
    ("glue", "table.source", "table.name", None),
    ("glue", "train.threads", "threads", None),
    ("glue", "name", None, None),  # the preset's name, now the tag `preset`
    ("gpt2_e2e", "data.hub_name", "data.hub_path",
     {"e2e_nlg": "hf://datasets/tuetschek/e2e_nlg@refs%2Fconvert%2Fparquet/default"}),
    ("gpt2_e2e", "num_threads", "threads", None),
)

# (experiment, dotted key, value) of keys that today's configs have and older ones lacked, with the value that gives
# the behaviour of the code that wrote them (``train.eval_steps: null`` is Trainer's default, which they ran with).
ADDED_CONFIG_KEYS: tuple[tuple[str, str, Any], ...] = (("glue", "train.eval_steps", None),)


def _pop(config: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


def _put(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    if last in node and node[last] != value:
        raise ValueError(f"config key {dotted} exists already with {node[last]!r}, cannot move {value!r} there")
    node[last] = value


def migrate_config(experiment: str, config: dict[str, Any], tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` in today's layout (a new dict; the key order of the rest kept): the keys of
    :data:`LEGACY_CONFIG_KEYS` renamed, those of :data:`ADDED_CONFIG_KEYS` added where absent, the record's
    ``tags`` stored under ``config.tags`` as today's experiments do, where an older one kept them only beside it,
    and its paths as :func:`harness.records.portable_paths` writes them (no absolute path of the machine that
    wrote it)."""
    config = json.loads(json.dumps(config))
    legacy = False
    for where, old, new, values in LEGACY_CONFIG_KEYS:
        if where not in ("*", experiment):
            continue
        found, value = _pop(config, old)
        legacy |= found
        if found and new is not None:
            _put(config, new, (values or {}).get(value, value) if isinstance(value, str) else value)
    if legacy:  # the layout of before these renames: it also lacked the later keys
        for where, dotted, value in ADDED_CONFIG_KEYS:
            if where == experiment and setting(config, dotted, default=_ABSENT) is _ABSENT:
                _put(config, dotted, value)
        if tags and "tags" not in config:
            config["tags"] = json.loads(json.dumps(tags))
    return portable_paths(config)


def run_identity(record: RunRecord) -> str:
    """The record's configuration as today's code names it: :func:`harness.default_run_name` of its stored
    optimizer, hparams, seed, tags, launch and its config in today's layout (:func:`migrate_config`)."""
    config = migrate_config(record.experiment, record.config, record.tags)
    return f"{record.experiment}/" + default_run_name(record.optimizer, record.hparams, record.seed, record.tags,
                                                      config, record.launch)


def one_per_configuration(records: list[RunRecord], sources: list[str] | None = None) -> list[RunRecord]:
    """``records`` with one record per configuration (:func:`run_identity`): the newest (``created``, then
    ``updated``) is kept, in the place of the first; each one left out is named in a :class:`DuplicateRecordWarning`
    beside the one kept. ``sources`` (e.g. the files) name the records in the warning."""
    sources = sources or [r.run_name for r in records]
    kept: dict[str, int] = {}
    order: list[str] = []
    for i, record in enumerate(records):
        identity = run_identity(record)
        if identity not in kept:
            kept[identity] = i
            order.append(identity)
            continue
        j = kept[identity]
        newest_first = (record.created, record.updated) >= (records[j].created, records[j].updated)
        newer, older = (i, j) if newest_first else (j, i)
        warnings.warn(f"{sources[older]} and {sources[newer]} are one configuration ({identity}); only the newer, "
                      f"{sources[newer]}, is used", DuplicateRecordWarning, stacklevel=3)
        kept[identity] = newer
    return [records[kept[identity]] for identity in order]
