"""Bring the records of a results folder to today's layout and names: the config keys that older code wrote are
renamed to today's (:data:`LEGACY_CONFIG_KEYS`), and every record named by a default rule of the past (the slug
alone, before the configuration hash existed, or the slug with a hash computed by an older identity, e.g. one that
hashed absolute paths) is renamed to today's default name (:func:`harness.default_run_name`, computed from the
record's stored optimizer, hparams, seed, tags, config and launch), together with the files keyed by its name in the
experiment's subfolders (``predictions/<name>.tsv``, ``samples/<name>.png``). The config's paths are written as
today's records write them (:func:`harness.records.portable_paths`). Nothing else of a record changes: its steps,
evaluations and final metrics stay as they were.

    python -m harness.rename_records results/            # rewrite and rename
    python -m harness.rename_records results/ --dry-run  # list what would change

Records with a name of their own (a ``run_name`` that no default rule gives) are left as they are. Two records that
would get the same name (one configuration recorded twice, under an old and a new identity) and a new name taken
by another file are errors before anything is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .migrations import migrate_config
from .records import _atomic_write_text, _read_record, config_hash, default_run_name, run_slug

__all__ = ["Migration", "planned_migrations", "rename_legacy_records"]

def _is_default_name(name: str, slug: str) -> bool:
    """Whether ``name`` is a default run name of some identity: the slug alone (schema 1) or the slug and a hash."""
    return name == slug or re.fullmatch(re.escape(slug) + r"_[0-9a-f]{8}", name) is not None


@dataclass
class Migration:
    """What happens to one record: its new config and name, and the renames of its files."""

    record: Path
    new_name: str
    config: dict[str, Any]
    config_changed: bool
    files: list[tuple[Path, Path]]

    @property
    def target(self) -> Path:
        return self.record.with_name(f"{self.new_name}.json")


def planned_migrations(results_dir: str | os.PathLike) -> list[Migration]:
    """The :class:`Migration` of every record of ``results_dir/<experiment>/`` whose config has legacy keys or whose
    default name is not today's; a clash (two records to one name, or a name taken) is an error naming both."""
    plans = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        if path.name.endswith(".pending.json"):
            continue
        record = _read_record(path)
        slug = run_slug(record.optimizer, record.hparams, record.seed, record.tags)
        if path.stem != record.run_name or not _is_default_name(record.run_name, slug):
            continue  # a name of its own
        config = migrate_config(record.experiment, record.config, record.tags)
        new = default_run_name(record.optimizer, record.hparams, record.seed, record.tags, config, record.launch)
        if new == record.run_name and config == record.config:
            continue
        keyed = re.compile(re.escape(record.run_name) + r"(\.[A-Za-z0-9]+)")
        files = []
        for sub in sorted(p for p in path.parent.iterdir() if p.is_dir()):
            for file in sorted(sub.iterdir()):
                match = keyed.fullmatch(file.name)
                if match:
                    files.append((file, file.with_name(new + match.group(1))))
        plans.append(Migration(path, new, config, config != record.config, files))
    targets: dict[Path, Path] = {}
    for plan in plans:
        if plan.target in targets:
            raise FileExistsError(f"{targets[plan.target]} and {plan.record} are one configuration ({plan.new_name}); "
                                  f"keep one of them, nothing was changed")
        targets[plan.target] = plan.record
    moving = {plan.record for plan in plans} | {old for plan in plans for old, _ in plan.files}
    taken = [str(new) for plan in plans for new in [plan.target] + [n for _, n in plan.files]
             if new.exists() and new not in moving]
    if taken:
        raise FileExistsError(f"these new names are taken, nothing was changed: {taken}")
    return plans


def rename_legacy_records(results_dir: str | os.PathLike, dry_run: bool = False) -> list[Migration]:
    """Carry out what :func:`planned_migrations` lists: each record rewritten under its new name with the new
    ``run_name``, ``config_hash`` and (migrated) ``config`` and every other field as it was, the old file removed,
    then its files renamed. Returns the migrations."""
    plans = planned_migrations(results_dir)
    if dry_run:
        return plans
    # Files first into temporary names, so that a record's new name may be another record's old one.
    staged = []
    for plan in plans:
        data = json.loads(plan.record.read_text(encoding="utf-8"))
        data["config"], data["run_name"] = plan.config, plan.new_name
        if data.get("config_hash"):
            data["config_hash"] = config_hash(plan.config, data.get("launch"), optimizer=data["optimizer"],
                                              hparams=data["hparams"], seed=data["seed"], tags=data["tags"])
        tmp = plan.target.with_name(plan.target.name + ".migrating")
        _atomic_write_text(tmp, json.dumps(data, indent=1) + "\n")
        staged.append((tmp, plan.target))
        if plan.target != plan.record:
            plan.record.unlink()
        for old, new in plan.files:
            moved = new.with_name(new.name + ".migrating")
            os.replace(old, moved)
            staged.append((moved, new))
    for tmp, final in staged:
        os.replace(tmp, final)
    return plans


def main(argv: list[str] | None = None) -> list[Migration]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="results folder (<results_dir>/<experiment>/*.json)")
    parser.add_argument("--dry-run", action="store_true", help="list the changes, change nothing")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results folder {args.results_dir} does not exist")
    plans = rename_legacy_records(args.results_dir, dry_run=args.dry_run)
    for plan in plans:
        what = " (config keys migrated)" if plan.config_changed else ""
        print(f"{plan.record} -> {plan.target.name}{what}" + "".join(f"\n  {o} -> {n.name}" for o, n in plan.files))
    print(f"{'would change' if args.dry_run else 'changed'} {len(plans)} records")
    return plans


if __name__ == "__main__":
    main()
