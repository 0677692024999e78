"""The width experiment: does the best learning rate of LoRA training move with the width n (Theorem 4.1)?

Theorem 4.1 of the paper: with the Riemannian preconditioner, Adam-type LoRA training learns features stably with
a learning rate Θ(1) as the width n grows, while plain Adam needs η_A = Θ(1/n) and η_B = Θ(1) (LoRA+). The
experiment fine-tunes the LoRA pair of a hidden layer of width n and sweeps ONE learning rate for A and B at every
width, so the best rate's slope against n on log-log axes is measured: ≈ 0 is width-independent, ≈ -1 is Θ(1/n).

Problem (a planted LoRA fine-tuning task; every feature is O(1) per coordinate at every width) ::

    inputs       x ~ N(0, I_d)                          (d = 16, a fixed full batch of N samples)
    first layer  h = √2 relu(U x),  U_ij ~ N(0, 1/d)    (frozen; h_i = O(1))
    hidden layer z = W0 h + s B A h, (W0)_ij ~ N(0, 1/n) (frozen W0; the LoRA pair A: r x n, B: n x r)
    readout      f = V (√2 relu(z)) / n,  V_ij ~ N(0, 1)  (frozen; µP's 1/n readout, k outputs)

The base network (B = 0) is the "pretrained" model; the task it is fine-tuned to is the same network with a rank-4
shift of the hidden weight, ``W* = W0 + P Qᵀ`` with ``P = Vᵀ C`` (``C_ij ~ N(0, 1/k)``, so the shift moves the
output) and ``Q_ij ~ N(0, 1/n)`` (so ``Qᵀh = O(1)``): the targets are ``y = f(W*)``, and the shift's features
``P Qᵀ h`` are O(1) per coordinate. The LoRA pair is initialized as PEFT does (A Kaiming-uniform, entries
O(1/√n); B = 0), with scaling ``s = alpha / r`` (rsLoRA: ``alpha / √r``). The loss is
``L = mean_samples ||f - y||² / 2``; a run reports ``L / L(B = 0)`` after a fixed number of full-batch steps. The
feature update it learned, ``‖s B A h‖ / √n`` (RMS over the batch), is Θ(1) under stable feature learning.

Studies (``conf/width.yaml``):

* ``width``: widths 128 ... 4096, every optimizer series at every learning rate of its log-spaced grid, 3 seeds;
* ``lora_scale``: one width, ranks r in {4, 16, 64} x alpha in {8, 32} and rsLoRA, AdamW and scaled AdamW: how the
  best learning rate moves with the LoRA scaling s.

Run (one record per run in ``results/width/``; records of finished runs are kept and skipped, so an interrupted
grid resumes where it stopped)::

    python main_figures/width.py                                   # both studies, 2 worker processes
    python main_figures/width.py studies=[width] workers=1         # one study, in this process
    python main_figures/width.py mode=single single.series=scaled_adamw_update single.lr=0.01 single.width=1024
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from harness import RunRecorder, build_optimizer  # noqa: E402

EXPERIMENT = "width"
STUDIES = ("width", "lora_scale")
FINISHED = ("done", "diverged")  # a record with one of these statuses is complete: the runner skips it
DTYPE = torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemSpec:
    """Everything that defines one problem instance (the LoRA rank and scaling are the model's, not the task's)."""

    width: int
    seed: int
    d: int = 16
    samples: int = 128
    outputs: int = 4
    shift_rank: int = 4


@dataclass
class Problem:
    """Frozen tensors of one instance: first-layer features, the base pre-activation, readout and targets."""

    spec: ProblemSpec
    h: Tensor  # N x n first-layer features (frozen), O(1) per coordinate
    z0: Tensor  # N x n pre-activations of the hidden layer with the base weight W0
    V: Tensor  # k x n readout
    y: Tensor  # N x k targets: the output of the shifted network W0 + P Qᵀ
    shift_features: Tensor  # N x n, the target's feature shift P Qᵀ h

    def output(self, z: Tensor) -> Tensor:
        """``f = V (√2 relu(z)) / n`` for pre-activations ``z`` (N x n)."""
        return math.sqrt(2.0) * torch.relu(z) @ self.V.T / self.spec.width

    def loss(self, z: Tensor) -> Tensor:
        """``mean_samples ||f(z) - y||² / 2``."""
        return (self.output(z) - self.y).square().sum(dim=1).mean() / 2


def _check_spec(spec: ProblemSpec) -> None:
    for key in ("width", "d", "samples", "outputs", "shift_rank"):
        value = getattr(spec, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"problem {key} must be a positive integer, got {value!r}")
    if spec.shift_rank > min(spec.width, spec.outputs * spec.width):
        raise ValueError(f"shift_rank {spec.shift_rank} exceeds the width {spec.width}")


@lru_cache(maxsize=2)  # a worker runs every learning rate of one instance in a row
def make_problem(spec: ProblemSpec) -> Problem:
    """Draw one instance (see the module docstring); the inputs depend on the seed only, the weights on both."""
    _check_spec(spec)
    n, d, k = spec.width, spec.d, spec.outputs
    data = torch.Generator().manual_seed(spec.seed)
    weights = torch.Generator().manual_seed(1_000_003 * spec.seed + n)
    x = torch.randn(spec.samples, d, generator=data, dtype=DTYPE)
    U = torch.randn(n, d, generator=weights, dtype=DTYPE) / math.sqrt(d)
    h = math.sqrt(2.0) * torch.relu(x @ U.T)
    W0 = torch.randn(n, n, generator=weights, dtype=DTYPE) / math.sqrt(n)
    z0 = h @ W0.T
    del W0
    V = torch.randn(k, n, generator=weights, dtype=DTYPE)
    P = V.T @ (torch.randn(k, spec.shift_rank, generator=weights, dtype=DTYPE) / math.sqrt(k))
    Q = torch.randn(n, spec.shift_rank, generator=weights, dtype=DTYPE) / math.sqrt(n)
    shift = (h @ Q) @ P.T
    problem = Problem(spec, h, z0, V, torch.empty(0), shift)
    problem.y = problem.output(z0 + shift)
    return problem


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or rsLoRA's ``alpha / √r``."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"the LoRA alpha must be > 0, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


class LoraHidden(nn.Module):
    """The hidden layer's LoRA pair, PEFT-named (``lora_A.default`` / ``lora_B.default``) and PEFT-initialized;
    ``forward(h, z0) = z0 + s B A h`` (the frozen ``W0 h`` is precomputed as ``z0``)."""

    def __init__(self, width: int, rank: int, scaling: float, seed: int):
        super().__init__()
        self.scaling = float(scaling)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(width, rank, bias=False, dtype=DTYPE)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, width, bias=False, dtype=DTYPE)})
        with torch.no_grad():
            bound = 1.0 / math.sqrt(width)  # = kaiming_uniform_(a=√5), PEFT's init of A
            g = torch.Generator().manual_seed(seed)
            self.lora_A["default"].weight.copy_(torch.rand(rank, width, generator=g, dtype=DTYPE) * 2 * bound - bound)
            self.lora_B["default"].weight.zero_()

    def delta(self, h: Tensor) -> Tensor:
        """The LoRA features ``s B A h`` (N x n)."""
        return self.scaling * self.lora_B["default"](self.lora_A["default"](h))

    def forward(self, h: Tensor, z0: Tensor) -> Tensor:
        return z0 + self.delta(h)


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One run: the problem, the LoRA shape, the optimizer series and its learning rate."""

    study: str
    spec: ProblemSpec
    series: str
    lr: float
    rank: int = 4
    alpha: float = 4.0
    rslora: bool = False

    @property
    def run_name(self) -> str:
        lora = f"_r{self.rank}_a{self.alpha:g}{'_rs' if self.rslora else ''}" if self.study == "lora_scale" else ""
        return f"{self.study}_{self.series}_n{self.spec.width}{lora}_lr{self.lr:.4g}_seed{self.spec.seed}"

    def tags(self, optim: dict) -> dict:
        tags = {"study": self.study, "width": self.spec.width, "optimizer": optim["name"],
                "variant": optim.get("variant", ""), "series": self.series, "lr": self.lr, "seed": self.spec.seed}
        if self.study == "lora_scale":
            tags.update(rank=self.rank, alpha=self.alpha, rslora=self.rslora)
        return tags  # fmt: skip


