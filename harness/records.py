"""One results schema for every experiment: a JSON record per run, written by :class:`RunRecorder`.

``results/<experiment>/<run_name>.json`` holds::

    schema_version, experiment, optimizer, hparams, seed, config, tags, run_name, command, created,
    hardware {device, cpu, gpu, torch, threads},
    steps [{step, loss, lr, time_s, ...}], evals [{step, ...}], final_metrics {...}, step_time_s (median time_s)
    status (optional: running | done | diverged | failed | interrupted; absent in older records)

``run_name`` defaults to a slug of optimizer, learning rate, ``reg`` (for the optimizers that have one), seed and
tags, so re-running one configuration replaces its record and runs that differ in any of these keep their own.
``main_figures/`` reads records with :func:`load_records`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunRecord", "RunRecorder", "load_records", "hardware_info", "default_run_name", "SCHEMA_VERSION",
    "InvalidRecordWarning", "RUN_STATUSES",
]  # fmt: skip

SCHEMA_VERSION = 1
# The values of a record's optional top-level ``status`` (``None``: a record written before it existed).
RUN_STATUSES = ("running", "done", "diverged", "failed", "interrupted")


class InvalidRecordWarning(UserWarning):
    """A ``.json`` file of a results folder that is not valid JSON or not a run record; it was skipped."""


def hardware_info() -> dict[str, Any]:
    """What the run ran on: device type, CPU, GPU name, torch version, CPU threads."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": "cuda" if gpu else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


@dataclass
class RunRecord:
    experiment: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    run_name: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    step_time_s: float | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    status: str | None = None  # one of RUN_STATUSES; None in records written before the field existed

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "RunRecord":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a run record (a JSON {type(data).__name__}, not an object)")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"experiment", "optimizer", "hparams", "seed"} - set(data)
        unknown = set(data) - names
        if missing or unknown:
            raise ValueError(f"{source}: not a run record (missing {sorted(missing)}, unknown {sorted(unknown)})")
        types = {"experiment": str, "optimizer": str, "hparams": dict, "seed": int}
        wrong = [f"{k} is {type(data[k]).__name__}" for k, t in types.items() if not isinstance(data[k], t)]
        if wrong:
            raise ValueError(f"{source}: not a run record ({', '.join(wrong)})")
        if data.get("status") is not None and data["status"] not in RUN_STATUSES:
            raise ValueError(f"{source}: status {data['status']!r}, expected one of {RUN_STATUSES} or null")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"{source}: schema_version {data['schema_version']}, expected {SCHEMA_VERSION}")
        return cls(**data)


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _number_slug(value: Any) -> str:
    """Numbers as ``%g`` whatever their type (``1e-3``, ``"1e-3"`` and ``0.001`` all give ``0.001``)."""
    try:
        return _slug(float(value))
    except (TypeError, ValueError):
        return _slug(value)


def default_run_name(optimizer: str, hparams: dict[str, Any], seed: int, tags: dict[str, Any]) -> str:
    """``<optimizer>_lr<lr>[_reg<reg>]_seed<seed>[_<tag>-<value>...]`` (tags sorted by name)."""
    parts = [optimizer, f"lr{_number_slug(hparams.get('lr', 'na'))}"]
    if "reg" in hparams:
        parts.append(f"reg{_number_slug(hparams['reg'])}")
    parts.append(f"seed{seed}")
    return "_".join(parts + [f"{k}-{_slug(v)}" for k, v in sorted(tags.items())])


