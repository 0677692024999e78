"""The results schema round trip that main_figures relies on: RunRecorder -> JSON -> load_records."""

import json
import math

import pytest

from harness import RunRecorder, load_records


def test_recorder_to_load_records_round_trip(tmp_path):
    rec = RunRecorder(
        tmp_path, experiment="gpt2_e2e", optimizer="scaled_adamw",
        hparams={"lr": 8e-4, "reg": 1e-6, "betas": (0.7, 0.8)}, seed=110, config={"model": {"name": "tiny"}},
        tags={"preset": "smollm2_cpu"},
    )  # fmt: skip
    for step in range(3):
        rec.log_step(step, loss=2.0 - step, lr=8e-4, time_s=0.1 * (step + 1))
    rec.log_metrics(step=2, val_loss=1.5)
    path = rec.finish(final_metrics={"BLEU": 61.2, "diverged": False, "NIST": float("nan")})
    assert path == tmp_path / "gpt2_e2e" / f"{rec.record.run_name}.json"

    (loaded,) = load_records(tmp_path, experiment="gpt2_e2e")
    assert loaded.experiment == "gpt2_e2e" and loaded.optimizer == "scaled_adamw" and loaded.seed == 110
    assert loaded.hparams == {"lr": 8e-4, "reg": 1e-6, "betas": [0.7, 0.8]}
    assert loaded.tags == {"preset": "smollm2_cpu"} and loaded.config == {"model": {"name": "tiny"}}
    assert [s["loss"] for s in loaded.steps] == [2.0, 1.0, 0.0]
    assert loaded.evals == [{"step": 2, "val_loss": 1.5}]
    assert loaded.final_metrics == {"BLEU": 61.2, "diverged": False, "NIST": None}  # non-finite -> null
    assert math.isclose(loaded.step_time_s, 0.2)
    assert {"device", "torch"} <= set(loaded.hardware) and loaded.created and loaded.command
    assert load_records(tmp_path) == [loaded]  # all experiments


def test_same_configuration_replaces_its_record_and_bad_files_are_named(tmp_path):
    for bleu in (1.0, 2.0):
        RunRecorder(tmp_path, "glue", "adamw", {"lr": 1e-3}, seed=0, tags={"task": "sst2"}).finish({"accuracy": bleu})
    (loaded,) = load_records(tmp_path, "glue")
    assert loaded.final_metrics["accuracy"] == 2.0

    (tmp_path / "glue" / "stray.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="stray.json"):
        load_records(tmp_path, "glue")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nowhere")
