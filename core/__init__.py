"""Riemannian preconditioned LoRA (Zhang & Pilanci, ICML 2024): pairing, preconditioner, optimizers.

>>> from core import build_optimizer
>>> opt = build_optimizer(model, "scaled_adamw", lr=8e-4, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6)
"""

from .factory import HPARAMS, OPTIMIZER_NAMES, PEER_NAMES, build_optimizer, trainer_optimizer
from .optimizers import LoraOptimizer, NonFiniteGradientError, ScaledAdamW, ScaledGD, adamw_update, sgd_update
from .pairing import PAIR_PATTERNS, LoraPair, LoraPairingError, find_lora_pairs
from .preconditioner import precondition_pair

__all__ = [
    "build_optimizer", "trainer_optimizer", "OPTIMIZER_NAMES", "PEER_NAMES", "HPARAMS",
    "ScaledGD", "ScaledAdamW", "LoraOptimizer", "NonFiniteGradientError", "adamw_update", "sgd_update",
    "find_lora_pairs", "LoraPair", "LoraPairingError", "PAIR_PATTERNS", "precondition_pair",
]  # fmt: skip
