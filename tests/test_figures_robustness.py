"""The learning-rate robustness metric (main_figures/metrics.py: lr_robustness), a run's outcome (run_outcome) in
every table and figure, and results folders holding files that are not run records."""

import json
import math
import warnings
from pathlib import Path

import pytest

from harness import RunRecord, RunRecorder, load_module, load_records
from harness.records import InvalidRecordWarning
from main_figures import make_figures
from main_figures.lr_robustness import lr_sweeps, robustness_summary
from main_figures.metrics import (
    TOLERANCES,
    Tolerance,
    format_width,
    lr_points,
    lr_robustness,
    metric_value,
    outcome_label,
    robustness_verdict,
    run_outcome,
)
from main_figures.peers import peers_table


gpt2_figures = load_module("GPT-2/figures.py")
make_table = load_module("Mistral-7B/make_table.py")


def rec(optimizer, lr, metrics, experiment="glue", seed=0, status=None, tags=None):
    """An in-memory record (no file)."""
    return RunRecord(experiment=experiment, optimizer=optimizer, hparams={"lr": lr}, seed=seed,
                     tags=dict(tags or {}), run_name=f"{optimizer}_lr{lr:g}_seed{seed}", final_metrics=dict(metrics),
                     status=status)  # fmt: skip


def sweep(optimizer, values, lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), metric="accuracy", experiment="glue"):
    """Records of one optimizer over ``lrs``; a value None is a run that diverged (flagged `diverged_at_step` and
    scored after stopping, as GPT-2/train.py and Mistral-7B/train.py do)."""
    out = []
    for lr, v in zip(lrs, values):
        out.append(rec(optimizer, lr, {metric: 0.99, "diverged_at_step": 3} if v is None else {metric: v},
                       experiment=experiment))  # fmt: skip
    return out


def robustness(records_by_opt, experiment="glue", metric="accuracy", higher=True):
    return lr_robustness({o: lr_points(rs, metric) for o, rs in records_by_opt.items()}, experiment, metric, higher)


# --------------------------------------------------------------------------------------------------- the metric


def test_a_uniformly_poor_optimizer_is_never_the_most_robust():
    rob = robustness({
        "good": sweep("good", (0.50, 0.75, 0.80, 0.60, 0.50)),
        "flat": sweep("flat", (0.61, 0.61, 0.61, 0.61, 0.61)),  # 4 decades within 1 point of its own best
    })  # fmt: skip
    assert rob.row("flat").width == pytest.approx(4.0) and rob.row("good").width == 0.0
    assert rob.most_robust == ["good"] and rob.eligible == ["good"]
    assert "flat" in rob.excluded and "0.61" in rob.excluded["flat"] and "0.8" in rob.excluded["flat"]
    text = "\n".join(robustness_verdict(rob))
    assert "**good**, the only one within 1 accuracy point (0.01) of the overall best" in text
    assert "their best is not within 1 accuracy point (0.01) of the overall best: flat (0.61)." in text


def test_width_in_decades_of_the_interval_around_the_best():
    rob = robustness({"a": sweep("a", (0.70, 0.795, 0.80, 0.791, 0.60)), "b": sweep("b", (0.70, 0.80, 0.70, 0.6, 0.5))})
    a = rob.row("a")
    assert (a.best, a.best_lr, a.lr_low, a.lr_high) == (0.80, 1e-2, 1e-3, 1e-1)
    assert a.width == pytest.approx(2.0) and not a.at_edge and format_width(a) == "2.00"
    b = rob.row("b")
    assert b.width == 0.0 and b.lr_low == b.lr_high == 1e-3 and format_width(b) == "0.00"  # only the best qualifies
    assert rob.most_robust == ["a"]
    # an interval reaching the end of the tried grid is a lower bound
    edge = robustness({"c": sweep("c", (0.80, 0.795, 0.5, 0.5, 0.5))}).row("c")
    assert edge.width == pytest.approx(1.0) and edge.at_edge and format_width(edge) == "≥ 1.00"


