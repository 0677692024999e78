"""GPT-2/figures.py (Table 1, LR sweep table, loss curves, runtime figure) and GPT-2/runtime.py, on tiny inputs."""

import json

import pytest

from harness import RunRecorder, load_module, load_records

figures = load_module("GPT-2/figures.py")
runtime = load_module("GPT-2/runtime.py")

PAPER_LR = {"sgd": 9e-2, "scaled_gd": 2e-2, "adamw": 2e-4, "scaled_adamw": 8e-4}


def fake_run(results, optimizer, lr, metrics, sweep, preset="smollm2_cpu", losses=(3.0, 2.0, 1.5)):
    rec = RunRecorder(results, "gpt2_e2e", optimizer, {"lr": lr}, 110, tags={"preset": preset, "sweep": sweep})
    for i, loss in enumerate(losses, 1):
        rec.log_step(i, loss=loss, lr=lr, time_s=0.1)
    return rec.finish({**metrics, "steps": len(losses), "test_mrs": 20})


def scores(x):
    return {"BLEU": x, "NIST": 8 * x, "METEOR": x / 2, "ROUGE_L": x, "CIDEr": 3 * x}


def test_table1_takes_each_optimizer_at_its_paper_lr(tmp_path):
    for i, (opt, lr) in enumerate(PAPER_LR.items()):
        fake_run(tmp_path, opt, lr, scores(0.1 * (i + 1)), "table1")
    fake_run(tmp_path, "adamw", 1e-3, scores(0.9), "lr")  # not at the paper lr: not in Table 1
    table = figures.table1(tmp_path)
    lines = table.splitlines()
    assert lines[0].startswith("**smollm2_cpu**: 20 test MRs, 3 training steps")
    assert lines[2] == "| optimizer | lr | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    assert [ln.split("|")[1].strip() for ln in lines[4:8]] == ["SGD", "scaled GD", "AdamW", "scaled AdamW"]
    assert "| AdamW | 0.0002 | 0.3000 | 2.4000 | 0.1500 | 0.3000 | 0.9000 |" in table
    assert "| scaled AdamW | 0.0008 | **0.4000** | **3.2000** |" in table
    with pytest.raises(FileNotFoundError, match="no gpt2_e2e records"):
        figures.table1(tmp_path, preset="paper")


def test_lr_sweep_table_and_loss_curves(tmp_path):
    for opt in ("adamw", "scaled_adamw"):
        for lr in (1e-4, 1e-3):
            fake_run(tmp_path, opt, lr, scores(lr * 100), "lr")
    path = fake_run(tmp_path, "adamw", 1e-2, {"diverged_at_step": 3}, "lr")
    table = figures.lr_sweep_table(tmp_path, "BLEU")
    assert "| optimizer \\ lr (BLEU) | 0.0001 | 0.001 | 0.01 |" in table
    assert "| AdamW | 0.0100 | 0.1000 | diverged@3 |" in table and "| scaled AdamW | 0.0100 | 0.1000 |  |" in table
    for opt in ("sgd", "scaled_gd"):
        for lr in figures.LOSS_CURVE_LRS:
            fake_run(tmp_path, opt, lr, {"valid_loss_best": 1.0}, "loss_curves")
    out = figures.loss_curves(tmp_path, tmp_path / "fig" / "loss.png")
    assert out.stat().st_size > 10_000
    assert path.exists()


def test_runtime_benchmark_writes_records_and_figure(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 97}))
    paths = runtime.main(["--config", str(config), "--optimizers", "adamw", "scaled_adamw", "--ranks", "2", "4",
                          "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "8", "--device", "cpu",
                          "--results-dir", str(tmp_path)])
    assert len(paths) == 4
    records = load_records(tmp_path, "gpt2_runtime")
    assert {(r.optimizer, r.tags["r"]) for r in records} == {(o, r) for o in ("adamw", "scaled_adamw") for r in (2, 4)}
    for r in records:
        assert len(r.steps) == 2 and r.step_time_s > 0 and r.final_metrics["opt_time_s"] > 0
        assert r.final_metrics["trainable_params"] == 2 * r.tags["r"] * (16 + 16)
        assert r.hparams["lr"] == PAPER_LR[r.optimizer]
    table = figures.runtime_table(tmp_path)
    assert table.count("| cpu | 2 x 8 |") == 4 and "| scaled AdamW | 4 |" in table and "| 128 |" in table
    out = figures.runtime_figure(tmp_path, tmp_path / "runtime.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        runtime.main(["--config", str(config), "--optimizers", "adam"])


def test_readme_results_section_is_regenerated(tmp_path):
    for opt, lr in PAPER_LR.items():
        fake_run(tmp_path, opt, lr, scores(0.5), "table1")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n")
    figures.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("<!-- results:end -->\noutro\n")
    assert "### Table 1" in text and "| scaled GD | 0.02 |" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        figures.update_readme(readme, tmp_path)
