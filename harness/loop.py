"""The training loop the experiments share (:func:`train_loop`) and a ``transformers.Trainer`` callback that writes
the same run record (:func:`RecorderCallback`)."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from core import NonFiniteGradientError

from .checkpoint import Checkpointer, LoopState
from .records import RunRecorder

__all__ = ["train_loop", "mean_over_processes", "RecorderCallback", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became inf/nan (at optimizer step ``step``, when known)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def mean_over_processes(value: torch.Tensor, accelerator: Any = None) -> torch.Tensor:
    """The mean of ``value`` over the run's processes (all-reduced; ``value`` itself with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value, reduction="mean")


def _check_loop_arguments(max_steps: Any, epochs: Any, grad_clip: Any, eval_every: Any) -> None:
    """The loop's numbers, refused when they would train silently wrong: no step at all (``max_steps`` or
    ``epochs`` < 1), an ascent (a negative ``grad_clip`` flips every gradient in ``clip_grad_norm_``), an evaluation
    at every step (``eval_every`` < 1). A ``ValueError`` naming the argument and its value."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if max_steps is not None and not (whole(max_steps) and max_steps >= 1):
        raise ValueError(f"max_steps must be an integer >= 1 or None (all epochs), got {max_steps!r}")
    if not (whole(epochs) and epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and not isinstance(grad_clip, bool)
                                      and math.isfinite(grad_clip) and grad_clip > 0):
        raise ValueError(f"grad_clip must be a number > 0 or None (no clipping), got {grad_clip!r}")
    if eval_every is not None and not (whole(eval_every) and eval_every >= 1):
        raise ValueError(f"eval_every must be an integer >= 1 or None (no evaluation), got {eval_every!r}")


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    scheduler: Any = None,
    max_steps: int | None = None,
    epochs: int = 1,
    grad_clip: float | None = None,
    accelerator: Any = None,
    recorder: RunRecorder | None = None,
    desc: str = "train",
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    eval_every: int | None = None,
    stop_on_divergence: bool = False,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
) -> list[float]:
    """Train for ``epochs`` passes over ``batches`` (or ``max_steps`` steps); return the per-step losses.

    Each step: ``loss_fn(model, batch)``, backward (through ``accelerator`` when given), optional gradient-norm
    clipping, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad``. Logs ``loss``, ``lr``, ``time_s`` (the
    whole step) and ``opt_time_s`` (the optimizer step alone) to ``recorder``; ``eval_fn(step)`` every
    ``eval_every`` steps goes to ``recorder.log_metrics``, which rewrites a started record on disk. A non-finite loss
    or gradient raises :class:`TrainingDiverged` (with its ``step``), or with ``stop_on_divergence`` ends training
    and records ``diverged_at_step`` (what an LR sweep wants: the run is reported as diverged, not dropped).

    With several processes the step loss is the mean of the processes' losses, all-reduced before it is checked
    and logged, so every rank stops at the same step and returns the same losses; a ``loss_fn`` that normalises
    its rank's loss by the global batch's size makes that mean the loss of the global batch.

    With a ``checkpointer`` (:class:`harness.Checkpointer`) the run saves a checkpoint after every
    ``checkpointer.every``-th step (logged and evaluated) and after the last one, and a resumed run starts where its
    checkpoint stood: the returned losses are then those of the whole run.
    """
    _check_loop_arguments(max_steps, epochs, grad_clip, eval_every)
    total = max_steps if max_steps is not None else (epochs * len(batches) if hasattr(batches, "__len__") else None)
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    position = checkpointer.start(model, optimizer, batches, scheduler, recorder) if checkpointer else LoopState()
    losses, step = position.losses, position.step

    def done() -> bool:
        return max_steps is not None and step >= max_steps

    model.train()
    with tqdm(total=total, initial=step, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for epoch in range(position.epoch, epochs):
            if done():
                break
            for batch in checkpointer.epoch(batches, epoch) if checkpointer else batches:
                start = time.perf_counter()
                loss = loss_fn(model, batch)
                step_loss = mean_over_processes(loss.detach(), accelerator)  # what every rank logs and checks
                try:
                    if not torch.isfinite(step_loss):
                        raise TrainingDiverged(f"loss is {step_loss.item()} at step {step + 1}", step + 1)
                    accelerator.backward(loss) if accelerator is not None else loss.backward()
                    if grad_clip is not None:
                        clip = accelerator.clip_grad_norm_ if accelerator is not None else nn.utils.clip_grad_norm_
                        clip(params, grad_clip)
                    sync()
                    opt_start = time.perf_counter()
                    optimizer.step()
                    sync()
                    opt_time = time.perf_counter() - opt_start
                except (TrainingDiverged, NonFiniteGradientError) as err:
                    if not stop_on_divergence:
                        raise TrainingDiverged(f"training diverged at step {step + 1}: {err}", step + 1) from err
                    warnings.warn(f"training diverged at step {step + 1}, stopping: {err}", stacklevel=2)
                    if recorder is not None:
                        recorder.record.final_metrics["diverged_at_step"] = step + 1
                        if recorder.is_open:
                            recorder.save()
                    return losses
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss.item())
                if recorder is not None:
                    recorder.log_step(
                        step, loss=losses[-1], lr=optimizer.param_groups[0]["lr"],
                        time_s=time.perf_counter() - start, opt_time_s=opt_time,
                    )  # fmt: skip
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if eval_fn is not None and eval_every and step % eval_every == 0:
                    metrics = eval_fn(step)
                    model.train()
                    if recorder is not None:
                        recorder.log_metrics(step, **metrics)
                if checkpointer is not None:
                    checkpointer.step_done(step, losses)
                if done():
                    break
    if checkpointer is not None:
        checkpointer.finish(step, losses)
    return losses


def RecorderCallback(recorder: RunRecorder):
    """A ``transformers.TrainerCallback`` that writes the Trainer's loss, lr, eval metrics and step times; a started
    record is rewritten at every evaluation and every checkpoint the Trainer saves.

    A function, not a class, so that ``import harness`` does not import transformers: the callback's class is
    defined inside it.
    """
    from transformers import TrainerCallback

    class _RecorderCallback(TrainerCallback):
        def __init__(self):
            self.start = 0.0
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                time_s = statistics.median(self.times) if self.times else None
                self.times = []
                loss = logs["loss"]
                recorder.log_step(
                    state.global_step, loss=loss if math.isfinite(loss) else None,
                    lr=logs.get("learning_rate"), time_s=time_s,
                )  # fmt: skip
            evals = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_")}
            if evals:
                recorder.log_metrics(state.global_step, **evals)  # rewrites a started record

        def on_save(self, args, state, control, **kwargs):
            if recorder.is_open:  # the Trainer wrote a checkpoint: so does the record
                recorder.save()

    return _RecorderCallback()
