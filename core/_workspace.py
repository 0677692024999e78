"""Scratch space that the batched preconditioner keeps from one optimizer step to the next: core's only speed
machinery that is not maths.

On CPU every large temporary tensor is fresh memory from the C allocator, and first touching its pages can cost
more than the arithmetic done in it at LoRA ranks. The batched path therefore writes its stacks and products into
buffers it keeps (:meth:`Workspace.empty`), keeps a buffer's per-pair views with it (:meth:`Workspace.views`) and
the bucketing of the pairs (:meth:`Workspace.memo`), which changes only with the set of gradients. CUDA's caching
allocator reuses memory by itself, so there buffers are allocated afresh. ``Workspace(reuse=False)`` keeps nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch import Tensor


class Workspace:
    """Named scratch buffers, their per-pair views and memoised values, kept while they still fit."""

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[str, Tensor] = {}
        self._views: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {}
        self._memo: dict[str, tuple[Hashable, Any]] = {}

    def empty(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor: on CPU the one of the last call with this name, if it has this shape and dtype."""
        if not self.reuse or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def views(self, name: str, buffer: Tensor, shape: tuple) -> tuple[Tensor, ...]:
        """``buffer`` (contiguous) cut along dim 0 into views of ``shape``, kept while ``buffer`` is the same tensor."""
        kept = self._views.get(name)
        if kept is not None and kept[0] is buffer:
            return kept[1]
        views = buffer.view(-1, *shape).unbind(0)
        if self.reuse and buffer.device.type == "cpu":
            self._views[name] = (buffer, views)
        return views

    def memo(self, name: str, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, computed again only when ``key`` differs from the last one given with ``name``."""
        kept = self._memo.get(name)
        if kept is not None and kept[0] == key:
            return kept[1]
        value = build()
        if self.reuse:
            self._memo[name] = (key, value)
        return value