def test_a_diverged_learning_rate_breaks_the_interval_and_is_not_a_value():
    # lr 1e-2 diverged (scored 0.99 after stopping, which would be the best if it counted)
    rob = robustness({"a": sweep("a", (0.795, 0.80, None, 0.80, 0.80))})
    a = rob.row("a")
    assert a.best == 0.80 and a.best_lr == 1e-3 and (a.lr_low, a.lr_high) == (1e-4, 1e-3)
    assert a.width == pytest.approx(1.0) and a.bad_lrs == [1e-2]
    # the same with a failed run, and with one of two seeds diverged at a rate
    failed = sweep("f", (0.795, 0.80, 0.80, 0.80, 0.80))
    failed[2] = rec("f", 1e-2, {}, status="failed")
    assert robustness({"f": failed}).row("f").width == pytest.approx(1.0)
    seeds = sweep("s", (0.795, 0.80, 0.80, 0.80, 0.80)) + [rec("s", 1e-2, {"accuracy": 0.8, "diverged": True}, seed=1)]
    assert robustness({"s": seeds}).row("s").width == pytest.approx(1.0)


def test_running_runs_are_left_out_and_end_the_interval():
    records = sweep("a", (0.795, 0.80, 0.80)) + [rec("a", 1e-2, {"accuracy": 0.99}, seed=1, status="running")]
    points = lr_points(records, "accuracy")
    assert points[2].runs == 1 and points[2].left_out == 1 and points[2].mean == 0.80  # the running run is no value
    records = sweep("a", (0.795, 0.80)) + [rec("a", 1e-2, {}, status="interrupted"), rec("a", 1e-1, {"accuracy": .8})]
    row = robustness({"a": records}).row("a")
    assert row.left_out == 1 and (row.lr_low, row.lr_high) == (1e-4, 1e-3)


def test_the_theory_tolerance_is_a_factor_on_a_lower_is_better_loss():
    tol = TOLERANCES[("theory", "relative_loss")]
    assert tol.kind == "factor" and tol.value == 10
    lrs = (0.125, 0.25, 0.5, 1.0)
    recs = [rec("scaled_gd", lr, {"relative_loss": v}, experiment="theory") for lr, v in
            zip(lrs, (5e-12, 1e-12, 9e-12, 1e-10))]  # fmt: skip
    row = robustness({"scaled_gd": recs}, "theory", "relative_loss", higher=False).row("scaled_gd")
    assert row.best == 1e-12 and (row.lr_low, row.lr_high) == (0.125, 0.5) and row.width == pytest.approx(math.log10(4))
    assert Tolerance(0.02, "absolute", "x").within(0.60, 0.62, True) and not Tolerance(0.02, "absolute", "x").within(
        0.59, 0.62, True)


def test_ties_are_named_and_a_metric_without_tolerance_is_an_error():
    rob = robustness({"a": sweep("a", (0.80, 0.5)), "b": sweep("b", (0.5, 0.80))})
    assert rob.most_robust == ["a", "b"] and "a tie between a, b" in "\n".join(robustness_verdict(rob))
    with pytest.raises(LookupError, match="no LR-robustness tolerance for metric 'eval_loss'"):
        robustness({"a": sweep("a", (1.0, 2.0), metric="eval_loss")}, metric="eval_loss")


# --------------------------------------------------------------------------------------------------- outcomes


