"""make_figures.py and the figure/table code of main_figures/ on small fixture results (fake but schema-valid
records written with harness.RunRecorder into tmp_path)."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT as ROOT
from harness import RunRecorder, load_records
from main_figures import make_figures
from main_figures.lr_robustness import is_swept, lr_robustness_figure, lr_sweeps
from main_figures.peers import peer_rows, peers_table
from main_figures.theory_figures import select_best, theory_figure, theory_table

PNG = b"\x89PNG\r\n\x1a\n"
LRS = (1e-4, 1e-3, 1e-2)
# final BLEU per optimizer and lr (None: diverged, flagged `diverged`; "gpt2": diverged GPT-2-style, stopped with
# `diverged_at_step` and scored afterwards; "failed": `status: failed`). LoRA+ has the best BLEU; scaled AdamW (two
# seeds) stays within 0.02 BLEU of its best over the whole grid; LoRA-RITE is uniformly poor (the smallest spread,
# but far below the best: never the most robust).
BLEU = {
    "scaled_adamw": (0.61, 0.62, 0.615),
    "adamw": (0.50, 0.615, "gpt2"),
    "peft_riemannian": (0.58, 0.615, "failed"),
    "loraplus": (0.55, 0.63, None),
    "lora_rite": (0.40, 0.41, 0.405),
}


def _record(root, experiment, optimizer, lr, metrics, tags, seed=0, step_time=0.05, status=None):
    rec = RunRecorder(root, experiment, optimizer, {"lr": lr}, seed=seed, tags=tags)
    for step in range(3):
        rec.log_step(step, loss=1.0 / (step + 1), lr=lr, time_s=step_time)
    return rec.finish(metrics, status=status)


def write_fixture_results(root: Path) -> Path:
    for opt, values in BLEU.items():
        for lr, bleu in zip(LRS, values):
            status = "failed" if bleu == "failed" else None
            if bleu is None:
                metrics = {"BLEU": float("nan"), "diverged": True}
            elif bleu == "gpt2":  # finite BLEU (the best checkpoint before the divergence), better than any other
                metrics = {"BLEU": 0.7, "diverged_at_step": 7}
            elif bleu == "failed":
                metrics = {}
            else:
                metrics = {"BLEU": bleu}
            step_time = 0.1 if opt == "lora_rite" else 0.05
            _record(root, "gpt2_e2e", opt, lr, metrics, {"preset": "smollm2_cpu"}, step_time=step_time, status=status)
            if opt == "scaled_adamw":  # a second seed
                _record(root, "gpt2_e2e", opt, lr, {"BLEU": bleu + 0.01}, {"preset": "smollm2_cpu"}, seed=1)
    for opt in ("scaled_adamw", "adamw"):
        for lr, acc in zip(LRS, (0.80, 0.90, 0.85) if opt == "scaled_adamw" else (0.70, 0.88, 0.50)):
            _record(root, "glue", opt, lr, {"accuracy": acc}, {"preset": "minilm_sst2", "task": "sst2"})
    for conditioning, opts in (("target", ("sgd", "scaled_gd")), ("data", ("sgd", "scaled_gd"))):
        for kappa in (1.0, 100.0):
            for opt in opts:
                for lr in (0.25, 0.5):
                    slow = opt == "sgd" and kappa > 1
                    iters = 5000 if slow else int(500 / lr)
                    rec = RunRecorder(root, "theory", opt, {"lr": lr}, seed=0,
                                      tags={"kappa": kappa, "conditioning": conditioning})  # fmt: skip
                    for step in range(0, iters + 1, 100):
                        rec.log_step(step, loss=1.0, rel_loss=10 ** (-12 * step / 1000 if not slow else -step / 1000))
                    metrics = {"relative_loss": 1e-5 if slow else 1e-12, "iterations": iters, "reached_tol": not slow,
                               "diverged": False, "tol": 1e-12, "max_iters": 5000}  # fmt: skip
                    if not slow:
                        metrics["iters_to_tol"] = iters
                    rec.finish(metrics)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return write_fixture_results(tmp_path_factory.mktemp("results"))


def test_make_figures_builds_everything_of_main_figures(results, tmp_path):
    out = tmp_path / "out"
    outcomes = make_figures.build_all(results, out, only={"theory", "theory_table", "peers", "lr"}, log=lambda *_: None)
    status = {o.product.key: o.status for o in outcomes}
    assert status == {"theory": "ok", "theory_table": "ok", "peers": "ok", "lr_gpt2_e2e": "ok", "lr_glue": "ok",
                      "lr_theory": "ok"}, [(o.product.key, o.detail) for o in outcomes]  # fmt: skip
    for name in ("theory.png", "lr_robustness_gpt2_e2e.png", "lr_robustness_glue.png", "lr_robustness_theory.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "| 100 |" in (out / "theory_table.md").read_text()
    assert "LoRA+" in (out / "peers.md").read_text()


def test_peers_table_numbers_and_verdict(results):
    records = [r for r in load_records(results, "gpt2_e2e") if r.tags["preset"] == "smollm2_cpu"]
    metric, higher, rows = peer_rows(records, "gpt2_e2e")
    assert (metric, higher) == ("BLEU", True)
    row = {r.optimizer: r for r in rows}
    assert [r.optimizer for r in rows] == ["adamw", "scaled_adamw", "peft_riemannian", "loraplus", "lora_rite"]
    assert row["scaled_adamw"].best == pytest.approx(0.625) and row["scaled_adamw"].seeds == 2  # mean of 2 seeds
    assert row["scaled_adamw"].robustness.width == pytest.approx(2.0) and row["scaled_adamw"].robustness.at_edge
    assert row["loraplus"].best == 0.63 and row["loraplus"].best_lr == 1e-3
    assert row["loraplus"].robustness.width == 0.0 and row["loraplus"].diverged_lrs == 1
    # the diverged GPT-2-style run (BLEU 0.7 scored after stopping) is not a value: best stays 0.615 at 1e-3
    assert row["adamw"].best == 0.615 and row["adamw"].best_lr == 1e-3 and row["adamw"].diverged_lrs == 1
    assert row["peft_riemannian"].diverged_lrs == 1 and row["peft_riemannian"].best == 0.615  # the failed run
    assert math.isclose(row["lora_rite"].step_time_s, 0.1)
    text = peers_table(results)
    assert "Best final BLEU: **LoRA+** (0.630 at lr 0.001)" in text
    assert "LoRA+ beats scaled AdamW (0.625) by 0.005 BLEU" in text
    assert "| AdamW | 0.001 | 0.615 | 0.001 | 0.00 | 0.0001 … 0.01 (3) | 1 |" in text
    assert "| scaled AdamW | 0.001 | 0.625 | 0.0001 … 0.01 | ≥ 2.00 | 0.0001 … 0.01 (3) | 0 |" in text
    assert "| PEFT Riemannian | 0.001 | 0.615 | 0.001 | 0.00 | 0.0001 … 0.01 (3) | 1 |" in text
    assert "within 0.02 BLEU of the overall best 0.63): **scaled AdamW** (≥ 2.00 decades, lr 0.0001 … 0.01" in text
    assert "their best is not within 0.02 BLEU of the overall best: LoRA-RITE (0.41)." in text
    assert "MiniLM-L6 + LoRA on SST-2" in text and "Best final accuracy: **scaled AdamW** (0.900 at lr 0.001)" in text


def test_peers_use_the_lr_sweep_and_ignore_unscored_runs(tmp_path):
    for lr, bleu in zip(LRS, (50.0, 60.0, 55.0)):
        _record(tmp_path, "gpt2_e2e", "adamw", lr, {"BLEU": bleu}, {"preset": "smollm2_cpu", "sweep": "lr"})
    _record(tmp_path, "gpt2_e2e", "adamw", 2e-4, {"BLEU": 70.0}, {"preset": "smollm2_cpu", "sweep": "table1"})
    _record(tmp_path, "gpt2_e2e", "sgd", 1e-2, {"val_loss": 2.0}, {"preset": "smollm2_cpu", "sweep": "loss_curves"})
    text = peers_table(tmp_path)
    assert "| AdamW | 0.001 | 60.00 | 0.001 | 0.00 | 0.0001 … 0.01 (3) |" in text and "SGD" not in text
    records = load_records(tmp_path, "gpt2_e2e")
    metric, _, sweeps = lr_sweeps(records, "gpt2_e2e")
    assert metric == "BLEU" and len(sweeps) == 2  # the loss-curve run has no BLEU: not plotted
    assert lr_robustness_figure(records, "gpt2_e2e", tmp_path / "lr.png").is_file()  # the table1 panel is dropped


def test_lr_robustness_groups_by_tags_and_marks_divergence(results, tmp_path):
    records = load_records(results, "theory")
    metric, higher, sweeps = lr_sweeps(records, "theory")
    assert (metric, higher) == ("relative_loss", False)
    assert len(sweeps) == 4  # (conditioning, kappa) panels
    e2e = load_records(results, "gpt2_e2e")
    _, _, sweeps = lr_sweeps(e2e, "gpt2_e2e")
    by_opt = {opt: pts for facet in sweeps.values() for opt, pts in facet.items()}
    adamw, peft, loraplus = by_opt["adamw"], by_opt["peft_riemannian"], by_opt["loraplus"]
    assert [p.lr for p in adamw] == list(LRS) and math.isnan(adamw[-1].mean) and adamw[-1].diverged == 1  # GPT-2 style
    assert [p.lr for p in peft] == list(LRS) and math.isnan(peft[-1].mean) and peft[-1].failed == 1  # status: failed
    assert math.isnan(loraplus[-1].mean) and loraplus[-1].diverged == 1  # flagged `diverged`
    assert is_swept(e2e, "gpt2_e2e") and not is_swept(e2e[:1], "gpt2_e2e")
    assert lr_robustness_figure(e2e, "gpt2_e2e", tmp_path / "lr.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="PNG"):
        lr_robustness_figure(e2e, "gpt2_e2e", tmp_path / "lr.pdf")


def test_theory_selection_rule_and_figure(results, tmp_path):
    records = load_records(results, "theory")
    best = select_best(records)
    assert best[("target", "scaled_gd", 100.0)].lr == 0.5 and best[("target", "scaled_gd", 100.0)].iterations == 1000
    slow = best[("target", "sgd", 100.0)]
    assert not slow.reached_tol and slow.iterations == 5000
    assert ">= 5000" in theory_table(records) and "GD" in theory_table(records)
    assert theory_figure(records, tmp_path / "t.png").read_bytes()[:8] == PNG


def test_a_results_folder_that_does_not_exist_is_an_error_and_writes_nothing(tmp_path, capsys):
    assert make_figures.main(["--results", str(tmp_path / "no" / "such"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "results folder" in err and str(tmp_path / "no" / "such") in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_missing_results_are_listed_with_the_command_that_makes_them(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert make_figures.main(["--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "failed" not in summary
    for cmd in ("python main_figures/theory.py", "bash Mistral-7B/scripts/sweep.sh minilm_lr"):
        assert cmd in summary
    assert summary.count("| missing |") == len(make_figures.PRODUCTS) + len(make_figures.SWEPT)
    assert "0 built" in capsys.readouterr().out


def test_experiment_folders_modules_are_found_and_failures_isolated(results, tmp_path, monkeypatch, capsys):
    """Figures owned by experiment folders load by file path; a broken one is reported, the others still build."""
    fake = tmp_path / "repo"
    (fake / "Object_Generation").mkdir(parents=True)
    (fake / "Object_Generation" / "grid.py").write_text(
        "def make_figure(results_dir, out_png):\n    open(out_png, 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n')\n"
    )
    (fake / "Mix-of-Show").mkdir()
    (fake / "Mix-of-Show" / "figs.py").write_text("def make_figure(results_dir, out_png):\n    raise KeyError('x')\n")
    (fake / "Mistral-7B").mkdir()
    (fake / "Mistral-7B" / "make_table.py").write_text("def make_table(results_dir):\n    return '| a |\\n|---|'\n")
    monkeypatch.setattr(make_figures, "REPO_ROOT", fake)
    results = Path(shutil.copytree(results, tmp_path / "results"))
    for experiment in ("object_generation", "mix_of_show"):
        RunRecorder(results, experiment, "scaled_adamw", {"lr": 1e-4}, seed=0).finish({"score": 1.0})
    code = make_figures.main(["--results", str(results), "--out", str(tmp_path / "out")])
    assert code == 1  # Mix-of-Show's figure failed
    table = (tmp_path / "out" / "summary.md").read_text().split("\n\n")[2]  # title, command, the status table
    status = {o.split(" | ")[0].strip("| "): o.split(" | ")[1] for o in table.splitlines()[2:]}
    assert status["Diffusion grid: object generation"] == "ok"
    assert status["Diffusion grid: Mix-of-Show"] == "failed"
    assert status["Table 2: GLUE (Mistral-7B / MiniLM)"] == "ok"
    assert status["Table 1: GPT-2 on E2E"] == "missing"  # GPT-2/figures.py absent from the fake repo
    assert status["Theory: iterations vs condition number"] == "ok"
    assert (tmp_path / "out" / "table2_glue.md").read_text() == "| a |\n|---|\n"
    assert "GPT-2/figures.py not found" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"unknown product\(s\) \['tabel1'\]"):
        make_figures.build_all(results, tmp_path / "o", only={"tabel1"})


def test_command_line_runs_as_a_script(tmp_path):
    (tmp_path / "none").mkdir()  # an empty results folder: every product missing
    cmd = [sys.executable, "main_figures/make_figures.py", "--results", str(tmp_path / "none"), "--out",
           str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "missing" in proc.stdout and (tmp_path / "out" / "summary.md").is_file()
