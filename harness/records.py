"""One results schema for every experiment: a JSON record per run, written by :class:`RunRecorder` from the start
of the run to its end.

``<results_dir>/<experiment>/<run_name>.json`` holds::

    schema_version, experiment, optimizer, hparams, seed, config, tags, launch, run_name, config_hash, command,
    created, updated, status, error, files,
    hardware {device, cpu, gpu, torch, threads},
    steps [{step, loss, lr, time_s, ...}], evals [{step, ...}], final_metrics {...}, step_time_s (median time_s)

``config`` is the resolved config with its paths relative to the repository, the data folder or the installed
package they lie in, as the config files write them (:func:`portable_paths`).

Lifecycle (``status``). ``with RunRecorder(...) as recorder:`` (or :meth:`RunRecorder.start`) writes the record at
once with ``status: running``; every evaluation (:meth:`RunRecorder.log_metrics`) and checkpoint
(:meth:`RunRecorder.save`) rewrites it; it is closed with ``done`` or ``diverged`` (:meth:`RunRecorder.finish`;
``diverged`` when the final metrics carry ``diverged_at_step`` or ``diverged: true``), ``failed`` (an exception
left the ``with`` block: ``error`` holds its type and message) or ``interrupted`` (KeyboardInterrupt, or SIGTERM,
which the ``with`` block turns into :class:`RunInterrupted`). A ``FloatingPointError`` leaving the block
(:class:`harness.TrainingDiverged`, :class:`core.NonFiniteGradientError`) closes it as ``diverged``. Every write is
atomic (a temporary file, then ``os.replace``), so a killed run leaves its last complete record, never half a file.
Files that belong to the record (GPT-2's predictions, the diffusion samples) are written through
:meth:`RunRecorder.output_file`: atomically, named after the record, listed in ``files`` (paths relative to the
record's folder).

Naming. ``run_name`` defaults to :func:`default_run_name`: a readable slug
``<optimizer>_lr<lr>[_reg<reg>]_seed<seed>[_<tag>-<value>...]`` and ``_<config_hash>``, 8 hex digits of the
sha256 of the optimizer, hparams, seed, tags, the resolved config less :data:`HASH_EXCLUDED_KEYS` (what cannot
change the results) with its paths written relative to the repository, the data folder or the installed package
they lie in (:func:`portable_config`: where the files lie is not part of a run's identity) and the caller's
``launch`` dict (e.g. ``{"world_size": 2}``). Two runs whose configurations differ never share a record;
re-running one configuration replaces its record, from any clone on any machine.

One run per record at a time. Starting a run creates ``<run_name>.lock`` beside the record (atomically, with
``O_EXCL``; it holds pid, host, start time and command) and removes it when the record is closed. A second run of
the same record stops before any work with :class:`RecordLockedError`; a lock left by a killed process is reported
as stale, with the command that removes it, and is never removed silently: only a resumed run
(``RunRecorder(..., resume=True)``, the experiments' ``resume=true``) takes over the lock of a process of this host
that is gone, and says so (``resume="auto"`` too, so a killed sweep re-run with it continues or restarts each run).

Re-running a sweep. :func:`skip_finished` (the experiments' ``skip_finished=true``) stops a run whose configuration
already has a finished record (``done`` or ``diverged``) before any work, printing the record's path: the same sweep
command runs only what is missing.

Finished records are kept until a finished run replaces them. A run whose record exists and is finished (``done``,
``diverged``, or a record written before ``status`` existed) works under ``<run_name>.pending.json`` (its files
named after that) and only replaces ``<run_name>.json`` and its files when it is finished too; if it fails or is
interrupted, the finished record stays untouched and the pending one says what happened (:func:`load_records`
leaves pending records out unless asked). A record that is not finished (``failed``, ``interrupted``, or
``running`` without a lock) is replaced by the next run of its configuration.

:func:`load_records` reads records of every schema version in :data:`READABLE_SCHEMA_VERSIONS` (version 1 had no
``status``, ``error``, ``files``, ``launch``, ``config_hash`` or ``updated``; tables infer how such a run ended).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import sys
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

__all__ = [
    "RunRecord", "RunRecorder", "load_records", "hardware_info", "default_run_name", "config_hash", "SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS", "InvalidRecordWarning", "RUN_STATUSES", "FINISHED_STATUSES", "HASH_EXCLUDED_KEYS",
    "RecordLockedError", "RunInterrupted", "run_slug", "skip_finished", "portable_config", "portable_paths",
    "training_name", "without_keys",
]  # fmt: skip

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
# The values of a record's top-level ``status`` (``None``: a schema-1 record, written before it existed).
RUN_STATUSES = ("running", "done", "diverged", "failed", "interrupted")
# A record with one of these (or without a status) holds a finished run: only a finished run replaces it.
FINISHED_STATUSES = ("done", "diverged")
# Config keys left out of the configuration hash of the default run name: where things are written, how the run
# is watched and resumed, none of which changes its results. Dotted paths name nested keys.
HASH_EXCLUDED_KEYS = (
    "results_dir",  # where records go
    "output_dir",  # scratch folder (Mistral-7B's Trainer)
    "run_name",  # the name itself
    "wandb",  # logging mirror
    "progress",  # progress bars
    "threads",  # torch CPU threads
    "checkpoint",  # checkpoint settings (folder, frequency)
    "resume",  # what to resume from
    "skip_finished",  # whether a finished configuration is run again
    "hydra",  # Hydra's own settings (run folder, job name), when a config carries them
)


class InvalidRecordWarning(UserWarning):
    """A ``.json`` file of a results folder that is not valid JSON or not a run record; it was skipped."""


class RecordLockedError(RuntimeError):
    """Another run holds the record's lock (or a killed one left it): raised before the run does any work."""


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM inside a :class:`RunRecorder` ``with`` block (the message names the signal); recorded as
    ``interrupted``, then re-raised like a KeyboardInterrupt."""


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
    status: str | None = None  # one of RUN_STATUSES; None in schema-1 records
    error: dict[str, Any] | None = None  # {"type", "message"} of what ended a failed / interrupted / diverged run
    files: dict[str, str] = field(default_factory=dict)  # kind -> path relative to the record's folder
    launch: dict[str, Any] = field(default_factory=dict)  # how the run was launched (e.g. world_size); hashed
    config_hash: str = ""  # the hash in the default run name ("" in schema-1 records)
    updated: str = ""  # when the record was last written

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "RunRecord":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: not a run record (a JSON {type(data).__name__}, not an object)")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"experiment", "optimizer", "hparams", "seed"} - set(data)
        unknown = set(data) - names
        if missing or unknown:
            raise ValueError(f"{source}: not a run record (missing {sorted(missing)}, unknown {sorted(unknown)})")
        types = {"experiment": str, "optimizer": str, "hparams": dict, "seed": int, "files": dict, "launch": dict}
        wrong = [f"{k} is {type(data[k]).__name__}" for k, t in types.items()
                 if k in data and not isinstance(data[k], t)]
        if wrong:
            raise ValueError(f"{source}: not a run record ({', '.join(wrong)})")
        if data.get("status") is not None and data["status"] not in RUN_STATUSES:
            raise ValueError(f"{source}: status {data['status']!r}, expected one of {RUN_STATUSES} or null")
        if data.get("schema_version", SCHEMA_VERSION) not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"{source}: schema_version {data['schema_version']}, expected one of "
                             f"{READABLE_SCHEMA_VERSIONS}")
        return cls(**data)

    @property
    def finished(self) -> bool:
        """Whether the record holds a finished run (``done``, ``diverged``, or a schema-1 record)."""
        return self.status is None or self.status in FINISHED_STATUSES


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _number_slug(value: Any) -> str:
    """Numbers as ``%g`` whatever their type (``1e-3``, ``"1e-3"`` and ``0.001`` all give ``0.001``)."""
    try:
        return _slug(float(value))
    except (TypeError, ValueError):
        return _slug(value)


def run_slug(optimizer: str, hparams: dict[str, Any], seed: int, tags: dict[str, Any]) -> str:
    """The readable part of the default run name: ``<optimizer>_lr<lr>[_reg<reg>]_seed<seed>[_<tag>-<value>...]``
    (tags sorted by name; ``reg`` only for the optimizers that have one)."""
    parts = [optimizer, f"lr{_number_slug(hparams.get('lr', 'na'))}"]
    if "reg" in hparams:
        parts.append(f"reg{_number_slug(hparams['reg'])}")
    parts.append(f"seed{seed}")
    return "_".join(parts + [f"{k}-{_slug(v)}" for k, v in sorted(tags.items())])


# Where a path value of a config may lie, written in the identity as the config files write it (the resolvers of
# :mod:`harness.resolvers`), so that a run's identity does not depend on where the repository, the data or the
# installed packages lie: ``/any/clone/harness/x`` -> ``${repo_root:}/harness/x``, ``<data root>/e2e/test.txt`` ->
# ``${data_root:}/e2e/test.txt``, ``/any/venv/lib/python3.11/site-packages/pkg/model`` -> ``${package_dir:pkg}/model``
# (the installed package's name: the model it ships is named by it).
_SITE_PACKAGES = re.compile(r"^.*[/\\](?:site|dist)-packages[/\\]([^/\\]+)(.*)$")


def _roots(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(absolute folder, placeholder) pairs, the longest folder first: the repository, the shared data folder of this
    machine and the config's own ``data.root``."""
    from .paths import REPO_ROOT, default_data_root  # paths imports nothing of the records

    data = config.get("data")
    folders = [(REPO_ROOT, "${repo_root:}"), (default_data_root(), "${data_root:}")]
    if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"]:
        folders.append((Path(data["root"]), "${data_root:}"))
    pairs = set()
    for folder, placeholder in folders:
        for form in (Path(folder).expanduser(), Path(folder).expanduser().resolve()):
            text = str(form).rstrip("/\\")
            if text:
                pairs.add((text, placeholder))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _portable_path(value: str, roots: list[tuple[str, str]]) -> str:
    """``value`` with the folder it lies in replaced by its placeholder (:data:`_SITE_PACKAGES`, :func:`_roots`);
    a value that is not a path under one of them is returned as it is."""
    match = _SITE_PACKAGES.match(value)
    if match:
        return f"${{package_dir:{match.group(1)}}}{match.group(2)}".replace("\\", "/")
    for folder, placeholder in roots:
        if value == folder or value.startswith((folder + "/", folder + "\\")):
            return placeholder + value[len(folder):].replace("\\", "/")
    return value