def test_run_outcome_reads_status_then_the_legacy_markers():
    assert run_outcome(rec("a", 1e-3, {"accuracy": 0.8})) == "done"
    assert run_outcome(rec("a", 1e-3, {"accuracy": 0.8, "diverged_at_step": 4})) == "diverged"
    assert outcome_label(rec("a", 1e-3, {"accuracy": 0.8, "diverged_at_step": 4})) == "diverged@4"
    assert run_outcome(rec("a", 1e-3, {"accuracy": 0.8, "diverged": True})) == "diverged"
    assert run_outcome(rec("a", 1e-3, {"accuracy": None})) == "diverged"  # NaN stored as null
    assert run_outcome(rec("a", 1e-3, {"relative_loss": None}, experiment="theory")) == "diverged"
    assert run_outcome(rec("a", 1e-3, {"valid_loss_best": 2.0}, experiment="gpt2_e2e")) == "done"  # not scored
    for status in ("running", "done", "diverged", "failed", "interrupted"):
        assert run_outcome(rec("a", 1e-3, {"accuracy": 0.8}, status=status)) == status
    assert math.isnan(metric_value(rec("a", 1e-3, {"accuracy": 0.8}, status="failed"), "accuracy"))
    with pytest.raises(ValueError, match="status 'crashed'"):
        run_outcome(rec("a", 1e-3, {}, status="crashed"))


def _gpt2_run(results, optimizer, lr, metrics, sweep, status=None):
    r = RunRecorder(results, "gpt2_e2e", optimizer, {"lr": lr}, 110, tags={"preset": "smollm2_cpu", "sweep": sweep})
    r.log_step(1, loss=2.0, lr=lr, time_s=0.1)
    return _close(r, {**metrics, "steps": 1, "test_mrs": 20}, status)


def _close(recorder, metrics, status):
    """Write the record with ``status`` (None: as finish() infers it; running: started and saved, never closed)."""
    if status == "running":
        recorder.start()
        return recorder.save(metrics)
    return recorder.finish(metrics, status=status)


def _scores(x):
    return {"BLEU": x, "NIST": 8 * x, "METEOR": x / 2, "ROUGE_L": x, "CIDEr": 3 * x}


@pytest.mark.parametrize("how", ["diverged_at_step", "status_failed"])
def test_a_diverged_or_failed_gpt2_run_is_marked_in_every_table_and_figure(tmp_path, how):
    """GPT-2/train.py stops a diverging run, records `diverged_at_step` and still scores the best checkpoint: the
    run must read as diverged everywhere, never as its (here: the best) BLEU. A `status: failed` run the same."""
    bad = {"metrics": {**_scores(0.9), "diverged_at_step": 5}} if how == "diverged_at_step" else \
        {"metrics": {}, "status": "failed"}  # fmt: skip
    label = "diverged@5" if how == "diverged_at_step" else "failed"
    for opt, lr in (("sgd", 9e-2), ("adamw", 2e-4), ("scaled_adamw", 8e-4)):
        _gpt2_run(tmp_path, opt, lr, _scores(0.3 if opt == "adamw" else 0.4), "table1")
    _gpt2_run(tmp_path, "scaled_gd", 2e-2, bad["metrics"], "table1", bad.get("status"))
    table1 = gpt2_figures.table1(tmp_path)
    assert f"| scaled GD | 0.02 | {label} | {label} | {label} | {label} | {label} |" in table1
    assert "| SGD | 0.09 | **0.4000** |" in table1  # the best of the finished runs is bold
    for lr, x in ((1e-4, 0.30), (1e-3, 0.40), (1e-2, None)):
        _gpt2_run(tmp_path, "adamw", lr, _scores(x) if x else bad["metrics"], "lr", None if x else bad.get("status"))
        _gpt2_run(tmp_path, "scaled_adamw", lr, _scores(0.39 if x is None else x + 0.005), "lr")
    sweep_table = gpt2_figures.lr_sweep_table(tmp_path, "BLEU")
    assert f"| AdamW | 0.3000 | 0.4000 | {label} | 0.4000 | 0.00 |" in sweep_table
    assert "| scaled AdamW | 0.3050 | 0.4050 | 0.3900 | 0.4050 | ≥ 1.00 |" in sweep_table  # 0.39: 0.015 off
    peers = peers_table(tmp_path)
    assert "| AdamW | 0.001 | 0.400 | 0.001 | 0.00 | 0.0001 … 0.01 (3) | 1 |" in peers
    assert "**scaled AdamW** (≥ 1.00 decades" in peers
    records = [r for r in load_records(tmp_path, "gpt2_e2e") if r.tags["sweep"] == "lr"]
    _, _, sweeps = lr_sweeps(records, "gpt2_e2e")
    (points,) = [by_opt["adamw"] for by_opt in sweeps.values()]
    assert points[-1].lr == 1e-2 and points[-1].diverged == 1 and math.isnan(points[-1].mean)
    assert points[-1].failed == (1 if how == "status_failed" else 0)
    assert any("scaled AdamW (≥ 1.00)" in row for row in robustness_summary(records, "gpt2_e2e"))