def _plain(value: Any) -> Any:
    """JSON-safe copy (tuples to lists, non-finite floats to None, tensors to numbers)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RunRecorder:
    """Collects one run's record; optionally mirrors scalars to Weights & Biases (offline by default)."""

    def __init__(
        self,
        results_dir: str | os.PathLike,
        experiment: str,
        optimizer: str,
        hparams: dict[str, Any],
        seed: int,
        config: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        run_name: str | None = None,
        wandb: dict[str, Any] | bool | None = None,
    ):
        tags = dict(tags or {})
        if run_name is None:
            run_name = default_run_name(optimizer, hparams, seed, tags)
        self.path = Path(results_dir) / experiment / f"{run_name}.json"
        self.record = RunRecord(
            experiment=experiment, optimizer=optimizer, hparams=_plain(dict(hparams)), seed=int(seed),
            config=_plain(dict(config or {})), tags=_plain(tags), run_name=run_name, hardware=hardware_info(),
            command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip
        self._wandb = None
        if wandb:
            import wandb as wandb_lib  # only for the runs that mirror to it: it is slow to import

            settings = {"mode": "offline", "project": "riemannian-preconditioned-lora"}
            settings.update(wandb if isinstance(wandb, dict) else {})
            self._wandb = wandb_lib.init(
                name=run_name, config={"optimizer": optimizer, **self.record.hparams, "tags": tags}, **settings
            )

    def log_step(self, step: int, **scalars: Any) -> None:
        """Per-step scalars, e.g. ``loss``, ``lr`` and ``time_s`` (wall-clock seconds of the step)."""
        entry = {"step": int(step), **_plain(scalars)}
        self.record.steps.append(entry)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=int(step))

    def log_metrics(self, step: int | None = None, **metrics: Any) -> None:
        """Evaluation metrics during training."""
        entry = {"step": step, **_plain(metrics)}
        self.record.evals.append(entry)
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in entry.items() if k != "step"}, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The record so far (a JSON-safe copy), what a checkpoint keeps; :meth:`load_state_dict` puts it back."""
        return json.loads(json.dumps(dataclasses.asdict(self.record)))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the record ``state`` (from :meth:`state_dict` of the same run): its steps, evaluations, final
        metrics and creation time replace this recorder's; this process's config, hardware and command stay."""
        saved = RunRecord.from_dict(state, "the checkpoint's record")
        if saved.run_name != self.record.run_name:
            raise ValueError(f"the checkpoint's record is of run {saved.run_name!r}, not {self.record.run_name!r}")
        self.record.steps, self.record.evals = saved.steps, saved.evals
        self.record.final_metrics, self.record.created = saved.final_metrics, saved.created

    def finish(self, final_metrics: dict[str, Any] | None = None) -> Path:
        """Write the record (``results_dir/<experiment>/<run_name>.json``) and return its path."""
        self.record.final_metrics.update(_plain(dict(final_metrics or {})))
        times = [s["time_s"] for s in self.record.steps if s.get("time_s") is not None]
        self.record.step_time_s = statistics.median(times) if times else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self.record), indent=1) + "\n")
        tmp.replace(self.path)
        if self._wandb is not None:
            self._wandb.summary.update(self.record.final_metrics)
            self._wandb.finish()
        return self.path


def _read_record(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError (e.g. a truncated or binary file)
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return RunRecord.from_dict(data, str(path))


def load_records(
    results_dir: str | os.PathLike, experiment: str | None = None, on_invalid: str = "raise"
) -> list[RunRecord]:
    """All records under ``results_dir`` (or its ``experiment`` folder), sorted by path.

    A ``.json`` file that is not valid JSON or not a run record raises ``ValueError`` naming the file
    (``on_invalid="raise"``), or is skipped with an :class:`InvalidRecordWarning` naming it (``"warn"``).
    """
    if on_invalid not in ("raise", "warn"):
        raise ValueError(f"on_invalid must be 'raise' or 'warn', not {on_invalid!r}")
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder '{root}' does not exist")
    pattern = f"{experiment}/*.json" if experiment else "*/*.json"
    records = []
    for path in sorted(root.glob(pattern)):
        try:
            records.append(_read_record(path))
        except ValueError as err:
            if on_invalid == "raise":
                raise
            warnings.warn(f"skipped {err}", InvalidRecordWarning, stacklevel=2)
    return records