def portable_paths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a new dict) with every path under the repository, the data folder or an installed package written
    relative to it as the config files write it (``${repo_root:}/...``, ``${data_root:}/...``,
    ``${package_dir:NAME}/...``): what a record stores, so that its config means the same on any machine (it
    resolves there with :mod:`harness.resolvers`) and holds no absolute path of the machine that wrote it. A value
    written so already, or a path outside those folders, stays as it is."""
    roots = _roots(config)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and value:
            return _portable_path(value, roots)
        return value

    return walk(config)


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """What of a resolved ``config`` identifies its run: without :data:`HASH_EXCLUDED_KEYS`, its paths as
    :func:`portable_paths` writes them, so that one configuration has one identity wherever it runs."""
    return portable_paths(_without_excluded(config))


def without_keys(config: dict[str, Any], dotted_keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``config`` without the given dotted keys (``"decode"``, ``"data.test_mrs"``); absent ones are
    ignored."""
    config = copy.deepcopy(config)
    for dotted in dotted_keys:
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def _without_excluded(config: dict[str, Any]) -> dict[str, Any]:
    return without_keys(config, HASH_EXCLUDED_KEYS)


def config_hash(
    config: dict[str, Any] | None,
    launch: dict[str, Any] | None = None,
    *,
    optimizer: str,
    hparams: dict[str, Any],
    seed: int,
    tags: dict[str, Any],
) -> str:
    """8 hex digits of the sha256 of what defines a run: optimizer, hparams, seed, tags, the resolved ``config`` as
    :func:`portable_config` writes it (without :data:`HASH_EXCLUDED_KEYS`, paths relative to the repository, the
    data folder or an installed package) and the ``launch`` dict, as canonical JSON (sorted keys, the values as the
    record stores them, so a record's stored fields give back its hash)."""
    payload = {
        "optimizer": optimizer, "hparams": _plain(dict(hparams)), "seed": int(seed), "tags": _plain(dict(tags)),
        "config": portable_config(_plain(dict(config or {}))), "launch": _plain(dict(launch or {})),
    }  # fmt: skip
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def training_name(record: "RunRecord", after_training: tuple[str, ...]) -> str:
    """The name of a record's training: its slug and the hash of its identity without the ``after_training`` keys
    (dotted config keys of the settings used only after training, e.g. decoding or sampling; a top-level one also
    leaves the hparam of that name out). Two runs that differ only in those keys share their training, hence their
    checkpoint folder (:func:`harness.checkpoint_folder`): a fix to a decoding setting resumes the finished
    training instead of redoing it."""
    config = without_keys(record.config, after_training)
    hparams = {k: v for k, v in record.hparams.items() if k not in after_training}
    digest = config_hash(config, record.launch, optimizer=record.optimizer, hparams=hparams, seed=record.seed,
                         tags=record.tags)  # fmt: skip
    return f"{run_slug(record.optimizer, hparams, record.seed, record.tags)}_{digest}"


