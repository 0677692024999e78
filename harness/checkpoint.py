"""Resumable runs: checkpoints that a kill -9 at any moment cannot leave half-written, and a resume that continues a
run exactly as if it had not stopped (the same batches, random numbers, optimizer state and record).

A run's checkpoints live in ``<results_dir>/<experiment>/checkpoints/<run_name>/`` (:func:`checkpoint_folder`)::

    step-<N>/         one checkpoint (a Trainer's are named checkpoint-<N>/); complete once manifest.json, written
                      last, lists its files
    latest            the name of the newest complete checkpoint, rewritten after each one
    .tmp-step-<N>/    a checkpoint being written; renamed to step-<N>/ once complete, never read

* :class:`RunCheckpoints`: such a folder and the rules of the ``resume`` key: ``resume=true`` continues from the
  latest complete checkpoint (an error if there is none, or if its config differs from the run's in any key other
  than ``resume``, ``skip_finished``, ``checkpoint`` and ``wandb``); ``resume=false`` refuses to start when
  checkpoints of the run exist (nothing of a user's is deleted or overwritten by a new run); ``resume=auto``
  continues from the latest complete checkpoint when there is one and starts afresh otherwise (what re-running a
  killed sweep needs: every run of it continues where it stood);
* :class:`Checkpointer`: what :func:`harness.train_loop` saves every ``checkpoint.every`` optimizer steps and resumes
  from: the trainable parameters (not the frozen base), the optimizer, the scheduler, the RNG states (Python, NumPy,
  torch CPU and CUDA), the data position and the record so far, plus any object :meth:`Checkpointer.register`-ed;
  through ``accelerator.save_state``/``load_state`` when the run has an accelerator;
* :class:`ResumableDataset`: the training dataset's wrapper that makes the data position exact (the RNG state
  before each batch is fetched; see :meth:`Checkpointer.epoch`);
* :class:`TrainerCheckpoints`: the same rules for a ``transformers.Trainer``, which writes ``checkpoint-<N>/`` itself
  (``save_strategy="steps"``); its callback completes each one with the record so far and the manifest.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .paths import require_writable_folder

__all__ = [
    "checkpoint_folder", "trainable_state", "load_trainable_state", "rng_state", "set_rng_state", "config_difference",
    "RunCheckpoints", "Checkpointer", "LoopState", "ResumableDataset", "TrainerCheckpoints", "MANIFEST", "LATEST",
    "IGNORED_KEYS",
]  # fmt: skip

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
IGNORED_KEYS = ("resume", "skip_finished", "checkpoint", "wandb")  # keys a resumed run may change: not its results
WEIGHTS = "model.safetensors"  # the trainable parameters, named as accelerate names a model's weights
OPTIMIZER = "optimizer.bin"  # the optimizer, named as accelerate names it (the run without an accelerator)


# ------------------------------------------------------------------------------------------------ pieces
def checkpoint_folder(recorder) -> Path:
    """``<results_dir>/<experiment>/checkpoints/<training name>/``, from the run's :class:`harness.RunRecorder`:
    its run name, or with settings used only after training (``RunRecorder(after_training=...)``) the name of its
    training alone (:func:`harness.records.training_name`), so that a run which changes only those resumes the
    finished training.

    Under several processes where only the main one holds a recorder (``None`` elsewhere), every process gets the
    main one's folder (broadcast over ``torch.distributed``)."""
    folder = None if recorder is None else str(Path(recorder.path).parent / "checkpoints" / recorder.training_name)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [folder]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = shared[0]
    if folder is None:
        raise ValueError("the main process has no RunRecorder: a run's checkpoint folder is named after its record")
    return Path(folder)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters (the LoRA factors and whatever else trains), by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model``'s trainable parameters; every one must be in it,
    with its shape, and nothing else (a ValueError naming ``source`` and the first differences otherwise)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    shapes = [f"{n} {tuple(state[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
              if n in state and state[n].shape != p.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not hold this model's trainable parameters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, shapes differ {shapes[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def rng_state() -> dict[str, Any]:
    """The state of every global random number generator: Python's, NumPy's, torch's CPU one and each CUDA
    device's (what :func:`set_rng_state` puts back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Set every global generator to ``state`` (from :func:`rng_state`, maybe of another process)."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(state["cuda"]) != devices:
        raise ValueError(f"the saved random state covers {len(state['cuda'])} CUDA devices, this process sees "
                         f"{devices}: resume on the same kind of machine")
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if devices:
        torch.cuda.set_rng_state_all(state["cuda"])


_ABSENT = object()  # a key one of two configs lacks


def _differing(saved: Any, current: Any, ignore: Iterable[str], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` of every key (sorted) whose value differs between two resolved
    configs (:data:`_ABSENT` for a key one of them lacks); top-level keys in ``ignore`` are skipped."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            if not prefix and key in ignore:
                continue
            if key not in saved or key not in current:
                out.append((f"{prefix}{key}", saved.get(key, _ABSENT), current.get(key, _ABSENT)))
            else:
                out += _differing(saved[key], current[key], ignore, f"{prefix}{key}.")
        return out
    if saved != current or type(saved) is not type(current) and not {type(saved), type(current)} <= {int, float}:
        return [(prefix.rstrip("."), saved, current)]
    return []


def config_difference(saved: Any, current: Any, ignore: Iterable[str] = IGNORED_KEYS) -> str | None:
    """The first key (dotted, sorted order) whose value differs between two resolved configs, as
    ``"<key>: <saved> in the checkpoint, <current> now"``; ``None`` when they agree. Top-level keys in ``ignore``
    are skipped."""
    found = _differing(saved, current, tuple(ignore))
    if not found:
        return None
    key, old, new = found[0]
    if old is _ABSENT or new is _ABSENT:
        return f"{key}: absent from {'the checkpoint' if old is _ABSENT else 'this run'}'s config"
    return f"{key}: {old!r} in the checkpoint, {new!r} now"


def config_differences(saved: Any, current: Any, ignore: Iterable[str] = IGNORED_KEYS) -> list[str]:
    """Every key (dotted, sorted) whose value differs between two resolved configs, as ``"<key>: <saved> ->
    <current>"`` (``<absent>`` for a missing key); top-level keys in ``ignore`` are skipped."""
    show = lambda value: "<absent>" if value is _ABSENT else repr(value)  # noqa: E731
    return [f"{key}: {show(old)} -> {show(new)}" for key, old, new in _differing(saved, current, tuple(ignore))]


def _comparable(config: dict, after_training: tuple[str, ...]) -> dict:
    """A config as a resume compares it: its paths portable (:func:`harness.records.portable_paths`: a clone moved
    elsewhere resumes) and without the ``after_training`` keys (dotted)."""
    from .records import portable_paths, without_keys

    return without_keys(portable_paths(config), after_training)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: ``path`` is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _settings(every: Any, keep: Any, resume: Any) -> tuple[int | None, int, bool]:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ValueError(f"checkpoint.every must be a number of optimizer steps >= 0 or null, got {every!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint.keep must be a number of checkpoints >= 1, got {keep!r}")
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ValueError(f"resume must be true, false or auto, got {resume!r}")
    return every or None, keep, resume


# ------------------------------------------------------------------------------------------------ the folder
class RunCheckpoints:
    """One run's checkpoint folder, the rules of ``resume`` and what happens on disk.

    Args:
        folder: ``<results_dir>/<experiment>/checkpoints/<run_name>/`` (:func:`checkpoint_folder`).
        every: save every this many optimizer steps (``None`` or 0: never).
        keep: complete checkpoints kept (the oldest are removed once a newer one is complete).
        resume: ``True``: continue from the latest complete checkpoint (an error without one); ``False``: refuse
            to start when checkpoints exist; ``"auto"``: continue from the latest complete checkpoint when there is
            one, else start afresh (removing the leftovers of a save that was cut short, which were never complete).
        config: the run's resolved config, stored with each checkpoint and compared on resume.
        world_size: processes of the run (a checkpoint resumes only with as many).
        main: whether this is the process that writes the shared files (the folder's bookkeeping).

    On construction, before any work: ``resume=false`` with checkpoints of the run in ``folder`` is a
    ``FileExistsError``; ``resume=true`` without a complete one a ``FileNotFoundError`` (``resume="auto"`` starts
    afresh then); a checkpoint whose
    files do not match its manifest, or whose config differs in a key that changes results (anything but
    :data:`IGNORED_KEYS`), or that was written by another number of processes, a ``ValueError`` naming it.
    Leftovers of a save that was cut short are removed then (they were never complete).
    """

    prefix = "step-"

    def __init__(self, folder: str | os.PathLike, *, every: int | None = None, keep: int = 2,
                 resume: bool | str = False, config: dict | None = None, world_size: int = 1, main: bool = True,
                 after_training: tuple[str, ...] = ()):
        self.every, self.keep, self.resume = _settings(every, keep, resume)
        self.folder, self.config, self.world_size, self.main = Path(folder), config or {}, world_size, main
        self.after_training = tuple(after_training)  # dotted keys a resumed run may change: used after training
        if self.every and self.main:  # a folder that cannot be written would fail at the first save, after training
            require_writable_folder(self.folder, "checkpoint folder (checkpoint.every)")
        self.resume_from, self.resumed_step = self._resume_point()  # (None, 0) for a fresh run

    @classmethod
    def from_config(cls, cfg, folder: str | os.PathLike, **kwargs) -> "RunCheckpoints":
        """From an experiment config: ``checkpoint.every``, ``checkpoint.keep``, ``resume`` and the resolved
        config itself."""
        from omegaconf import OmegaConf

        return cls(folder, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, resume=cfg.resume,
                   config=OmegaConf.to_container(cfg, resolve=True), **kwargs)

    @property
    def active(self) -> bool:
        """Whether this run saves checkpoints or starts from one."""
        return bool(self.every) or self.resume_from is not None

    # -- what is on disk
    def _step_of(self, path: Path) -> int | None:
        match = re.fullmatch(re.escape(self.prefix) + r"(\d+)", path.name)
        return int(match.group(1)) if match and path.is_dir() else None

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every complete checkpoint (its manifest present), oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(self._step_of(p), p) for p in self.folder.iterdir()]
        return sorted((step, p) for step, p in found if step is not None and (p / MANIFEST).is_file())

    def incomplete(self) -> list[Path]:
        """Folders of saves that were cut short: temporary ones, and checkpoint folders without a manifest."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and (
            p.name.startswith(".tmp-") or self._step_of(p) is not None and not (p / MANIFEST).is_file()))

    def manifest(self, folder: Path) -> dict:
        """The manifest of a complete checkpoint, after checking that every file it lists is there, whole."""
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"checkpoint {folder}: format {manifest.get('format')!r}, expected {FORMAT}")
        for name, size in manifest["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                raise ValueError(f"checkpoint {folder} is damaged: {name} is {found}, its manifest says {size} bytes")
        return manifest

    def _resume_point(self) -> tuple[Path | None, int]:
        complete, incomplete = self.complete(), self.incomplete()
        if not self.resume:
            if complete or incomplete:
                what = (f"checkpoints up to step {complete[-1][0]}" if complete
                        else "only an incomplete checkpoint (a save that was cut short)")
                hint = "resume=true continues it, or remove" if complete else "remove"
                raise FileExistsError(f"this run already has {what} in '{self.folder}': {hint} that folder to "
                                      "start afresh (a new run never deletes a run's checkpoints)")
            return None, 0
        if not complete and self.resume == "auto":
            if self.main:
                for leftover in incomplete:
                    print(f"removing {leftover}: a checkpoint whose save was cut short")
                    shutil.rmtree(leftover)
                print(f"resume=auto: no complete checkpoint in '{self.folder}', starting afresh")
            return None, 0
        if not complete:
            raise FileNotFoundError(f"resume=true, but '{self.folder}' holds no complete checkpoint of this run"
                                    + (" (only a save that was cut short)" if incomplete else "")
                                    + self._siblings_note())
        step, folder = complete[-1]
        try:
            manifest = self.manifest(folder)
        except ValueError as err:
            raise ValueError(f"{err}; remove that folder to resume from the checkpoint before it") from err
        if manifest["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {folder} was written by {manifest['world_size']} processes, this run has "
                             f"{self.world_size}: resume with as many")
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        difference = config_difference(*(_comparable(c, self.after_training) for c in (saved, self.config)))
        if difference:
            raise ValueError(f"resume=true: checkpoint {folder} is of another configuration ({difference}); "
                             f"a resumed run keeps every setting but {', '.join(IGNORED_KEYS)}")
        if self.main:
            for leftover in incomplete:
                print(f"removing {leftover}: a checkpoint whose save was cut short")
                shutil.rmtree(leftover)
            print(f"resuming from {folder} (step {step})")
        return folder, step

    def _siblings_note(self) -> str:
        """For the error of a resume that finds nothing: the runs beside this one with the same readable name (the
        slug before the configuration hash) that have a complete checkpoint, each with every key whose value
        differs from this run's (a hyperparameter changed since that run, e.g.), or "" when there are none."""
        slug, _, digest = self.folder.name.rpartition("_")
        if not slug or not re.fullmatch(r"[0-9a-f]{8}", digest) or not self.folder.parent.is_dir():
            return ""
        notes = []
        for sibling in sorted(self.folder.parent.glob(f"{glob.escape(slug)}_*")):
            if sibling == self.folder or not re.fullmatch(r"[0-9a-f]{8}", sibling.name[len(slug) + 1:]):
                continue
            found = RunCheckpoints.__new__(RunCheckpoints)
            found.folder, found.prefix = sibling, self.prefix
            if not found.complete():
                continue
            config_file = found.complete()[-1][1] / "config.json"
            try:
                saved = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            changed = config_differences(*(_comparable(c, self.after_training) for c in (saved, self.config)))
            notes.append(f"'{sibling}' ({'; '.join(changed) or 'no key differs'})")
        if not notes:
            return ""
        return (". Runs of the same name with checkpoints, and what differs from this run (there -> here): "
                + ", ".join(notes) + ". A resumed run keeps every setting of its checkpoint: undo the change to "
                "continue that run, or run this configuration afresh with resume=false")

    # -- writing
    def staging(self, step: int) -> Path:
        """The temporary folder a checkpoint of ``step`` is written into (:meth:`seal` renames it into place)."""
        return self.folder / f".tmp-{self.prefix}{step}"

    def seal(self, folder: Path, step: int, **info: Any) -> Path:
        """Complete the checkpoint written into ``folder``: the manifest (its files and sizes, ``info``) last, then
        the rename of a staging folder into ``<prefix><step>/``, the ``latest`` pointer, and the removal of the
        checkpoints beyond the last :attr:`keep`. Returns the checkpoint's folder."""
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info, "files": files}
        _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        final = self.folder / f"{self.prefix}{step}"
        if folder != final:
            if final.exists():
                raise FileExistsError(f"checkpoint {final} exists already; it is never overwritten")
            folder.rename(final)
        _write_atomically(self.folder / LATEST, final.name + "\n")
        for _, old in self.complete()[:-self.keep]:
            shutil.rmtree(old)
        return final

    def write_run_files(self, folder: Path, recorder=None) -> None:
        """The run's resolved config (``config.json``) and, with a recorder, the record so far (``record.json``)."""
        (folder / "config.json").write_text(json.dumps(self.config, indent=1) + "\n", encoding="utf-8")
        if recorder is not None:
            (folder / "record.json").write_text(json.dumps(recorder.state_dict()) + "\n", encoding="utf-8")

    def restore_record(self, recorder) -> None:
        """Put the record so far of the checkpoint resumed from back into ``recorder`` (nothing for a fresh run)."""
        if self.resume_from is None or recorder is None:
            return
        path = self.resume_from / "record.json"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {self.resume_from} holds no record.json (the record so far)")
        recorder.load_state_dict(json.loads(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------------ train_loop
class ResumableDataset(torch.utils.data.Dataset):
    """``dataset`` as it is (items, length, attributes), plus what an exact resume needs: the RNG state before each
    batch is fetched.

    A dataset that draws random numbers while fetching (augmentations) makes the data position more than an index:
    accelerate's data loaders fetch one batch ahead, so at a checkpoint the next batch was already drawn, with
    the random state of before the last step. :class:`Checkpointer` saves those states and has a resumed run fetch
    that batch again with them (:meth:`replay`). Build the training ``DataLoader`` over it with
    ``num_workers=0`` (batches fetched in this process).
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset
        self.fetched = 0  # batches fetched in this process
        self._before_fetch: collections.deque = collections.deque(maxlen=8)  # (fetch number, rng state) of the last
        self._replay: collections.deque = collections.deque()  # states to set before the next fetches

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, indices: list) -> list:
        """One batch's items (what a ``DataLoader`` calls once per batch), after noting the RNG state."""
        if self._replay:
            set_rng_state(self._replay.popleft())
        self.fetched += 1
        self._before_fetch.append((self.fetched, rng_state()))
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(indices) if fetch else [self.dataset[i] for i in indices]

    def fetched_ahead(self, consumed: int) -> list[dict]:
        """The RNG states before the fetch of each batch fetched but not consumed yet (after ``consumed``)."""
        states = [state for number, state in self._before_fetch if number > consumed]
        if len(states) != self.fetched - consumed:
            raise RuntimeError(f"{self.fetched - consumed} batches fetched ahead, more than this dataset keeps")
        return states

    def replay(self, states: list[dict]) -> None:
        """Set the RNG to ``states[i]`` before the i-th next fetch; the last one is also set when the first batch is
        consumed (:meth:`end_replay`), if no fetch came first."""
        self._replay = collections.deque(states)

    def end_replay(self) -> None:
        """A batch is being consumed: the state to continue from is the last one of :meth:`replay`."""
        if len(self._replay) > 1:
            raise RuntimeError(f"a batch was consumed with {len(self._replay)} fetches of the resumed run still due")
        if self._replay:
            set_rng_state(self._replay.popleft())


@dataclass
class LoopState:
    """Where a :func:`harness.train_loop` run stands: optimizer steps done, the epoch and the batches of it consumed,
    the per-step losses so far."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    losses: list[float] = field(default_factory=list)


class Checkpointer(RunCheckpoints):
    """Checkpoints of a :func:`harness.train_loop` run (``train_loop(..., checkpointer=...)``).

    A checkpoint (``step-<N>/``) holds the trainable parameters (``model.safetensors``: not the frozen base), the
    optimizer, per process the RNG states and the data position (``loop_state_<rank>.pt``: epoch, batches consumed,
    the order state of the epoch's start, the states of batches fetched ahead, the losses so far), the scheduler and
    the registered objects (``extra.pt``), the record so far (``record.json``) and the config (``config.json``).
    With an accelerator the model, optimizer, GradScaler and RNG go through ``accelerator.save_state`` /
    ``load_state`` (a pre-hook keeps only the trainable parameters of each prepared model).

    The data order is reproduced, not pickled: the shuffle of an epoch follows from the generators it draws from
    (the loader's and its sampler's, or torch's global one), whose states at the epoch's start are saved; a resumed
    run sets them, skips the consumed batches by index (``accelerate.skip_first_batches``: nothing is loaded) and
    fetches the ones that were fetched ahead again with their saved RNG state (:class:`ResumableDataset`).
    """

    def __init__(self, folder: str | os.PathLike, *, accelerator=None, **kwargs):
        if accelerator is not None and (kwargs.get("every") or kwargs.get("resume")):
            from accelerate.utils import DistributedType

            sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
            if accelerator.distributed_type in sharded:
                raise ValueError(f"checkpoint.every / resume: this run is sharded by "
                                 f"{accelerator.distributed_type.value}, whose sharded parameters and optimizer "
                                 "states these checkpoints do not save; run with checkpoint.every=null "
                                 "resume=false, or unsharded (one process or DDP)")
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        world_size = accelerator.num_processes if accelerator is not None else 1
        main = accelerator is None or accelerator.is_main_process
        super().__init__(folder, world_size=world_size, main=main, **kwargs)
        self._objects: dict[str, Any] = {}
        self._run: tuple = ()
        self._resume: dict | None = None  # the loop state of the checkpoint, until its epoch starts
        self._last_saved = 0
        self._epoch = self._batch = self._consumed = self._epoch_length = 0
        self._epoch_start: dict = {}
        self._generators: list[torch.Generator] = []
        self._dataset: ResumableDataset | None = None

    @classmethod
    def from_config(cls, cfg, folder: str | os.PathLike, accelerator=None,
                    after_training: tuple[str, ...] = ()) -> "Checkpointer":
        """``checkpoint.every``, ``checkpoint.keep`` and ``resume`` of an experiment config (errors, if any, now);
        ``after_training``: the dotted keys of settings used only after training, which a resumed run may change."""
        return super().from_config(cfg, folder, accelerator=accelerator, after_training=after_training)

    def register(self, **objects: Any) -> None:
        """More state to checkpoint, by name: objects with ``state_dict()``/``load_state_dict()``, or plain dicts
        (saved as they are, restored in place), e.g. the best model state of model selection."""
        self._objects.update(objects)

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # -- the loop's side
    def start(self, model: nn.Module, optimizer, batches, scheduler=None, recorder=None) -> LoopState:
        """Bind the run's objects; when resuming, load the checkpoint into them. Returns where the loop starts."""
        self._run = (model, optimizer, scheduler, recorder)
        if not self.active:
            return LoopState()
        self._dataset = self._check_loader(batches)
        if self.resume_from is None:
            return LoopState()
        folder = self.resume_from
        if self.accelerator is not None:
            handle = self.accelerator.register_load_state_pre_hook(self._load_trainable_weights)
            try:
                self.accelerator.load_state(str(folder))
            finally:
                handle.remove()
        else:
            from safetensors.torch import load_file

            load_trainable_state(model, load_file(folder / WEIGHTS), str(folder / WEIGHTS))
            optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
        extra = torch.load(folder / "extra.pt", weights_only=True)
        if (extra["scheduler"] is None) != (scheduler is None):
            raise ValueError(f"checkpoint {folder} was written {'without' if scheduler else 'with'} a scheduler")
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
        if set(extra["objects"]) != set(self._objects):
            raise ValueError(f"checkpoint {folder} holds the objects {sorted(extra['objects'])}, this run registered "
                             f"{sorted(self._objects)}")
        for name, obj in self._objects.items():
            if isinstance(obj, dict):
                obj.clear()
                obj.update(extra["objects"][name])
            else:
                obj.load_state_dict(extra["objects"][name])
        self.restore_record(recorder)
        loop = torch.load(folder / f"loop_state_{self.rank}.pt", weights_only=True)
        set_rng_state(loop["rng"])
        self._resume, self._last_saved = loop, loop["step"]
        return LoopState(loop["step"], loop["epoch"], loop["batch"], list(loop["losses"]))

    def _check_loader(self, loader) -> ResumableDataset:
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, ResumableDataset):
            raise TypeError("checkpoints need the training DataLoader built over harness.ResumableDataset(dataset), "
                            f"got a {type(loader).__name__} over {type(dataset).__name__}")
        if loader.num_workers:
            raise ValueError(f"checkpoints need the training DataLoader's batches fetched in this process "
                             f"(num_workers=0), got num_workers={loader.num_workers}")
        if loader.batch_sampler is None:
            raise ValueError("checkpoints need a batching DataLoader (batch_size or batch_sampler set)")
        batch_sampler = loader.batch_sampler
        sampler = getattr(batch_sampler, "sampler", None) or getattr(getattr(batch_sampler, "batch_sampler", None),
                                                                     "sampler", None)
        generators = [getattr(loader, "generator", None), getattr(sampler, "generator", None)]
        self._generators = [g for i, g in enumerate(generators) if g is not None and g not in generators[:i]]
        return dataset

    def epoch(self, loader, epoch: int) -> Iterator:
        """The batches of epoch ``epoch`` of ``loader``, from where the run stands (the first epoch of a resumed run
        starts after the batches the checkpoint had consumed)."""
        if not self.active:
            yield from loader
            return
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            saved, self._resume = self._resume, None
            set_rng_state(saved["epoch_start_rng"])
            if len(saved["epoch_start_generators"]) != len(self._generators):
                raise ValueError(f"the checkpoint's data order has {len(saved['epoch_start_generators'])} "
                                 f"generators, this loader draws from {len(self._generators)}")
            for generator, state in zip(self._generators, saved["epoch_start_generators"]):
                generator.set_state(state)
            skip = saved["batch"]
            if skip:
                self._dataset.replay([*saved["prefetched_rng"], saved["rng"]])
        self._epoch, self._batch, self._epoch_length = epoch, skip, len(loader)
        self._epoch_start = {"rng": rng_state(), "generators": [g.get_state() for g in self._generators]}
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if skip:
            from accelerate import skip_first_batches

            loader = skip_first_batches(loader, skip)
        for batch in loader:
            self._dataset.end_replay()
            self._batch += 1
            self._consumed += 1
            yield batch

    def step_done(self, step: int, losses: list[float]) -> None:
        """After optimizer step ``step`` (logged and evaluated): save when it is a multiple of ``every``."""
        if self.every and step % self.every == 0:
            self._save(step, losses)

    def finish(self, step: int, losses: list[float]) -> None:
        """Training ended without diverging: save the final state unless it just was (then a run killed while
        evaluating or sampling redoes only that)."""
        if self.every and step > self._last_saved:
            self._save(step, losses)

    # -- saving
    def _loop_state(self, step: int, losses: list[float]) -> dict:
        state = {"step": step, "losses": list(losses), "rng": rng_state()}
        ahead = self._dataset.fetched_ahead(self._consumed)
        if self._batch == self._epoch_length:  # the epoch is done: the next one starts from here
            if ahead:
                raise RuntimeError("the loader fetched a batch of the next epoch before this one ended")
            return {**state, "epoch": self._epoch + 1, "batch": 0, "epoch_start_rng": state["rng"],
                    "epoch_start_generators": [g.get_state() for g in self._generators], "prefetched_rng": []}
        return {**state, "epoch": self._epoch, "batch": self._batch, "epoch_start_rng": self._epoch_start["rng"],
                "epoch_start_generators": self._epoch_start["generators"], "prefetched_rng": ahead}

    def _save(self, step: int, losses: list[float]) -> None:
        model, optimizer, scheduler, recorder = self._run
        staging = self.staging(step)
        if self.main:
            if staging.exists():  # a save of this step that was cut short
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        self._wait()
        if self.accelerator is not None:
            handle = self.accelerator.register_save_state_pre_hook(self._trainable_weights)
            try:
                self.accelerator.save_state(str(staging))
            finally:
                handle.remove()
        else:
            from safetensors.torch import save_file

            save_file(trainable_state(model), staging / WEIGHTS)
            torch.save(optimizer.state_dict(), staging / OPTIMIZER)
        torch.save(self._loop_state(step, losses), staging / f"loop_state_{self.rank}.pt")
        if self.main:
            objects = {name: dict(obj) if isinstance(obj, dict) else obj.state_dict()
                       for name, obj in self._objects.items()}
            torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None, "objects": objects},
                       staging / "extra.pt")
            self.write_run_files(staging, recorder)
        self._wait()
        if self.main:
            if recorder is not None and recorder.is_open:
                recorder.save()  # the record on disk is as far as the checkpoint, once that is complete
            self.seal(staging, step, kind="train_loop")
        self._wait()
        self._last_saved = step

    def _trainable_weights(self, models: list, weights: list, output_dir: str) -> None:
        """``accelerator.save_state`` pre-hook: each prepared model's trainable parameters, not its whole state."""
        for i, model in enumerate(models):
            weights[i] = trainable_state(self.accelerator.unwrap_model(model))

    def _load_trainable_weights(self, models: list, input_dir: str) -> None:
        """``accelerator.load_state`` pre-hook: load what :meth:`_trainable_weights` saved, checked by name and
        shape; accelerate then loads no model itself."""
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / (WEIGHTS if i == 0 else WEIGHTS.replace(".", f"_{i}."))
            load_trainable_state(self.accelerator.unwrap_model(model), load_file(path), str(path))
        models.clear()


# ------------------------------------------------------------------------------------------------ Trainer
class TrainerCheckpoints(RunCheckpoints):
    """The rules of :class:`RunCheckpoints` for a ``transformers.Trainer``, which saves ``checkpoint-<N>/`` itself
    (adapter weights, optimizer, scheduler, RNG and its state) and resumes with ``resume_from_checkpoint``
    (skipping the consumed batches of the epoch, whose order its seedable sampler derives from the seed and the
    epoch). Its own saves are not atomic, so :meth:`callback` completes each one (record so far, config, manifest
    last, ``latest``, the last ``keep`` kept), and :attr:`resume_from` names the latest *complete* one."""

    prefix = "checkpoint-"

    def __init__(self, folder: str | os.PathLike, **kwargs):
        super().__init__(folder, **kwargs)
        self._loss_before = 0.0  # the sum of the per-step training losses up to the checkpoint resumed from
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "trainer_state.json").read_text(encoding="utf-8"))
            logged = 0
            for entry in state["log_history"]:  # whole logging windows (training_arguments)
                if "loss" in entry and entry["step"] <= self.resumed_step:
                    self._loss_before += entry["loss"] * (entry["step"] - logged)
                    logged = entry["step"]

    def training_arguments(self, logging_steps: int, output_dir: str | os.PathLike) -> dict[str, Any]:
        """``TrainingArguments`` keywords: save every ``every`` steps into the run's folder, or nothing at all
        (then ``output_dir`` is the Trainer's folder).

        ``every`` must be a multiple of ``logging_steps``: the Trainer's loss accumulated since its last log is not
        part of a checkpoint, so a resume elsewhere would change the logged losses."""
        if not self.every:
            return {"save_strategy": "no", "output_dir": str(output_dir)}
        if self.every % logging_steps:
            raise ValueError(f"checkpoint.every={self.every} must be a multiple of train.logging_steps="
                             f"{logging_steps} (a checkpoint between two logs would lose the loss between them)")
        return {"save_strategy": "steps", "save_steps": self.every, "save_total_limit": None,
                "output_dir": str(self.folder)}

    def callback(self, recorder=None):
        """A ``TrainerCallback`` that completes each checkpoint the Trainer has just saved (``on_save``)."""
        from accelerate import PartialState
        from transformers import TrainerCallback

        checkpoints = self

        class _CompleteCheckpoint(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                folder = Path(args.output_dir) / f"{checkpoints.prefix}{state.global_step}"
                PartialState().wait_for_everyone()  # every process has written its part (its RNG state)
                if state.is_world_process_zero:
                    checkpoints.write_run_files(folder, recorder)
                    checkpoints.seal(folder, state.global_step, kind="trainer")
                PartialState().wait_for_everyone()

        return _CompleteCheckpoint()

    def run_training_loss(self, training_loss: float, global_step: int) -> float:
        """The mean training loss of the whole run from ``Trainer.train()``'s ``training_loss``, which for a resumed
        run is the mean over the steps after the checkpoint: the steps before it come from the checkpoint's log
        history (whole logging windows, as :meth:`training_arguments` ensures)."""
        if self.resume_from is None:
            return training_loss
        return (self._loss_before + training_loss * (global_step - self.resumed_step)) / max(global_step, 1)
