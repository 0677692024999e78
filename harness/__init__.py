"""What the experiments share, layered above :mod:`core` (which never imports it): run records, the training loop,
checkpoints, paths, config resolvers, seeding, the peer optimizers; :mod:`harness.diffusion` holds the Stable
Diffusion pipeline.

>>> from harness import RunRecorder, build_optimizer, train_loop
>>> optimizer = build_optimizer(model, "loraplus", lr=2e-4)   # a peer, or one of the paper's four via core

Importing it registers the ``${repo_root:}``, ``${data_root:}`` and ``${package_dir:NAME}`` config resolvers
(:mod:`harness.resolvers`). It imports no model library (transformers, PEFT, diffusers): the modules that need one
import it where it is used, or live in :mod:`harness.diffusion`.
"""

from .checkpoint import (
    Checkpointer, ResumableDataset, RunCheckpoints, TrainerCheckpoints, checkpoint_folder, trainable_state,
)  # fmt: skip
from .distributed import check_launch, launch_info, make_accelerator, needs_cpu_backend, record_tags
from .experiments import load_module
from .loop import RecorderCallback, TrainingDiverged, train_loop
from .optimizers import ALL_OPTIMIZERS, HPARAMS, OPTIMIZER_NAMES, PEER_NAMES, build_optimizer, trainer_optimizer
from .paths import REPO_ROOT, default_data_root, is_local_path, require_path, require_writable_folder
from .peers import build_peer
from .records import (
    SCHEMA_VERSION, RecordLockedError, RunInterrupted, RunRecord, RunRecorder, config_hash, default_run_name,
    hardware_info, load_records, skip_finished,
)  # fmt: skip
from .resolvers import register_resolvers
from .seeding import seed_everything
from .settings import RUN_RULES, TRAINING_RULES, Rule, check_settings

register_resolvers()

__all__ = [
    "build_optimizer", "trainer_optimizer", "OPTIMIZER_NAMES", "PEER_NAMES", "ALL_OPTIMIZERS", "HPARAMS", "build_peer",
    "RunRecorder", "RunRecord", "load_records", "hardware_info", "default_run_name", "config_hash", "SCHEMA_VERSION",
    "RecordLockedError", "RunInterrupted", "skip_finished",
    "train_loop", "RecorderCallback", "TrainingDiverged",
    "make_accelerator", "check_launch", "needs_cpu_backend", "launch_info", "record_tags",
    "Checkpointer", "TrainerCheckpoints", "RunCheckpoints", "ResumableDataset", "checkpoint_folder", "trainable_state",
    "REPO_ROOT", "default_data_root", "require_path", "require_writable_folder", "is_local_path", "register_resolvers",
    "seed_everything", "load_module", "Rule", "check_settings", "RUN_RULES", "TRAINING_RULES",
]  # fmt: skip
