"""The paper's theory experiment: LoRA fine-tuning of a two-layer ReLU network in its convex parameterization.

Problem. The gated-ReLU convex form of a two-layer ReLU network (Pilanci & Ergen, 2020) fixes activation patterns
``D_i = diag(1[X u_i >= 0])`` from sampled directions ``u_i`` (i = 1..P) and predicts ::

    f(W; X) = sum_i D_i X w_i            (w_i = row i of the P x d weight W)

Fine-tuning starts from a pretrained ``W0`` and fits targets ``y = f(W0 + dW*)`` of a rank-r update ``dW*`` with
a LoRA pair, ``W = W0 + B A`` (A: r x d, B: P x r), on ``L(A, B) = ||f(W0 + BA) - y||² / (2n)``. ``dW -> f(dW)``
is linear, so this is low-rank matrix sensing, the setting of scaled GD (Tong, Ma & Chi, 2021) that the paper's
convergence result builds on: from the spectral initialization, scaled GD ``A -= lr (BᵀB)⁻¹∇A, B -= lr ∇B
(AAᵀ)⁻¹`` converges at a rate independent of the condition number ``kappa`` of ``dW*``, while GD slows down
linearly in ``kappa``.

Two studies (``conditioning``):

* ``target``: ``X`` perfectly conditioned, ``dW*`` with singular values geometric from 1 to 1/kappa -- the
  ill-conditioning the preconditioner removes (the theory's setting);
* ``data``: ``X`` with condition number kappa, ``dW*`` well conditioned -- a contrast: an r x r preconditioner
  cannot undo ill-conditioned inputs, and both methods slow down.

Step sizes are never hand-picked per case: every optimizer runs every step size of its grid (``lr_grid`` in
``conf/theory.yaml``) and :mod:`main_figures.theory_figures` reports, per (optimizer, kappa), the best of the grid.

Run the grid (150 runs, then the sensitivity study: the grid from 3 perturbed starts, 450 runs; writes
``results/theory/*.json``; about 20 minutes on one CPU core)::

    python main_figures/theory.py
    python main_figures/theory.py mode=single optim=sgd optim.lr=0.5 kappa=1000     # one run
    python main_figures/theory.py -m mode=single optim.lr=0.25,0.5 kappa=10,100     # a Hydra sweep
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core import build_optimizer  # noqa: E402
from harness import Rule, RunRecorder, check_settings  # noqa: E402

EXPERIMENT = "theory"
CONF_DIR = Path(__file__).resolve().parent / "conf"
CONDITIONINGS = ("target", "data")
DTYPE = torch.float64  # relative losses down to 1e-12 need double precision


# ----------------------------------------------------------------------------------------------------------------
# The problem (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def geometric_spectrum(kappa: float, k: int) -> Tensor:
    """``k`` singular values from 1 down to ``1/kappa``, equally spaced in log scale (``[1]`` when k = 1)."""
    if not kappa >= 1:
        raise ValueError(f"the condition number kappa must be >= 1, got {kappa!r}")
    return torch.logspace(0.0, -math.log10(kappa), k, dtype=DTYPE) if k > 1 else torch.ones(1, dtype=DTYPE)


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def activation_patterns(X: Tensor, directions: Tensor) -> Tensor:
    """The ReLU arrangement patterns as an ``n x P`` 0/1 matrix: column i is the diagonal of ``D_i``."""
    return (X @ directions >= 0).to(X.dtype)


def convex_relu(X: Tensor, patterns: Tensor, W: Tensor) -> Tensor:
    """``sum_i D_i X w_i`` for the P x d weight ``W`` (row i = w_i): the convex two-layer ReLU network's output."""
    return ((X @ W.T) * patterns).sum(dim=1)


def convex_relu_adjoint(X: Tensor, patterns: Tensor, residual: Tensor) -> Tensor:
    """The adjoint of ``W -> convex_relu(X, patterns, W)`` applied to a vector of n residuals (a P x d matrix)."""
    return (patterns * residual[:, None]).T @ X


