"""One run as several processes (``torchrun``, ``accelerate launch``): the launch checked before anything is loaded,
the accelerator set up for it, and what the run's record says about it.

>>> accelerator = make_accelerator()           # DDP over gloo when torchrun starts several processes on a CPU
>>> launch = launch_info(accelerator.num_processes, batch_per_process=8)   # {} for one process
>>> recorder = RunRecorder(..., tags=record_tags(tags, launch), launch=launch)

The launches that start several processes, and what each sets: ``torchrun --nproc_per_node N`` and
``accelerate launch --multi_gpu --num_processes N`` (``torch.distributed.run``) set ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. A submitit job with several tasks (``hydra.launcher.tasks_per_node=N``) starts N processes that
know their task numbers only (``SUBMITIT_*`` / ``SLURM_*``): :func:`check_launch` exports torch's variables from
them (``submitit.helpers.TorchDistributedEnvironment``), so the tasks train as one run.
``accelerate launch --cpu --num_processes N`` does not: with ``--cpu`` accelerate always takes its simple launcher,
which starts one process (several only through ``--mpirun_hostfile``) and sets ``MASTER_ADDR`` / ``MASTER_PORT``
for an MPI launcher it did not start. On a machine without CUDA, accelerate sets up
``torch.distributed`` only when told to run on the CPU (``Accelerator(cpu=True)`` or ``ACCELERATE_USE_CPU``);
otherwise every process trains alone.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["launched_world_size", "join_submitit_tasks", "check_launch", "needs_cpu_backend", "make_accelerator",
           "launch_info", "record_tags"]  # fmt: skip

_MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_WORKING_LAUNCHES = ("torchrun --nproc_per_node N SCRIPT ... (or accelerate launch --multi_gpu --num_processes N "
                    "SCRIPT ...; on a machine without CUDA the script runs them over gloo on the CPU)")


def launched_world_size() -> int:
    """How many processes the launcher started for this run (``WORLD_SIZE``, or MPI's; 1 when not launched)."""
    for key in ("WORLD_SIZE",) + _MPI_WORLD_SIZES:
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def join_submitit_tasks() -> None:
    """Inside a submitit job with several tasks and no ``WORLD_SIZE``: export ``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` from the job's task numbers."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or os.environ.get("WORLD_SIZE"):
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        # each task keeps every GPU of its node visible: accelerate picks cuda:LOCAL_RANK
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def check_launch() -> int:
    """Stop on a launch that would not run what was asked for; return the number of processes it started.

    ``accelerate launch --cpu --num_processes N`` (N > 1) starts one process that trains alone with one process'
    batch: that is a ``RuntimeError`` naming the launches that work, before anything is loaded. The tasks of a
    submitit job are joined first (:func:`join_submitit_tasks`).
    """
    join_submitit_tasks()
    world_size = launched_world_size()
    started_by_accelerate_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world_size == 1 and started_by_accelerate_cpu and os.environ.get("MASTER_PORT"):
        raise RuntimeError(
            "this process was started alone by `accelerate launch --cpu` with several processes asked for "
            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')!r}, MASTER_PORT={os.environ['MASTER_PORT']!r}, no "
            "WORLD_SIZE): accelerate's --cpu launcher starts one process whatever --num_processes says, so it would "
            f"train alone. Start N processes with {_WORKING_LAUNCHES}; for one process, drop --num_processes "
            "(or unset MASTER_PORT)"
        )
    return world_size


def needs_cpu_backend() -> bool:
    """Several processes on a machine without CUDA: accelerate must run them on the CPU (gloo) to join them."""
    return launched_world_size() > 1 and not torch.cuda.is_available()


def make_accelerator(**kwargs: Any):
    """``accelerate.Accelerator(**kwargs)`` for the processes the launcher started, or a clear error.

    Under ``torchrun`` on a machine without CUDA it passes ``cpu=True`` (DDP over gloo) where accelerate would
    otherwise let every process train alone; a set-up whose process count differs from the launch's (e.g.
    ``ACCELERATE_USE_CPU=false`` forced on such a machine) is a ``RuntimeError``.
    """
    from accelerate import Accelerator

    world_size = check_launch()
    if needs_cpu_backend():
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"the launcher started {world_size} processes but accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone and write the same record. Start them with "
            f"{_WORKING_LAUNCHES}"
        )
    return accelerator


def launch_info(world_size: int, batch_per_process: int, grad_accum: int = 1) -> dict[str, int]:
    """The record's ``launch`` entry (hashed into its default name): with several processes, their number, the batch
    each takes a micro-step and the global batch a step; ``{}`` for one process, whose batch is its config's, so a
    one-process record's name and content stay those of a run recorded before ``launch`` existed."""
    if int(world_size) == 1:
        return {}
    return {"world_size": int(world_size), "batch_per_process": int(batch_per_process), "grad_accum": int(grad_accum),
            "global_batch": int(world_size) * int(batch_per_process) * int(grad_accum)}


def record_tags(tags: dict[str, Any], launch: dict[str, int]) -> dict[str, Any]:
    """The run's tags, with ``world_size`` added when it ran as several processes: its default run name then
    differs from the one-process run's (whose record it would otherwise replace); a one-process run's tags and
    name stay as they are."""
    if "world_size" in tags:
        raise ValueError(f"tags.world_size={tags['world_size']!r} is set by the launch, not the config: remove it")
    return {**tags, "world_size": launch["world_size"]} if launch.get("world_size", 1) > 1 else dict(tags)
