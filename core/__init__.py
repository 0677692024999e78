"""Riemannian preconditioned LoRA (Zhang & Pilanci, ICML 2024): pairing, preconditioner, optimizers, reference.

>>> from core import build_optimizer
>>> opt = build_optimizer(model, "scaled_adamw", lr=8e-4, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6)
"""

from .factory import HPARAMS, OPTIMIZER_NAMES, build_optimizer, trainer_optimizer
from .optimizers import NonFiniteGradientError, ScaledAdamW, ScaledGD, UnheldGradientWarning
from .pairing import LoraPair, LoraPairingError, find_lora_pairs
from .preconditioner import preconditioned_directions
from .reference import ScaledAdamWReference, ScaledGDReference

__all__ = [
    "build_optimizer", "trainer_optimizer", "OPTIMIZER_NAMES", "HPARAMS",
    "ScaledGD", "ScaledAdamW", "ScaledGDReference", "ScaledAdamWReference", "NonFiniteGradientError",
    "UnheldGradientWarning",
    "find_lora_pairs", "LoraPair", "LoraPairingError", "preconditioned_directions",
]  # fmt: skip
