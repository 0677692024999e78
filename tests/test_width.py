"""The width experiment: its problem's scaling, the grid and its records, the best-LR rule, and the slopes of a
reduced grid against those of the committed full run (results/width/)."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from core import find_lora_pairs
from harness import load_records
from main_figures import make_figures, width_figures
from main_figures.reproduce_cpu import default_steps
from main_figures.width import (
    Job, LoraHidden, ProblemSpec, grid_jobs, is_finished, lora_scaling, lr_grid, make_problem, record_path, run,
    run_job,
)  # fmt: skip
from main_figures.width_figures import Point, best_lr, width_slopes

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "main_figures/conf/width.yaml"
FULL = ROOT / "results"


def config(tmp_path, **overrides) -> dict:
    cfg = OmegaConf.load(CONF)
    cfg.results_dir = str(tmp_path)
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(overrides)
    return cfg


def _rms(t):
    return t.square().mean().sqrt().item()


@pytest.mark.parametrize("width", [128, 2048])
def test_features_are_order_one_per_coordinate_at_every_width(width):
    p = make_problem(ProblemSpec(width, 0))
    for name, t in [("h", p.h), ("z0", p.z0), ("shift", p.shift_features)]:
        assert 0.7 < _rms(t) < 1.8, (name, _rms(t))
    # the shift moves the output by Θ(1); the base network's own output is O(1/√n)
    assert _rms(p.y - p.output(p.z0)) > 0.2
    assert _rms(p.output(p.z0)) < 1.5 / math.sqrt(width) * 4


def test_lora_pair_is_peft_shaped_and_starts_at_the_base_model():
    p = make_problem(ProblemSpec(256, 1))
    model = LoraHidden(256, 4, lora_scaling(4, 8.0), seed=1)
    pairs = find_lora_pairs(torch.nn.ModuleDict({"hidden": model}))
    assert [(tuple(q.A.shape), tuple(q.B.shape)) for q in pairs] == [((4, 256), (256, 4))]
    assert pairs[0].A.abs().max() <= 1 / math.sqrt(256) and not pairs[0].B.any()
    torch.testing.assert_close(model(p.h, p.z0), p.z0)


def test_lora_scaling_and_lr_grid():
    assert lora_scaling(8, 32.0) == 4.0 and lora_scaling(16, 8.0, rslora=True) == 2.0
    with pytest.raises(ValueError, match="LoRA alpha must be > 0, got 0"):
        lora_scaling(4, 0)
    grid = lr_grid({"low": 1e-4, "high": 1.0, "points": 13})
    assert len(grid) == 13 and grid[0] == 1e-4 and grid[-1] == 1.0
    assert math.isclose(grid[1] / grid[0], 10 ** (1 / 3), rel_tol=1e-3)
    with pytest.raises(ValueError, match="0 < low < high"):
        lr_grid({"low": 1.0, "high": 1e-4, "points": 13})


def test_the_configured_grid_is_the_one_asked_for(tmp_path):
    cfg = config(tmp_path)
    jobs = [j for j in grid_jobs(cfg) if j.study == "width"]
    assert sorted({j.spec.width for j in jobs}) == [128, 256, 512, 1024, 2048, 4096]
    assert {j.spec.seed for j in jobs} == {0, 1, 2}
    assert {j.series for j in jobs} == set(width_figures.SERIES_ORDER)
    for series in width_figures.SERIES_ORDER:
        lrs = sorted({j.lr for j in jobs if j.series == series})
        assert len(lrs) >= 13 and math.log10(lrs[-1] / lrs[0]) >= 4 - 1e-9
    assert len({j.run_name for j in grid_jobs(cfg)}) == len(grid_jobs(cfg))  # one record per run


def test_bad_config_stops_before_any_run(tmp_path):
    cfg = config(tmp_path)
    cfg["width_study"]["series"] = ["adamw", "adam"]
    with pytest.raises(ValueError, match="unknown optimizer series 'adam'"):
        run(cfg)
    cfg = config(tmp_path, studies=["width", "depth"])
    with pytest.raises(ValueError, match=r"unknown stud\(ies\) \['depth'\]"):
        run(cfg)
    assert not (tmp_path / "width").exists()


def test_a_run_writes_its_record_and_the_runner_resumes(tmp_path):
    cfg = config(tmp_path, steps=20)
    job = Job("width", ProblemSpec(128, 0), "scaled_adamw_update", 1e-3)
    path, result = run_job(cfg, job)
    assert result is not None and result.status == "done" and result.relative_loss < 1
    rec = json.loads(path.read_text())
    assert rec["status"] == "done" and rec["optimizer"] == "scaled_adamw"
    assert {k: rec["tags"][k] for k in ("width", "optimizer", "variant", "lr", "seed")} == {
        "width": 128, "optimizer": "scaled_adamw", "variant": "update", "lr": 1e-3, "seed": 0}  # fmt: skip
    assert rec["final_metrics"]["feature_update_rms"] > 0
    mtime = path.stat().st_mtime_ns
    assert run_job(cfg, job) == (path, None) and path.stat().st_mtime_ns == mtime  # finished: skipped
    path.write_text(path.read_text()[:100])  # a half-written file is not a finished run: redone
    assert not is_finished(path)
    _, again = run_job(cfg, job)
    assert again is not None and is_finished(record_path(tmp_path, job))


def test_a_diverging_run_is_recorded_as_diverged(tmp_path):
    cfg = config(tmp_path, steps=30)
    path, result = run_job(cfg, Job("width", ProblemSpec(128, 0), "sgd", 1e3))
    assert result.status == "diverged" and json.loads(path.read_text())["status"] == "diverged"


def test_best_lr_refines_inside_the_grid_and_flags_the_edge():
    # log10 loss = (log10 lr + 2.3)² : vertex at 10^-2.3, grid a factor 10 apart
    pts = [Point(10.0**e, 10 ** ((e + 2.3) ** 2), 1.0, "done") for e in range(-5, 1)]
    best = best_lr(pts)
    assert best.grid_lr == 1e-2 and not best.at_edge and math.isclose(math.log10(best.lr), -2.3, abs_tol=1e-9)
    edge = best_lr([Point(p.lr, p.loss, 1.0, "done") for p in pts[:2]])
    assert edge.at_edge and edge.lr == edge.grid_lr == 1e-4
    diverged = [Point(p.lr, float("nan") if p.lr > 1e-3 else p.loss, 1.0, "diverged") for p in pts]
    assert best_lr(diverged).lr == 1e-3 and best_lr(diverged).at_edge is False  # right neighbour not a value


def test_reproduction_and_figures_include_the_width_experiment():
    step = next(s for s in default_steps() if s.name == "width")
    assert step.commands[0][1:] == ["main_figures/width.py"] and step.default
    keys = {p.key for p in make_figures.PRODUCTS}
    assert {"width_transfer", "width_optimal_lr", "width_feature_update", "width_table", "lora_scale"} <= keys


full_records = pytest.mark.skipif(not (FULL / "width").is_dir(), reason="the full width run is not in results/")

# The reduced grid: 3 widths, seed 0, and per optimizer 7 consecutive learning rates of the full grid (2 decades, the
# full run's spacing) centred on the full run's best rates. Tolerance on the slope of each optimizer series:
REDUCED_WIDTHS = [128, 1024, 4096]
SLOPE_TOLERANCE = 0.35  # |reduced slope - full-run slope (mean over seeds)|


def reduced_lr_grids(cfg: dict, full_records) -> dict:
    best = width_figures.optimal_lrs(full_records)
    grids = {}
    for series, spec in cfg["lr_grid"].items():
        grid = lr_grid(spec)
        centre = statistics.median(grid.index(b.grid_lr) for k, b in best.items() if k[0] == series)
        first = int(min(max(round(centre) - 3, 0), len(grid) - 7))
        grids[series] = {"low": grid[first], "high": grid[first + 6], "points": 7}
    return grids


@full_records
def test_full_run_figures_build(tmp_path):
    outcomes = make_figures.build_all(FULL, tmp_path, only={"width_transfer", "width_optimal_lr", "width_table",
                                                            "width_feature_update", "lora_scale", "lora_scale_table"},
                                      log=lambda *_: None)  # fmt: skip
    assert {o.product.key: o.status for o in outcomes} == dict.fromkeys(
        ["width_transfer", "width_optimal_lr", "width_feature_update", "width_table", "lora_scale",
         "lora_scale_table"], "ok")  # fmt: skip
    assert "slope" in (tmp_path / "width_table.md").read_text()


@full_records
@pytest.mark.committed_numbers
def test_reduced_grid_slopes_agree_with_the_full_run(tmp_path):
    full = width_slopes(load_records(FULL, "width"))
    assert set(full) == set(width_figures.SERIES_ORDER)
    cfg = config(tmp_path, studies=["width"], workers=1)
    cfg["width_study"].update(widths=REDUCED_WIDTHS, seeds=[0])
    cfg["lr_grid"] = reduced_lr_grids(cfg, load_records(FULL, "width"))
    run(cfg)
    reduced = width_slopes(load_records(tmp_path, "width"))
    for series, slope in full.items():
        assert abs(reduced[series].mean - slope.mean) <= SLOPE_TOLERANCE, (series, reduced[series].mean, slope.mean)


def test_the_sst2_lora_scale_table_reads_rank_alpha_and_rslora_from_the_runs(tmp_path):
    """Best learning rate per (optimizer, r, alpha, rsLoRA) of the GLUE ``lora_scale`` sweep, by dev accuracy; a
    diverged run is never the best, whatever accuracy it reports."""
    from harness import RunRecorder

    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    peaks = {("adamw", 4, 8, False): 3e-3, ("adamw", 16, 32, False): 1e-3, ("scaled_adamw", 4, 8, True): 3e-4}
    for (optimizer, r, alpha, rslora), peak in peaks.items():
        for lr in lrs:
            distance = abs(math.log10(lr / peak))
            rec = RunRecorder(tmp_path, "glue", optimizer, {"lr": lr}, 42, tags={"sweep": "lora_scale"},
                              config={"lora": {"r": r, "alpha": alpha, "rslora": rslora}})
            diverged = optimizer == "adamw" and r == 4 and lr == 3e-2
            rec.finish({"accuracy": 0.99 if diverged else 0.9 - 0.1 * distance,
                        **({"diverged_at_step": 7} if diverged else {})})
    records = load_records(tmp_path, "glue")
    best = width_figures.glue_lora_scale_best(records)
    assert {k: b.grid_lr for k, (s, b) in best.items()} == {
        ("adamw", 4, 8.0, False): 3e-3, ("adamw", 16, 32.0, False): 1e-3, ("scaled_adamw_gradient", 4, 8.0, True): 3e-4}
    assert {k: s for k, (s, b) in best.items()} == {
        ("adamw", 4, 8.0, False): 2.0, ("adamw", 16, 32.0, False): 2.0, ("scaled_adamw_gradient", 4, 8.0, True): 4.0}
    table = width_figures.glue_lora_scale_table(records)
    assert "| AdamW | 4 | 8 | 2 |" in table and "| 8 (rsLoRA) | 4 |" in table and "0.9000 (6: 0.0001 ... 0.03)" in table
    lone = RunRecorder(tmp_path, "glue", "adamw", {"lr": 1e-3}, 42, tags={"sweep": "lora_scale"},
                       config={"lora": {"r": 64, "alpha": 8, "rslora": True}})
    lone.finish({"accuracy": 0.95})  # one learning rate: no best rate, and not in the fit
    table = width_figures.glue_lora_scale_table(load_records(tmp_path, "glue"))
    assert "| AdamW | 64 |" not in table and "Left out (fewer than 3 learning rates run so far): AdamW r 64" in table
    with pytest.raises(ValueError, match="no 'lora_scale' sweep among the GLUE records"):
        width_figures.glue_lora_scale_table([r for r in records if r.tags.get("sweep") != "lora_scale"])
