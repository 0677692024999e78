"""Shared test set-up: never touch the hub, locate the shared data, keep CPU threads modest."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from harness import default_data_root  # noqa: E402

# The test models are tiny: one intra-op thread avoids OpenMP overhead (and thrashing on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real data (``$RPLORA_DATA`` or ``<repo>/../shared/data``); tests needing it skip without it."""
    root = default_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} is absent")
    return root