@dataclass
class Problem:
    """One fine-tuning problem: inputs, activation patterns, pretrained weight, target update and targets."""

    X: Tensor  # n x d inputs
    patterns: Tensor  # n x P, column i = diag(D_i)
    W0: Tensor  # P x d pretrained weight
    delta_star: Tensor  # P x d target update of rank r
    y: Tensor  # n targets f(W0 + delta_star)
    kappa: float
    conditioning: str
    rank: int
    meta: dict = field(default_factory=dict)

    def loss(self, W: Tensor) -> Tensor:
        """``||f(W) - y||² / (2n)``."""
        residual = convex_relu(self.X, self.patterns, W) - self.y
        return residual.square().sum() / (2 * self.X.shape[0])


def make_problem(
    kappa: float, *, n: int, d: int, neurons: int, rank: int, seed: int, conditioning: str = "target"
) -> Problem:
    """Build the problem with condition number ``kappa`` in the target update (``target``) or the inputs (``data``).

    ``X = sqrt(n) U diag(s) Vᵀ`` with ``s = 1`` (target) or geometric from 1 to 1/kappa (data); the patterns come
    from P Gaussian directions; ``dW* = U_r diag(sigma) V_rᵀ`` with sigma geometric from 1 to 1/kappa (target) or
    all ones (data); ``W0`` is Gaussian with variance 1/d.
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if not 1 <= rank <= min(neurons, d):
        raise ValueError(f"rank must be between 1 and min(neurons, d) = {min(neurons, d)}, got {rank}")
    if n < d:
        raise ValueError(f"need at least as many samples as input dimensions (n >= d), got n={n}, d={d}")
    g = torch.Generator().manual_seed(int(seed))
    data_kappa, target_kappa = (kappa, 1.0) if conditioning == "data" else (1.0, kappa)
    s = geometric_spectrum(data_kappa, d)
    X = math.sqrt(n) * random_orthonormal(n, d, g) @ torch.diag(s) @ random_orthonormal(d, d, g).T
    patterns = activation_patterns(X, torch.randn(d, neurons, generator=g, dtype=DTYPE))
    W0 = torch.randn(neurons, d, generator=g, dtype=DTYPE) / math.sqrt(d)
    sigma = geometric_spectrum(target_kappa, rank)
    delta_star = random_orthonormal(neurons, rank, g) @ torch.diag(sigma) @ random_orthonormal(d, rank, g).T
    y = convex_relu(X, patterns, W0 + delta_star)
    meta = {"data_kappa": data_kappa, "target_kappa": target_kappa, "active_fraction": patterns.mean().item()}
    return Problem(X, patterns, W0, delta_star, y, float(kappa), conditioning, rank, meta)


def spectral_init(problem: Problem) -> tuple[Tensor, Tensor]:
    """The spectral initialization of the theory: the best rank-r approximation of ``-∇L`` at ``dW = 0``, scaled
    by least squares, split into balanced factors ``A0 = S^½ Vᵀ`` (r x d) and ``B0 = U S^½`` (P x r)."""
    residual = problem.y - convex_relu(problem.X, problem.patterns, problem.W0)
    U, S, Vh = torch.linalg.svd(convex_relu_adjoint(problem.X, problem.patterns, residual), full_matrices=False)
    r = problem.rank
    M = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    fitted = convex_relu(problem.X, problem.patterns, M)
    scale = (fitted @ residual) / (fitted @ fitted)  # argmin_c ||f(W0 + c M) - y||
    root = (scale * S[:r]).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


# ----------------------------------------------------------------------------------------------------------------
# The model: a frozen weight plus a PEFT-style LoRA pair that core.find_lora_pairs recognizes
# ----------------------------------------------------------------------------------------------------------------


class LoraNeurons(nn.Module):
    """The first layer of the convex network: frozen ``weight`` (P x d) plus ``lora_B.default @ lora_A.default``."""

    def __init__(self, W0: Tensor, A0: Tensor, B0: Tensor):
        super().__init__()
        rank, d = A0.shape
        self.weight = nn.Parameter(W0.clone(), requires_grad=False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d, rank, bias=False, dtype=DTYPE)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, W0.shape[0], bias=False, dtype=DTYPE)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(A0)
            self.lora_B["default"].weight.copy_(B0)

    def merged_weight(self) -> Tensor:
        return self.weight + self.lora_B["default"].weight @ self.lora_A["default"].weight

    def forward(self, X: Tensor, patterns: Tensor) -> Tensor:
        return convex_relu(X, patterns, self.merged_weight())


def perturbed(A0: Tensor, B0: Tensor, perturbation: int, scale: float) -> tuple[Tensor, Tensor]:
    """The start ``(A0, B0)`` with every entry multiplied by ``1 + scale * xi`` (``xi`` standard normal, drawn from a
    generator seeded ``perturbation``); ``perturbation = 0`` is the start itself. With ``scale`` near float64's
    rounding (1e-12), this is the size of the difference that another CPU's kernels make to a run: what the
    sensitivity study (:func:`run_sensitivity`) measures."""
    if perturbation == 0:
        return A0, B0
    g = torch.Generator().manual_seed(int(perturbation))
    return tuple(t * (1 + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)) for t in (A0, B0))


class ConvexReLULoRA(nn.Module):
    """The fine-tuned model; its trainable parameters are ``layer.lora_A.default.weight`` and
    ``layer.lora_B.default.weight``, initialized spectrally (optionally :func:`perturbed`)."""

    def __init__(self, problem: Problem, perturbation: int = 0, perturbation_scale: float = 0.0):
        super().__init__()
        A0, B0 = perturbed(*spectral_init(problem), perturbation, perturbation_scale)
        self.layer = LoraNeurons(problem.W0, A0, B0)

    def forward(self, X: Tensor, patterns: Tensor) -> Tensor:
        return self.layer(X, patterns)


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    iterations: int  # optimizer steps taken (to the tolerance, to divergence, or the cap)
    reached_tol: bool
    diverged: bool
    relative_loss: float  # at the last iterate (inf / nan when diverged)
    min_relative_loss: float

    def metrics(self, tol: float, max_iters: int) -> dict:
        """Final metrics of the record (``iters_to_tol`` only when the tolerance was reached)."""
        out = {
            "relative_loss": self.relative_loss,
            "min_relative_loss": self.min_relative_loss,
            "iterations": self.iterations,
            "reached_tol": self.reached_tol,
            "diverged": self.diverged,
            "tol": tol,
            "max_iters": max_iters,
        }
        if self.reached_tol:
            out["iters_to_tol"] = self.iterations
        return out


def run_one(
    problem: Problem,
    optim: dict,
    *,
    max_iters: int,
    tol: float,
    diverge_at: float = 1e6,
    log_every: int = 50,
    recorder: RunRecorder | None = None,
    perturbation: int = 0,
    perturbation_scale: float = 0.0,
) -> RunResult:
    """Full-batch training of the LoRA pair with ``core.build_optimizer(model, **optim)`` until the relative loss
    ``L(W0 + BA) / L(W0)`` reaches ``tol``, exceeds ``diverge_at`` (diverged), or ``max_iters`` steps were taken;
    from the spectral start, or from a :func:`perturbed` one."""
    model = ConvexReLULoRA(problem, perturbation, perturbation_scale)
    optimizer = build_optimizer(model, **optim)
    lr = float(optim.get("lr", float("nan")))
    with torch.no_grad():
        loss0 = problem.loss(problem.W0).item()
    best, step, rel, diverged, reached = math.inf, 0, math.inf, False, False
    while True:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(model.layer.merged_weight())
        rel = loss.item() / loss0
        best = min(best, rel) if math.isfinite(rel) else best
        reached = rel <= tol
        diverged = not math.isfinite(rel) or rel > diverge_at
        last = reached or diverged or step == max_iters
        time_s = None
        if not last:
            loss.backward()
            try:
                optimizer.step()
            except (FloatingPointError, torch.linalg.LinAlgError):  # non-finite gradient / singular Gram matrix
                diverged = last = True
            time_s = time.perf_counter() - start
        if recorder is not None and (step < 20 or step % log_every == 0 or last):
            recorder.log_step(step, loss=loss.item(), rel_loss=rel, lr=lr, time_s=time_s)
        if last:
            return RunResult(step, reached, diverged, rel, best)
        step += 1


# ----------------------------------------------------------------------------------------------------------------
# Hydra entry point: one run (mode=single) or the whole grid (mode=grid)
# ----------------------------------------------------------------------------------------------------------------


def load_optim(name: str) -> dict:
    """The hyperparameters of ``conf/optim/<name>.yaml`` as a plain dict (with ``name``)."""
    path = CONF_DIR / "optim" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml"))
        raise ValueError(f"no optimizer config '{name}' in {path.parent}; available: {available}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def results_root(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir)


def make_recorder(cfg: DictConfig, problem: Problem, optim: dict, perturbation: int = 0) -> RunRecorder:
    """The record of one configuration (tags: kappa, conditioning, and the perturbation of a perturbed start)."""
    hparams = {k: v for k, v in optim.items() if k != "name"}
    config = OmegaConf.to_container(cfg, resolve=True)
    config.update(mode="single", kappa=problem.kappa, conditioning=problem.conditioning, optim=dict(optim))
    for key in ("kappas", "studies", "lr_grid", "sensitivity", "perturbation"):
        config.pop(key, None)
    tags = {"kappa": problem.kappa, "conditioning": problem.conditioning}
    if perturbation:
        config["perturbation"] = {"seed": int(perturbation), "scale": float(cfg.sensitivity.scale)}
        tags["perturbation"] = int(perturbation)
    return RunRecorder(
        results_root(cfg), EXPERIMENT, optim["name"], hparams, seed=cfg.problem.seed, config=config, tags=tags,
        wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None,
    )  # fmt: skip


def run_and_record(cfg: DictConfig, problem: Problem, optim: dict, perturbation: int = 0) -> tuple[RunResult | None,
                                                                                                     Path]:
    """Run one configuration and write its record; with ``skip_finished`` a configuration whose record is finished
    is not run again (``None`` and the record's path)."""
    recorder = make_recorder(cfg, problem, optim, perturbation)
    if cfg.skip_finished and recorder.finished_record() is not None:
        return None, recorder.path
    with recorder:  # on disk (running) from here, closed done / diverged, or failed / interrupted
        result = run_one(
            problem, optim, max_iters=cfg.max_iters, tol=cfg.tol, diverge_at=cfg.diverge_at, log_every=cfg.log_every,
            recorder=recorder, perturbation=perturbation, perturbation_scale=float(cfg.sensitivity.scale),
        )  # fmt: skip
        return result, recorder.finish(final_metrics=result.metrics(cfg.tol, cfg.max_iters))


def grid_jobs(cfg: DictConfig) -> list[tuple[str, float, str, float]]:
    """(conditioning, kappa, optimizer, lr) of every run of the grid."""
    jobs = []
    for study in cfg.studies:
        for kappa in cfg.kappas:
            for name in study.optimizers:
                if name not in cfg.lr_grid:
                    raise ValueError(f"optimizer '{name}' of study '{study.conditioning}' has no lr_grid entry")
                jobs += [(study.conditioning, float(kappa), name, float(lr)) for lr in cfg.lr_grid[name]]
    return jobs


def make_problem_from(cfg: DictConfig, kappa: float, conditioning: str) -> Problem:
    return make_problem(kappa, conditioning=conditioning, **cfg.problem)


def run_single(cfg: DictConfig) -> float:
    """One run (``cfg.optim`` at ``cfg.kappa``); returns its final relative loss."""
    problem = make_problem_from(cfg, float(cfg.kappa), cfg.conditioning)
    result, path = run_and_record(cfg, problem, OmegaConf.to_container(cfg.optim, resolve=True), int(cfg.perturbation))
    print(f"{cfg.optim.name} lr={cfg.optim.lr:g} kappa={cfg.kappa:g} ({cfg.conditioning}): "
          f"{result or 'finished already (skip_finished)'} -> {path}")
    return result.relative_loss if result else math.nan


def run_grid(cfg: DictConfig) -> dict[tuple[str, float, str, float], RunResult]:
    """Every (study, kappa, optimizer, lr) of the grid, one record each; returns the results by job."""
    out, problems = {}, {}
    jobs = grid_jobs(cfg)
    bar = tqdm(jobs, desc="theory", unit="run")
    for conditioning, kappa, name, lr in bar:
        bar.set_postfix_str(f"{conditioning} kappa={kappa:g} {name} lr={lr:g}")
        if (conditioning, kappa) not in problems:
            problems[(conditioning, kappa)] = make_problem_from(cfg, kappa, conditioning)
        out[(conditioning, kappa, name, lr)], _ = run_and_record(
            cfg, problems[(conditioning, kappa)], {**load_optim(name), "lr": lr}
        )
    print(f"wrote {len(jobs)} records to {results_root(cfg) / EXPERIMENT}")
    run_sensitivity(cfg, problems)
    return out


def run_sensitivity(cfg: DictConfig, problems: dict[tuple[str, float], Problem] | None = None) -> list[Path]:
    """The sensitivity study: the whole grid again from ``sensitivity.perturbations`` perturbed starts
    (:func:`perturbed`, relative size ``sensitivity.scale``, seeds 1..N), one record each (tag ``perturbation``).
    The theory table selects the best step size of each start as it does for the spectral one and reports the
    spread: a result that another CPU can change (a chaotic run whose iterations, or whose best step size, move
    with the last bits) shows there instead of one machine's answer. Returns the records written."""
    count = int(cfg.sensitivity.perturbations)
    if count < 0:
        raise ValueError(f"sensitivity.perturbations must be >= 0, got {count}")
    problems = dict(problems or {})
    jobs = [(job, p) for p in range(1, count + 1) for job in grid_jobs(cfg)]
    paths = []
    bar = tqdm(jobs, desc="theory sensitivity", unit="run")
    for (conditioning, kappa, name, lr), p in bar:
        bar.set_postfix_str(f"start {p}: {conditioning} kappa={kappa:g} {name} lr={lr:g}")
        if (conditioning, kappa) not in problems:
            problems[(conditioning, kappa)] = make_problem_from(cfg, kappa, conditioning)
        paths.append(run_and_record(cfg, problems[(conditioning, kappa)], {**load_optim(name), "lr": lr}, p)[1])
    if paths:
        print(f"sensitivity: {len(paths)} runs from {count} perturbed starts in {results_root(cfg) / EXPERIMENT}")
    return paths


# Every number the theory experiment reads, checked before any run (harness.check_settings).
SETTINGS = (
    Rule("problem.seed", "int"), Rule("problem.n", "int", minimum=1), Rule("problem.d", "int", minimum=1),
    Rule("problem.neurons", "int", minimum=1), Rule("problem.rank", "int", minimum=1),
    Rule("max_iters", "int", minimum=1), Rule("tol", "float", above=0), Rule("diverge_at", "float", above=0),
    Rule("log_every", "int", minimum=1), Rule("threads", "int", minimum=1, none=True, none_means="torch's default"),
    Rule("perturbation", "int", minimum=0), Rule("sensitivity.perturbations", "int", minimum=0),
    Rule("sensitivity.scale", "float", minimum=0), Rule("skip_finished", "bool"),
)


def run(cfg: DictConfig) -> float | dict:
    """``mode=grid``: the whole grid (returns the results by job); ``mode=single``: one run (its relative loss)."""
    check_settings(cfg, SETTINGS)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.mode == "single":
        return run_single(cfg)
    if cfg.mode == "grid":
        return run_grid(cfg)
    raise ValueError(f"mode must be 'grid' or 'single', got {cfg.mode!r}")


@hydra.main(config_path="conf", config_name="theory", version_base="1.3")
def main(cfg: DictConfig) -> float | dict:
    """Hydra entry point (see the module docstring)."""
    return run(cfg)


if __name__ == "__main__":
    main()