def default_run_name(
    optimizer: str,
    hparams: dict[str, Any],
    seed: int,
    tags: dict[str, Any],
    config: dict[str, Any] | None = None,
    launch: dict[str, Any] | None = None,
) -> str:
    """``<optimizer>_lr<lr>[_reg<reg>]_seed<seed>[_<tag>-<value>...]_<config_hash>`` (:func:`run_slug`,
    :func:`config_hash`)."""
    digest = config_hash(config, launch, optimizer=optimizer, hparams=hparams, seed=seed, tags=tags)
    return f"{run_slug(optimizer, hparams, seed, tags)}_{digest}"


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _diverged(final_metrics: dict[str, Any]) -> bool:
    return final_metrics.get("diverged") is True or final_metrics.get("diverged_at_step") is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale_lock_holder(lock: Path) -> str | None:
    """The killed process that left ``lock`` (on this host, no longer running), described; ``None`` when the lock
    cannot be read, is of another host or its process still runs (a lock no resumed run may take over)."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or _pid_alive(pid):
        return None
    return f"process {pid} on {host}, started {info.get('started', '?')} (`{info.get('command', '?')}`)"


def _lock_message(lock: Path, record: Path) -> str:
    """Why ``lock`` stops a run of ``record``, and what to do."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        pid, host, started = int(info["pid"]), str(info["host"]), info.get("started", "?")
        command = info.get("command", "?")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return (f"{record} is locked by {lock}, which cannot be read ({err}); if no run of this configuration is "
                f"going on, remove the lock: rm '{lock}'")
    holder = f"process {pid} on {host}, started {started} (`{command}`)"
    if host != socket.gethostname():
        return (f"{record} is being written by {holder}, on another host; if that run is no longer going on, remove "
                f"the lock: rm '{lock}'")
    if _pid_alive(pid):
        return (f"another run of this configuration is writing {record}: {holder}. Wait for it to end, or give "
                f"this run its own run_name")
    return (f"stale lock {lock}: {holder} is no longer running; it was killed before it could close {record}, "
            f"which says how far it got. Nothing was changed. If that run saved checkpoints, continue it with "
            f"resume=true (which takes the lock over); to run this configuration again from the start, remove the "
            f"lock: rm '{lock}'")