@dataclass
class RunResult:
    status: str  # done | diverged
    steps: int
    initial_loss: float
    relative_loss: float  # L / L(B = 0) at the end (inf / nan when diverged)
    min_relative_loss: float
    feature_update_rms: float  # ‖s B A h‖ / √n, RMS over the batch, at the end
    feature_update_rms_b: float  # the part of B's learning: ‖s B A0 h‖ / √n
    feature_update_rms_a: float  # the part of A's learning: ‖s B (A - A0) h‖ / √n

    def metrics(self) -> dict:
        return {
            "relative_loss": self.relative_loss,
            "min_relative_loss": self.min_relative_loss,
            "initial_loss": self.initial_loss,
            "feature_update_rms": self.feature_update_rms,
            "feature_update_rms_b": self.feature_update_rms_b,
            "feature_update_rms_a": self.feature_update_rms_a,
            "steps": self.steps,
            "diverged": self.status == "diverged",
        }


def _rms(t: Tensor) -> float:
    return t.square().mean().sqrt().item()


def run_one(
    problem: Problem, job: Job, optim: dict, *, steps: int, diverge_at: float, log_every: int = 10,
    recorder: RunRecorder | None = None,
) -> RunResult:  # fmt: skip
    """``steps`` full-batch steps of ``harness.build_optimizer(model, **optim, lr=job.lr)``; stops early (diverged)
    when the relative loss is non-finite or exceeds ``diverge_at``, or the optimizer meets a non-finite gradient."""
    model = LoraHidden(problem.spec.width, job.rank, lora_scaling(job.rank, job.alpha, job.rslora), problem.spec.seed)
    A0 = model.lora_A["default"].weight.detach().clone()
    optimizer = build_optimizer({"hidden": model}, **{**optim, "lr": job.lr})  # names hidden.lora_A.default...
    with torch.no_grad():
        loss0 = problem.loss(problem.z0).item()
    best, status, step = math.inf, "done", 0
    while True:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(model(problem.h, problem.z0))
        rel = loss.item() / loss0
        if not math.isfinite(rel) or rel > diverge_at:
            status = "diverged"
        best = min(best, rel) if math.isfinite(rel) else best
        last = status == "diverged" or step == steps
        time_s = None
        if not last:
            loss.backward()
            try:
                optimizer.step()
            except (FloatingPointError, torch.linalg.LinAlgError):  # a non-finite gradient / singular Gram matrix
                status, last = "diverged", True
            time_s = time.perf_counter() - start
        if recorder is not None and (step % log_every == 0 or last):
            recorder.log_step(step, loss=loss.item(), rel_loss=rel, lr=job.lr, time_s=time_s)
        if last:
            break
        step += 1
    with torch.no_grad():
        A, B = model.lora_A["default"].weight, model.lora_B["default"].weight
        s, h = model.scaling, problem.h
        rms = (_rms(model.delta(h)), _rms(s * (h @ A0.T) @ B.T), _rms(s * (h @ (A - A0).T) @ B.T))
    return RunResult(status, step, loss0, rel, best, *rms)


