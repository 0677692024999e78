"""Rename the records of a results folder that were written before the default run name carried the configuration
hash (schema 1: ``<optimizer>_lr<lr>[_reg<reg>]_seed<seed>[_<tag>-<value>...]``) to today's default name
(:func:`harness.default_run_name`, computed from each record's stored optimizer, hparams, seed, tags, config and
launch), together with the files keyed by the old name in the experiment's subfolders (``predictions/<name>.tsv``,
``samples/<name>.png``). A record's content changes in its ``run_name`` only.

    python -m harness.rename_records results/            # rename
    python -m harness.rename_records results/ --dry-run  # list what would be renamed

Records with a name of their own (a ``run_name`` other than the old default) and records already named by today's
rule are left as they are. A new name that is taken by another file is an error before anything is renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .records import _atomic_write_text, _read_record, default_run_name, run_slug

__all__ = ["legacy_renames", "rename_legacy_records"]


def legacy_renames(results_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(old, new)`` paths of every record of ``results_dir/<experiment>/`` named by the old default rule and of the
    files keyed by its name (records first, each followed by its files)."""
    renames = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        if path.name.endswith(".pending.json"):
            continue
        record = _read_record(path)
        old = run_slug(record.optimizer, record.hparams, record.seed, record.tags)
        if path.stem != old or record.run_name != old:
            continue  # a name of its own, or already today's name
        new = default_run_name(record.optimizer, record.hparams, record.seed, record.tags, record.config,
                               record.launch)  # fmt: skip
        renames.append((path, path.with_name(f"{new}.json")))
        keyed = re.compile(re.escape(old) + r"(\.[A-Za-z0-9]+)")
        for sub in sorted(p for p in path.parent.iterdir() if p.is_dir()):
            for file in sorted(sub.iterdir()):
                match = keyed.fullmatch(file.name)
                if match:
                    renames.append((file, file.with_name(new + match.group(1))))
    taken = [str(new) for _, new in renames if new.exists()]
    if taken:
        raise FileExistsError(f"these new names are taken, nothing was renamed: {taken}")
    return renames


def rename_legacy_records(results_dir: str | os.PathLike, dry_run: bool = False) -> list[tuple[Path, Path]]:
    """Rename what :func:`legacy_renames` lists (a record: its file rewritten under the new name with the new
    ``run_name`` and every other byte as it was, then the old file removed); returns the renames."""
    renames = legacy_renames(results_dir)
    if dry_run:
        return renames
    for old, new in renames:
        if old.parent.parent == Path(results_dir):  # a record (its files are one folder deeper)
            data = json.loads(old.read_text(encoding="utf-8"))
            data["run_name"] = new.stem
            _atomic_write_text(new, json.dumps(data, indent=1) + "\n")
            old.unlink()
        else:
            os.replace(old, new)
    return renames


def main(argv: list[str] | None = None) -> list[tuple[Path, Path]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="results folder (<results_dir>/<experiment>/*.json)")
    parser.add_argument("--dry-run", action="store_true", help="list the renames, change nothing")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"results folder {args.results_dir} does not exist")
    renames = rename_legacy_records(args.results_dir, dry_run=args.dry_run)
    for old, new in renames:
        print(f"{old} -> {new.name}")
    print(f"{'would rename' if args.dry_run else 'renamed'} {len(renames)} files")
    return renames


if __name__ == "__main__":
    main()