def _glue_run(results, optimizer, lr, accuracy, seed=42, extra=None, status=None):
    r = RunRecorder(results, "glue", optimizer, {"lr": lr}, seed, tags={"preset": "minilm_sst2", "task": "sst2"})
    r.log_step(1, loss=0.7, lr=lr, time_s=0.15)
    return _close(r, {"accuracy": accuracy, **(extra or {})}, status)


def test_mistral_sweep_table_robustness_and_diverged_runs(tmp_path):
    for lr, acc in ((1e-4, 0.70), (1e-3, 0.805), (1e-2, 0.80)):
        _glue_run(tmp_path, "scaled_adamw", lr, acc)
    for lr, acc in ((1e-4, 0.60), (1e-3, 0.81)):
        _glue_run(tmp_path, "adamw", lr, acc)
    _glue_run(tmp_path, "adamw", 1e-2, 0.95, extra={"diverged_at_step": 12})  # evaluated after stopping
    _glue_run(tmp_path, "adamw", 1e-3, 0.80, seed=43, status="running")
    _glue_run(tmp_path, "lora_rite", 1e-3, 0.55)
    _glue_run(tmp_path, "lora_rite", 1e-2, 0.55)
    table = make_table.make_sweep_table(tmp_path)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()
            if ln.startswith("| ") and "optimizer" not in ln}  # fmt: skip
    assert rows["adamw"] == ["60.0", "81.0 (+1 running)", "diverged@12", "81.0", "0.00", "150"]
    assert rows["scaled_adamw"] == ["70.0", "80.5", "80.0", "80.5", "≥ 1.00", "150"]
    assert rows["lora_rite"][-2] == "≥ 1.00"  # uniformly poor: as wide as scaled AdamW ...
    assert "**scaled_adamw** (≥ 1.00 decades" in table  # ... but not ranked
    assert "their best is not within 1 accuracy point (0.01) of the overall best: lora_rite (55.0)." in table
    assert "width (decades) within 1 accuracy point (0.01)" in table and "bounded by the tried grid" in table
    table2 = make_table.make_table(tmp_path)  # tuned lr: the most finished seeds, then the best score
    assert "| adamw | 81.0 (+1 running) @ 0.001 | 81.0 |" in table2 and "| lora_rite | 55.0 @ 0.001 | 55.0 |" in table2


# --------------------------------------------------------------------------------------------------- bad files


def _bad_files(results: Path) -> tuple[Path, Path]:
    good = sorted((results / "gpt2_e2e").glob("*.json"))[0]
    truncated = results / "gpt2_e2e" / "truncated.json"
    truncated.write_text(good.read_text()[:200])
    foreign = results / "glue" / "foreign.json"
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_text(json.dumps({"name": "not a run record", "value": 1}))
    return truncated, foreign