# ----------------------------------------------------------------------------------------------------------------
# The grid: jobs, records, workers
# ----------------------------------------------------------------------------------------------------------------


def lr_grid(spec: dict) -> list[float]:
    """``points`` learning rates log-spaced from ``low`` to ``high`` (both included)."""
    low, high, points = float(spec["low"]), float(spec["high"]), int(spec["points"])
    if not (0 < low < high) or points < 2:
        raise ValueError(f"an lr grid needs 0 < low < high and points >= 2, got {dict(spec)!r}")
    step = math.log10(high / low) / (points - 1)
    return [float(f"{low * 10 ** (i * step):.4g}") for i in range(points)]


def _series_optim(cfg: dict, series: str) -> dict:
    if series not in cfg["series"]:
        raise ValueError(f"unknown optimizer series '{series}'; the config defines {sorted(cfg['series'])}")
    return dict(cfg["series"][series])


def grid_jobs(cfg: dict) -> list[Job]:
    """Every run of the studies in ``cfg['studies']``; unknown studies, series or bad grids raise first."""
    unknown = [s for s in cfg["studies"] if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown stud(ies) {unknown}; expected some of {list(STUDIES)}")
    problem = dict(cfg["problem"])
    jobs = []
    if "width" in cfg["studies"]:
        study = cfg["width_study"]
        for width in study["widths"]:
            for seed in study["seeds"]:
                spec = ProblemSpec(int(width), int(seed), **problem)
                for series in study["series"]:
                    _series_optim(cfg, series)
                    jobs += [Job("width", spec, series, lr, study["rank"], float(study["alpha"]))
                             for lr in lr_grid(cfg["lr_grid"][series])]  # fmt: skip
    if "lora_scale" in cfg["studies"]:
        study = cfg["lora_scale_study"]
        for seed in study["seeds"]:
            spec = ProblemSpec(int(study["width"]), int(seed), **problem)
            for rank in study["ranks"]:
                for alpha, rslora in [(float(a), False) for a in study["alphas"]] + [
                    (float(a), True) for a in study["rslora_alphas"]
                ]:
                    for series in study["series"]:
                        _series_optim(cfg, series)
                        jobs += [Job("lora_scale", spec, series, lr, int(rank), alpha, rslora)
                                 for lr in lr_grid(study["lr_grid"][series])]  # fmt: skip
    for job in jobs:
        _check_spec(job.spec)
        lora_scaling(job.rank, job.alpha, job.rslora)
    return jobs


def record_path(results_dir: str | Path, job: Job) -> Path:
    return Path(results_dir) / EXPERIMENT / f"{job.run_name}.json"


def is_finished(path: Path) -> bool:
    """Whether ``path`` holds the record of a finished run (status done or diverged); a partial file is not."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status") in FINISHED
    except ValueError:  # not valid JSON: the run is redone and the file replaced by a complete record
        return False


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return True


def run_job(cfg: dict, job: Job) -> tuple[Path, RunResult | None]:
    """Run one job and write its record, or skip it (``None``) when a finished record exists."""
    path = record_path(cfg["results_dir"], job)
    if is_finished(path):
        return path, None
    if path.is_file() and not _is_json(path):  # a damaged file is kept beside, never overwritten, and reported
        damaged = path.with_name(path.name + ".damaged")
        os.replace(path, damaged)
        print(f"warning: {path} was not valid JSON; kept as {damaged}, the run is redone", file=sys.stderr)
    optim = _series_optim(cfg, job.series)
    name = optim.pop("name")
    config = {k: cfg[k] for k in ("problem", "steps", "diverge_at", "threads")}
    config.update(study=job.study, width=job.spec.width, seed=job.spec.seed, rank=job.rank, alpha=job.alpha,
                  rslora=job.rslora, series=job.series, optim={"name": name, **optim, "lr": job.lr})  # fmt: skip
    recorder = RunRecorder(cfg["results_dir"], EXPERIMENT, name, {**optim, "lr": job.lr}, seed=job.spec.seed,
                           config=config, tags=job.tags({"name": name, **optim}), run_name=job.run_name,
                           wandb=cfg.get("wandb"))  # fmt: skip
    result = run_one(make_problem(job.spec), job, {"name": name, **optim}, steps=cfg["steps"],
                     diverge_at=cfg["diverge_at"], log_every=cfg["log_every"], recorder=recorder)  # fmt: skip
    recorder.record.status = result.status
    return recorder.finish(final_metrics=result.metrics()), result


def _run_chunk(cfg: dict, jobs: list[Job]) -> list[tuple[Path, RunResult | None]]:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    return [run_job(cfg, job) for job in jobs]


def chunks(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by (study, problem, series), the largest widths first (workers share the load evenly and
    each builds a problem once for all of its learning rates)."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.study, job.spec, job.series, job.rank, job.alpha, job.rslora), []).append(job)
    return sorted(groups.values(), key=lambda g: (-g[0].spec.width, g[0].spec.seed))


def run_grid(cfg: dict) -> list[tuple[Path, RunResult | None]]:
    """Every job of the studies, in ``cfg['workers']`` processes (1: this one); returns (record, result or None
    when skipped) per job."""
    jobs = grid_jobs(cfg)
    todo = [j for j in jobs if not is_finished(record_path(cfg["results_dir"], j))]
    print(f"width experiment: {len(jobs)} runs, {len(jobs) - len(todo)} already recorded, {len(todo)} to run")
    workers = int(cfg["workers"])
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    out = []
    bar = tqdm(total=len(todo), desc="width", unit="run")
    if workers == 1:
        for chunk in chunks(todo):
            out += _run_chunk(cfg, chunk)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for chunk_out in pool.map(_run_chunk, [cfg] * len(chunks(todo)), chunks(todo)):
                out += chunk_out
                bar.update(len(chunk_out))
    bar.close()
    print(f"records in {Path(cfg['results_dir']) / EXPERIMENT}")
    return out


def single_job(cfg: dict) -> Job:
    s = cfg["single"]
    spec = ProblemSpec(int(s["width"]), int(s["seed"]), **cfg["problem"])
    return Job(s["study"], spec, s["series"], float(s["lr"]), int(s["rank"]), float(s["alpha"]), bool(s["rslora"]))


def run(cfg: DictConfig | dict) -> Any:
    """``mode=grid``: every run of ``studies``; ``mode=single``: the run of ``single`` (returns its result)."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["mode"] == "grid":
        return run_grid(cfg)
    if cfg["mode"] == "single":
        job = single_job(cfg)
        _series_optim(cfg, job.series)
        path, result = run_job(cfg, job)
        print(f"{job.run_name}: {result if result else 'already recorded'} -> {path}")
        return result
    raise ValueError(f"mode must be 'grid' or 'single', got {cfg['mode']!r}")


@hydra.main(config_path="conf", config_name="width", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    """Hydra entry point (see the module docstring)."""
    return run(cfg)


if __name__ == "__main__":
    main()