class RunRecorder:
    """One run's record, on disk from the start of the run to its end; optionally mirrored to Weights & Biases
    (offline by default).

    Use it as a context manager around the whole run (see the module docstring for the lifecycle)::

        with RunRecorder(results_dir, "gpt2_e2e", "scaled_adamw", hparams, seed, config=cfg) as recorder:
            ...  # train_loop(..., recorder=recorder); evaluations are written as they come
            recorder.finish(final_metrics)

    :meth:`finish` on a recorder that was never started starts it first (a record written in one go).
    """

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
        launch: dict[str, Any] | None = None,
        resume: bool | str = False,
        after_training: tuple[str, ...] = (),
    ):
        tags = dict(tags or {})
        if not (isinstance(resume, bool) or resume == "auto"):
            raise ValueError(f"resume must be true, false or auto, got {resume!r}")
        self.resume = bool(resume)  # true and auto both continue a run a kill left behind (its stale lock)
        self.record = RunRecord(
            experiment=experiment, optimizer=optimizer, hparams=_plain(dict(hparams)), seed=int(seed),
            config=portable_paths(_plain(dict(config or {}))), tags=_plain(tags), launch=_plain(dict(launch or {})),
            hardware=hardware_info(), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), created=_now(),
        )  # fmt: skip
        record = self.record
        record.config_hash = config_hash(record.config, record.launch, optimizer=optimizer, hparams=record.hparams,
                                         seed=record.seed, tags=record.tags)  # fmt: skip
        record.run_name = run_name or "_".join([run_slug(optimizer, record.hparams, record.seed, record.tags),
                                                record.config_hash])
        self.after_training = tuple(after_training)
        # an explicit run_name names its checkpoints too; a default one leaves the after-training keys out of them
        self.training_name = (training_name(record, self.after_training) if self.after_training and not run_name
                              else record.run_name)  # fmt: skip
        self._locate(Path(results_dir) / experiment)
        self._write_path: Path | None = None  # the file this run writes: path, or pending_path (module docstring)
        self._reopened = False
        self._started = self._closed = False
        self._sigterm_handler: list = []  # the handler to restore, while the with block holds SIGTERM
        self._wandb_settings = wandb
        self._wandb = None

    def _locate(self, folder: Path) -> None:
        name = self.record.run_name
        self.folder = folder
        self.path = folder / f"{name}.json"  # the record once finished
        self.pending_path = folder / f"{name}.pending.json"  # a re-run of a finished record, until it finishes
        self.lock_path = folder / f"{name}.lock"

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> "RunRecorder":
        """A recorder for an existing record, e.g. to score a failed run's predictions later
        (``GPT-2/evaluate.py --record``). Starting it takes the record's lock; the record keeps its status until
        the recorder closes it (:meth:`finish`, or an exception leaving the ``with`` block)."""
        path = Path(path)
        self = cls.__new__(cls)
        self.record = _read_record(path)
        self._locate(path.parent)
        if path.resolve() not in (self.path.resolve(), self.pending_path.resolve()):
            raise ValueError(f"{path}: a record named after its run_name {self.record.run_name!r} was expected "
                             f"({self.path.name} or {self.pending_path.name})")
        self._write_path = path
        self._reopened = True
        self.resume = False
        self.after_training, self.training_name = (), self.record.run_name
        self._started = self._closed = False
        self._sigterm_handler = []
        self._wandb_settings = self._wandb = None
        return self

    @property
    def is_open(self) -> bool:
        """Whether the record is started and not closed yet (what :meth:`save` and :meth:`output_file` need)."""
        return self._started and not self._closed

    @property
    def write_path(self) -> Path:
        """The file this run writes: :attr:`path`, or :attr:`pending_path` while it re-runs a finished record."""
        return self._write_path or self.path

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def finished_record(self) -> Path | None:
        """:attr:`path` when it holds a finished run of this configuration (``done``, ``diverged`` or a schema-1
        record), else ``None`` (no record, or one that is ``running``, ``failed`` or ``interrupted``)."""
        if not self.path.exists():
            return None
        return self.path if _read_record(self.path).finished else None

    def check_can_start(self) -> None:
        """Raise what :meth:`start` would raise, without taking the lock: :class:`RecordLockedError` when the record
        is locked, ``ValueError`` when its file exists but is not a run record. For a run to stop before it loads
        anything (:meth:`start` takes the lock atomically later, when the work that a record is for begins)."""
        if self.lock_path.exists() and not (self.resume and _stale_lock_holder(self.lock_path)):
            raise RecordLockedError(_lock_message(self.lock_path, self.path))
        if not self._reopened and self.path.exists():
            _read_record(self.path)

    def start(self) -> "RunRecorder":
        """Take the record's lock and write it with ``status: running`` (a reopened record keeps its status); start
        the wandb mirror if asked.

        Raises :class:`RecordLockedError` when another run holds the lock (or a killed one left it), and
        ``ValueError`` when the record's file exists but is not a run record; nothing is written then."""
        if self._started:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": self.record.command}
        if self.resume:
            self._take_over_stale_lock()
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RecordLockedError(_lock_message(self.lock_path, self.path)) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        try:
            if not self._reopened:
                existing = _read_record(self.path) if self.path.exists() else None
                self._write_path = self.pending_path if existing is not None and existing.finished else self.path
                self.record.status = "running"
                self.record.error = None
            self._started = True
            if not self._reopened:
                self._write()
        except BaseException:
            self._started = False
            self.lock_path.unlink(missing_ok=True)
            raise
        if self._wandb_settings:
            import wandb as wandb_lib  # only for the runs that mirror to it: it is slow to import

            settings = {"mode": "offline", "project": "riemannian-preconditioned-lora"}
            settings.update(self._wandb_settings if isinstance(self._wandb_settings, dict) else {})
            record = self.record
            self._wandb = wandb_lib.init(name=record.run_name, **settings,
                                         config={"optimizer": record.optimizer, **record.hparams, "tags": record.tags})
        return self

    def _take_over_stale_lock(self) -> None:
        """A resumed run (``resume=True``) continues the run a kill left behind: it removes the lock that run left
        when its process is gone and was on this host, and says so. Any other lock stays and stops the run."""
        holder = _stale_lock_holder(self.lock_path) if self.lock_path.exists() else None
        if holder is not None:
            print(f"resume: taking over {self.lock_path}, left by {holder}, which is no longer running",
                  file=sys.stderr)
            self.lock_path.unlink(missing_ok=True)

    def __enter__(self) -> "RunRecorder":
        self.start()
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            previous = signal.signal(signal.SIGTERM, _raise_interrupted)
            self._sigterm_handler = [signal.SIG_DFL if previous is None else previous]  # None: not set from Python
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        while self._sigterm_handler:
            signal.signal(signal.SIGTERM, self._sigterm_handler.pop())
        if self._closed:
            return False
        if exc is None:
            self._close("failed", {"type": "RuntimeError", "message": "the run ended without RunRecorder.finish()"})
            raise RuntimeError(f"{self.write_path}: the run ended without RunRecorder.finish(); recorded as failed")
        error = {"type": exc_type.__name__, "message": str(exc)}
        if isinstance(exc, KeyboardInterrupt):
            self._close("interrupted", error)
        elif isinstance(exc, FloatingPointError):  # TrainingDiverged, NonFiniteGradientError
            if getattr(exc, "step", None) is not None:
                self.record.final_metrics.setdefault("diverged_at_step", exc.step)
            self._close("diverged", error)
        else:
            self._close("failed", error)
        print(f"record {self.write_path}: {self.record.status} ({error['type']}: {error['message'][:500]})",
              file=sys.stderr)
        return False

    def finish(self, final_metrics: dict[str, Any] | None = None, status: str | None = None) -> Path:
        """Close the record with ``final_metrics`` merged in, and return its path.

        ``status`` defaults to ``diverged`` when the final metrics carry ``diverged_at_step`` or ``diverged:
        true``, else ``done``. A re-run of a finished record replaces it (and its files) now."""
        if self._closed:
            raise RuntimeError(f"{self.write_path} is already closed ({self.record.status})")
        self.start()
        self.record.final_metrics.update(_plain(dict(final_metrics or {})))
        if status is None:
            status = "diverged" if _diverged(self.record.final_metrics) else "done"
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"finish(status={status!r}): expected one of {RUN_STATUSES[1:]}")
        self._close(status, self.record.error if status in ("failed", "interrupted") else None)
        return self.write_path

    def _close(self, status: str, error: dict[str, Any] | None) -> None:
        self.record.status, self.record.error = status, error
        try:
            if self.write_path == self.pending_path and status in FINISHED_STATUSES:
                self._promote()
            else:
                self._write()
        finally:
            self._closed = True
            self.lock_path.unlink(missing_ok=True)
            if self._wandb is not None:
                self._wandb.summary.update(self.record.final_metrics)
                self._wandb.finish()

    def _promote(self) -> None:
        """The finished re-run replaces the finished record: first the record (still naming the pending files, which
        exist), then each file is copied to its final name, then the record names those; the pending files go last.
        Whenever the process is killed, the record under the final name is either the old one beside its own files,
        or the new one naming files of the new run."""
        pending_stem = self.pending_path.name.removesuffix(".json")
        final_stem = self.path.name.removesuffix(".json")
        self._write(self.path)
        moves = {}
        for kind, rel in self.record.files.items():
            name = Path(rel).name
            if not name.startswith(pending_stem):
                continue  # not written by this attempt
            src = self.folder / rel
            dst = src.with_name(final_stem + name[len(pending_stem):])
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            moves[kind] = (src, dst.relative_to(self.folder).as_posix())
        self.record.files.update({kind: rel for kind, (_, rel) in moves.items()})
        self._write(self.path)
        for src, _ in moves.values():
            src.unlink(missing_ok=True)
        self.pending_path.unlink(missing_ok=True)
        self._write_path = self.path

    # -- what the run logs ---------------------------------------------------------------------------------------

    def log_step(self, step: int, **scalars: Any) -> None:
        """Per-step scalars, e.g. ``loss``, ``lr`` and ``time_s`` (wall-clock seconds of the step)."""
        entry = {"step": int(step), **_plain(scalars)}
        self.record.steps.append(entry)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=int(step))

    def log_metrics(self, step: int | None = None, **metrics: Any) -> None:
        """Evaluation metrics during training; the record on disk is rewritten with them (once started)."""
        entry = {"step": step, **_plain(metrics)}
        self.record.evals.append(entry)
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in entry.items() if k != "step"}, step=step)
        if self.is_open:
            self._write()

    def state_dict(self) -> dict[str, Any]:
        """The record so far (a JSON-safe copy), what a checkpoint keeps; :meth:`load_state_dict` puts it back."""
        return json.loads(json.dumps(dataclasses.asdict(self.record)))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the record ``state`` (from :meth:`state_dict` of the same run): its steps, evaluations, final
        metrics and creation time replace this recorder's; this process's config, hardware and command stay."""
        saved = RunRecord.from_dict(state, "the checkpoint's record")
        same_training = bool(self.after_training) and training_name(saved, self.after_training) == self.training_name
        if saved.run_name != self.record.run_name and not same_training:
            raise ValueError(f"the checkpoint's record is of run {saved.run_name!r}, not {self.record.run_name!r}")
        self.record.steps, self.record.evals = saved.steps, saved.evals
        self.record.final_metrics, self.record.created = saved.final_metrics, saved.created

    def save(self, final_metrics: dict[str, Any] | None = None) -> Path:
        """Rewrite the record as it stands (at a checkpoint, or with the results so far in ``final_metrics``, e.g.
        before a step that may fail); the run stays ``running``. Returns the file written."""
        if not self.is_open:
            raise RuntimeError(f"{self.path}: save() needs a started, open record (start() or a with block)")
        self.record.final_metrics.update(_plain(dict(final_metrics or {})))
        self._write()
        return self.write_path

    @contextlib.contextmanager
    def output_file(self, kind: str, suffix: str) -> Iterator[Path]:
        """A file that belongs to the record, e.g. ``output_file("predictions", ".tsv")``: yields a temporary path to
        write; when the block succeeds the file is moved (``os.replace``) to ``<kind>/<record file name><suffix>``
        beside the record, listed in ``record.files[kind]``, and the record is rewritten. If the block fails, the
        temporary file is removed and nothing else changes."""
        if not self.is_open:
            raise RuntimeError(f"{self.path}: output_file() needs a started, open record (start() or a with block)")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", kind) or not re.fullmatch(r"(\.[A-Za-z0-9]+)+", suffix):
            raise ValueError(f"output_file({kind!r}, {suffix!r}): kind is a folder name, suffix like '.tsv'")
        target = self.folder / kind / (self.write_path.name.removesuffix(".json") + suffix)
        tmp = target.with_name(target.name.removesuffix(suffix) + ".tmp" + suffix)  # keeps the suffix (PIL's format)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if not tmp.is_file():
            raise FileNotFoundError(f"output_file({kind!r}): nothing was written to {tmp}")
        os.replace(tmp, target)
        self.record.files[kind] = target.relative_to(self.folder).as_posix()
        self._write()

    def _write(self, path: Path | None = None) -> None:
        record = self.record
        times = [s["time_s"] for s in record.steps if s.get("time_s") is not None]
        record.step_time_s = statistics.median(times) if times else None
        record.schema_version, record.updated = SCHEMA_VERSION, _now()
        path = path or self.write_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(dataclasses.asdict(record), indent=1) + "\n")


def skip_finished(enabled: Any, recorder: RunRecorder | None) -> Path | None:
    """The experiments' ``skip_finished`` key: with ``enabled`` and a finished record of this configuration
    (:meth:`RunRecorder.finished_record`), print its path and return it (the run then stops before any work and
    exits 0); else ``None``. Under several processes where only the main one holds a recorder (``None`` elsewhere),
    every process gets the main one's answer (broadcast over ``torch.distributed``)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"skip_finished must be true or false, got {enabled!r}")
    path = recorder.finished_record() if enabled and recorder is not None else None
    found = None if path is None else str(path)
    if enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [found]
        torch.distributed.broadcast_object_list(shared, src=0)
        found = shared[0]
    if found is None:
        return None
    if recorder is not None:
        print(f"skip_finished: {found} is finished ({_read_record(Path(found)).status or 'done'}); not run again")
    return Path(found)


