"""Find LoRA factor pairs in a model, by module name (never by parameter position).

A LoRA pair is a down-projection ``A`` (r x n) and an up-projection ``B`` (m x r) whose product ``B @ A`` is the
low-rank update of one weight. The naming conventions recognised (see :data:`PAIR_PATTERNS`):

=====================================  =======================================  =======================================
convention                             A parameter                              B parameter
=====================================  =======================================  =======================================
PEFT Linear / Conv / several adapters  ``<module>.lora_A.<adapter>.weight``     ``<module>.lora_B.<adapter>.weight``
PEFT Embedding                         ``<module>.lora_embedding_A.<adapter>``  ``<module>.lora_embedding_B.<adapter>``
diffusion LoRA (kohya, Mix-of-Show)    ``<module>.lora_down.weight``            ``<module>.lora_up.weight``
loralib (incl. ``MergedLinear``)       ``<module>.lora_A``                      ``<module>.lora_B``
=====================================  =======================================  =======================================

Convolutions are flattened: a k x k ``A`` weight of shape (r, c_in, k, k) is the matrix (r, c_in k k), a 1 x 1
``B`` weight of shape (c_out, r, 1, 1) is (c_out, r). A merged pair (loralib's ``MergedLinear``, e.g. q and v of
GPT-2's fused ``c_attn``) holds ``k`` independent blocks: A is (k r, n), B is (k m, r) and block i is
``B[i m:(i+1) m] @ A[i r:(i+1) r]``. The block count is read from the module's ``enable_lora`` (loralib, number of
``True`` entries) or ``lora_num_blocks`` attribute; each block gets its own r x r preconditioner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = ["LoraPair", "PAIR_PATTERNS", "find_lora_pairs", "LoraPairingError"]


class LoraPairingError(ValueError):
    """A LoRA factor without its partner, or factors whose shapes do not chain."""


# (regex, role). The named groups `module` and `adapter` identify the pair; the role says which factor it is.
PAIR_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), role)
    for pattern, role in [
        (r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$", "A"),
        (r"^(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.weight$", "B"),
        (r"^(?P<module>.+)\.lora_embedding_A\.(?P<adapter>[^.]+)$", "A"),
        (r"^(?P<module>.+)\.lora_embedding_B\.(?P<adapter>[^.]+)$", "B"),
        (r"^(?P<module>.+)\.lora_down(?P<adapter>)\.weight$", "A"),
        (r"^(?P<module>.+)\.lora_up(?P<adapter>)\.weight$", "B"),
        (r"^(?P<module>.+)\.lora_A(?P<adapter>)$", "A"),
        (r"^(?P<module>.+)\.lora_B(?P<adapter>)$", "B"),
    ]
)


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One LoRA pair: ``A`` (r x n, or k r x n for ``blocks`` = k merged blocks) and ``B`` (m x r, or k m x r)."""

    name: str  # "<module>" or "<module>[<adapter>]"
    a_name: str
    b_name: str
    A: torch.Tensor
    B: torch.Tensor
    blocks: int = 1

    @property
    def rank(self) -> int:
        """The rank r of one block."""
        return self.B.shape[1]


def _as_matrix_shape(t: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of the factor seen as a matrix (conv kernels flattened)."""
    if t.dim() < 2:
        raise LoraPairingError(f"LoRA factor of shape {tuple(t.shape)} is not a matrix")
    return t.shape[0], t[0].numel()


def _block_count(model: nn.Module, module_name: str) -> int:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:  # the factor is a Parameter of a container that is not a module (ParameterDict)
        return 1
    enable = getattr(module, "enable_lora", None)
    if enable is not None:
        return max(1, sum(bool(e) for e in enable))
    return int(getattr(module, "lora_num_blocks", 1))


def check_pair(name: str, A: torch.Tensor, B: torch.Tensor, blocks: int = 1) -> None:
    """Raise :class:`LoraPairingError` unless ``B @ A`` chains for ``blocks`` merged blocks."""
    (a_rows, _), (b_rows, r) = _as_matrix_shape(A), _as_matrix_shape(B)
    if blocks < 1:
        raise LoraPairingError(f"LoRA pair '{name}': blocks must be >= 1, got {blocks}")
    if B.dim() > 2 and B[0, 0].numel() != 1:
        raise LoraPairingError(
            f"LoRA pair '{name}': B of shape {tuple(B.shape)} is not a 1x1 convolution; only A may have a kernel"
        )
    if a_rows != blocks * r or b_rows % blocks:
        raise LoraPairingError(
            f"LoRA pair '{name}': shapes do not chain: A {tuple(A.shape)} (rows {a_rows}) and B {tuple(B.shape)} "
            f"(columns {r}) with {blocks} block(s); expected A rows == blocks * B columns and B rows divisible by "
            f"blocks"
        )
    if A.dtype != B.dtype or A.device != B.device:
        raise LoraPairingError(f"LoRA pair '{name}': A is {A.dtype} on {A.device} but B is {B.dtype} on {B.device}")


def find_lora_pairs(
    model: nn.Module, patterns: Iterable[tuple[re.Pattern[str], str]] = PAIR_PATTERNS, trainable_only: bool = True
) -> list[LoraPair]:
    """Return the LoRA pairs of ``model`` in ``named_parameters`` order.

    Only trainable factors are considered (``trainable_only``), so frozen adapters of a multi-adapter model are
    ignored. Raises :class:`LoraPairingError` naming the module when a trainable factor has no trainable partner
    or when the shapes of a pair do not chain.
    """
    found: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    patterns = tuple(patterns)
    for param_name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        for pattern, role in patterns:
            match = pattern.match(param_name)
            if match:
                key = (match["module"], match["adapter"])
                slot = found.setdefault(key, {})
                if role in slot:
                    raise LoraPairingError(
                        f"LoRA module '{key[0]}' has two {role} factors: '{slot[role][0]}' and '{param_name}'"
                    )
                slot[role] = (param_name, param)
                break

    pairs = []
    for (module_name, adapter), slot in found.items():
        name = f"{module_name}[{adapter}]" if adapter else module_name
        if set(slot) != {"A", "B"}:
            have, missing = next(iter(slot.items())), ({"A", "B"} - set(slot)).pop()
            raise LoraPairingError(
                f"unpaired LoRA factor in module '{name}': found {have[0]} ('{have[1][0]}') but no trainable "
                f"{missing} factor"
            )
        (a_name, A), (b_name, B) = slot["A"], slot["B"]
        blocks = _block_count(model, module_name)
        check_pair(name, A, B, blocks)
        pairs.append(LoraPair(name, a_name, b_name, A, B, blocks))
    return pairs