@pytest.fixture()
def results_with_bad_files(tmp_path):
    from test_figures_main import write_fixture_results

    results = write_fixture_results(tmp_path / "results")
    for opt, lr in (("sgd", 9e-2), ("scaled_gd", 2e-2), ("adamw", 2e-4), ("scaled_adamw", 8e-4)):
        _gpt2_run(results, opt, lr, _scores(0.4), "table1")
        if opt in ("sgd", "scaled_gd"):
            for curve_lr in gpt2_figures.LOSS_CURVE_LRS:
                _gpt2_run(results, opt, curve_lr, {"valid_loss_best": 2.0}, "loss_curves")
    truncated, foreign = _bad_files(results)
    return results, truncated, foreign


def test_load_records_names_a_bad_file_strictly_or_warns_and_skips_it(results_with_bad_files):
    results, truncated, foreign = results_with_bad_files
    with pytest.raises(ValueError, match=r"truncated\.json: not valid JSON"):
        load_records(results, "gpt2_e2e")
    with pytest.raises(ValueError, match=r"foreign\.json: not a run record \(missing \['experiment'"):
        load_records(results, "glue")
    (results / "other").mkdir()
    (results / "other" / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json: not a run record \(a JSON list"):
        load_records(results, "other", on_invalid="raise")
    with pytest.warns(InvalidRecordWarning) as caught:
        records = load_records(results, on_invalid="warn")
    assert {str(truncated), str(foreign), str(results / "other" / "list.json")} == {
        str(w.message).split(": ")[0].removeprefix("skipped ") for w in caught}  # fmt: skip
    assert len(records) == len(list(results.glob("*/*.json"))) - 3
    with pytest.raises(ValueError, match="on_invalid must be 'raise' or 'warn'"):
        load_records(results, on_invalid="ignore")


def test_every_table_builder_warns_about_bad_files_and_builds_the_rest(results_with_bad_files):
    results, truncated, foreign = results_with_bad_files
    builders = (  # (builder, the bad file it reads, a line it builds from the good records)
        (lambda: gpt2_figures.table1(results), truncated, "| SGD | 0.09 | **0.4000** |"),
        (lambda: gpt2_figures.lr_sweep_table(results, "BLEU", sweep="table1"), truncated,
         "| SGD |  |  |  | 0.4000 | 0.4000 | ≥ 0.00 |"),
        (lambda: make_table.make_table(results), foreign, "| scaled_adamw | 90.0 @ 0.001 | 90.0 |"),
        (lambda: make_table.make_sweep_table(results), foreign, "| adamw | 70.0 | 88.0 | 50.0 | 88.0 | 0.00 |"),
        (lambda: peers_table(results), truncated, "| LoRA+ | 0.001 | 0.630 |"),
        (lambda: peers_table(results), foreign, "| scaled AdamW | 0.001 | 0.900 |"),
    )
    for build, bad, line in builders:
        with pytest.warns(InvalidRecordWarning) as caught:
            text = build()
        assert any(str(bad) in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert line in text


def test_make_figures_names_bad_files_in_a_warning_and_builds_everything_else(results_with_bad_files, tmp_path,
                                                                              capsys, monkeypatch):  # fmt: skip
    results, truncated, foreign = results_with_bad_files
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", InvalidRecordWarning)  # nothing may escape make_figures as a bare warning
        code = make_figures.main(["--results", str(results), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for bad in (truncated, foreign):
        assert f"WARNING: skipped {bad}: " in printed
    assert "not valid JSON" in printed and "not a run record" in printed
    summary = (out / "summary.md").read_text()
    assert "| Table 1: GPT-2 on E2E | ok |" in summary and "| Peers side by side (small presets) | ok |" in summary
    assert "| LR robustness: gpt2_e2e | ok |" in summary and "| Table 2: GLUE (Mistral-7B / MiniLM) | ok |" in summary
    assert "## Files not used (not run records, or the older record of one configuration)" in summary and str(truncated) in summary and str(foreign) in summary
    assert summary.count(str(truncated)) == 1  # named once, though every builder read the folder
    assert "## Learning-rate robustness" in summary and "| gpt2_e2e | preset=smollm2_cpu | 0.02 BLEU |" in summary