def _raise_interrupted(signum, frame) -> None:
    raise RunInterrupted(signal.Signals(signum).name)


def _read_record(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError (e.g. a truncated or binary file)
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return RunRecord.from_dict(data, str(path))


def load_records(
    results_dir: str | os.PathLike, experiment: str | None = None, on_invalid: str = "raise", pending: bool = False,
    deduplicate: bool = True,
) -> list[RunRecord]:
    """All records under ``results_dir`` (or its ``experiment`` folder), sorted by path. The re-runs of finished
    records (``*.pending.json``: running, or failed / interrupted beside the finished record they did not replace)
    only with ``pending=True``: a configuration's result is its finished record.

    One record per configuration (``deduplicate``): two finished records of one configuration
    (:func:`harness.migrations.run_identity`, e.g. one written by an older version under another name, or copied in
    from another machine) are never both returned: the newest is, with a
    :class:`harness.migrations.DuplicateRecordWarning` naming both files.

    A ``.json`` file that is not valid JSON or not a run record raises ``ValueError`` naming the file
    (``on_invalid="raise"``), or is skipped with an :class:`InvalidRecordWarning` naming it (``"warn"``).
    """
    if on_invalid not in ("raise", "warn"):
        raise ValueError(f"on_invalid must be 'raise' or 'warn', not {on_invalid!r}")
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder '{root}' does not exist")
    pattern = f"{experiment}/*.json" if experiment else "*/*.json"
    records, sources = [], []
    for path in sorted(root.glob(pattern)):
        if path.name.endswith(".pending.json") and not pending:
            continue
        try:
            records.append(_read_record(path))
            sources.append(str(path))
        except ValueError as err:
            if on_invalid == "raise":
                raise
            warnings.warn(f"skipped {err}", InvalidRecordWarning, stacklevel=2)
    if not deduplicate:
        return records
    from .migrations import one_per_configuration  # it builds on this module

    finished = [i for i, source in enumerate(sources) if not source.endswith(".pending.json")]
    kept = {id(r) for r in one_per_configuration([records[i] for i in finished], [sources[i] for i in finished])}
    return [r for i, r in enumerate(records) if id(r) in kept or sources[i].endswith(".pending.json")]
