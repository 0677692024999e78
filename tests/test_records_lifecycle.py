"""The run record's lifecycle (harness.records): one record per configuration (the config hash in the default name,
one lock per record), a record on disk from the start (running, rewritten at every evaluation and checkpoint,
closed done / diverged / failed / interrupted), finished records replaced only by finished runs, the committed
records named by today's rule; the checks GPT-2, Mistral-7B and the diffusion experiments make before training;
GPT-2's scoring failure and ``evaluate.py --record``; a predictions TSV saved as ``.txt``."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from _tiny import MixedModel
from harness import (
    REPO_ROOT, RecordLockedError, RecorderCallback, RunRecorder, TrainingDiverged, build_optimizer, config_hash,
    default_run_name, load_module, load_records, train_loop,
)  # fmt: skip
from harness import diffusion as D
from harness import rename_records
from harness.records import HASH_EXCLUDED_KEYS, RunRecord, run_slug
from test_diffusion_experiments import _compose as compose_diffusion
from test_diffusion_experiments import _load as load_diffusion
from test_diffusion_experiments import _tiny_overrides as diffusion_overrides
from test_gpt2_train import compose_cfg, run_train, train
from test_mistral_data import write_glue

e2e_metrics = sys.modules["e2e_metrics"]  # the module GPT-2/train.py imported (patched below where it fails)
evaluate = load_module(REPO_ROOT / "GPT-2" / "evaluate.py", "gpt2_evaluate")
mistral_train = load_module(REPO_ROOT / "Mistral-7B" / "train.py", "mistral_train")

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 2
BATCHES = [(X[:8], Y[:8]), (X[8:], Y[8:])]
CONFIG = {"lora": {"r": 4}, "train": {"steps": 10}, "results_dir": "/a", "threads": 1, "wandb": None, "run_name": None}


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def recorder(root, config=CONFIG, launch=None, **kwargs):
    return RunRecorder(root, "demo", "adamw", {"lr": 1e-3}, 0, config=config, tags={"preset": "tiny"},
                       launch=launch, **kwargs)  # fmt: skip


def on_disk(path):
    return json.loads(path.read_text())


def forbid(*_, **__):
    raise AssertionError("the run went on past its checks")


# ---------------------------------------------------------------------------------------------- naming
def test_configs_that_differ_never_share_a_record(tmp_path):
    r4, r8 = recorder(tmp_path), recorder(tmp_path, {**CONFIG, "lora": {"r": 8}})
    assert r4.path != r8.path
    for rec in (r4, r8):
        slug, digest = rec.record.run_name.rsplit("_", 1)
        assert slug == "adamw_lr0.001_seed0_preset-tiny" and len(digest) == 8 and int(digest, 16) >= 0
        assert rec.path.name == f"{rec.record.run_name}.json"
    # what cannot change the results is left out of the hash: every key of the one exclusion tuple
    for key in HASH_EXCLUDED_KEYS:
        assert recorder(tmp_path, {**CONFIG, key: {"changed": key}}).path == r4.path, key
    assert recorder(tmp_path, {**CONFIG, "train": {"steps": 11}}).path != r4.path
    # a multi-process launch is another configuration
    assert recorder(tmp_path, launch={}).path == r4.path
    assert recorder(tmp_path, launch={"world_size": 2}).path not in (r4.path, recorder(tmp_path, launch={
        "world_size": 4}).path)
    # the stored fields give back the name
    path = r8.finish({"BLEU": 0.5})
    stored = on_disk(path)
    assert stored["config_hash"] == config_hash(stored["config"], stored["launch"], optimizer=stored["optimizer"],
                                                hparams=stored["hparams"], seed=stored["seed"], tags=stored["tags"])
    assert path.stem == default_run_name(stored["optimizer"], stored["hparams"], stored["seed"], stored["tags"],
                                         stored["config"], stored["launch"])  # fmt: skip
    assert recorder(tmp_path, run_name="mine").path.name == "mine.json"  # a name given is kept as it is


@pytest.mark.slow
def test_a_gpt2_sweep_over_the_rank_keeps_a_record_per_rank(tmp_path, data_root):
    run_train("-m", "preset=tiny", "lora.r=2,8", "data.test_mrs=0", f"results_dir={tmp_path}",
              f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path)
    records = load_records(tmp_path, "gpt2_e2e")
    assert sorted(r.config["lora"]["r"] for r in records) == [2, 8]
    assert all(r.status == "done" and len(r.steps) == 3 for r in records)


def test_the_committed_records_are_named_by_the_default_rule():
    results = REPO_ROOT / "results"
    records = load_records(results)
    assert len(records) > 200
    names = set()
    for path in sorted(results.glob("*/*.json")):
        rec = RunRecord.from_dict(on_disk(path), str(path))
        if rec.config.get("run_name") is None and rec.experiment == "width":
            continue  # the width study names its runs itself (width_<series>_n<width>_lr<lr>_seed<seed>)
        assert path.stem == rec.run_name == default_run_name(rec.optimizer, rec.hparams, rec.seed, rec.tags,
                                                             rec.config, rec.launch), path  # fmt: skip
        names.add((path.parent, rec.run_name))
    keyed = [p for p in results.glob("*/*/*") if p.is_file()]
    assert keyed and all((p.parent.parent, p.name.rsplit(".", 1)[0]) in names for p in keyed)


def test_old_records_are_renamed_with_their_files(tmp_path):
    legacy = {"experiment": "demo", "optimizer": "adamw", "hparams": {"lr": 0.001}, "seed": 0,
              "config": {"lora": {"r": 4}}, "tags": {"preset": "tiny"}, "run_name": "adamw_lr0.001_seed0_preset-tiny",
              "final_metrics": {"BLEU": 0.5}, "schema_version": 1}  # fmt: skip
    folder = tmp_path / "demo"
    (folder / "predictions").mkdir(parents=True)
    text = json.dumps(legacy, indent=1) + "\n"
    (folder / "adamw_lr0.001_seed0_preset-tiny.json").write_text(text)
    (folder / "predictions" / "adamw_lr0.001_seed0_preset-tiny.tsv").write_text("MR\toutput\n")
    (folder / "mine.json").write_text(json.dumps({**legacy, "run_name": "mine"}, indent=1) + "\n")
    assert len(rename_records.main([str(tmp_path), "--dry-run"])) == 1  # one record (with its predictions)
    assert (folder / "adamw_lr0.001_seed0_preset-tiny.json").is_file()  # a dry run changes nothing
    rename_records.main([str(tmp_path)])
    new = default_run_name("adamw", {"lr": 0.001}, 0, {"preset": "tiny"}, {"lora": {"r": 4}})
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        f"{new}.json", "mine.json", f"predictions/{new}.tsv"]
    assert (folder / f"{new}.json").read_text() == text.replace("adamw_lr0.001_seed0_preset-tiny", new)
    assert rename_records.planned_migrations(tmp_path) == []  # nothing left to rename


# ---------------------------------------------------------------------------------------------- one run per record
def test_a_second_run_of_the_same_record_stops_before_any_work(tmp_path):
    first = recorder(tmp_path).start()
    before = first.path.read_text()
    second = recorder(tmp_path)
    with pytest.raises(RecordLockedError, match=f"another run of this configuration is writing .*{os.getpid()}"):
        second.check_can_start()
    with pytest.raises(RecordLockedError, match="another run of this configuration"):
        with second:
            raise AssertionError("never runs")
    assert first.path.read_text() == before and first.lock_path.is_file()
    first.finish({"BLEU": 0.5})
    assert not first.lock_path.exists()
    with second:
        second.finish({"BLEU": 0.6})
    assert on_disk(second.path)["final_metrics"] == {"BLEU": 0.6}


def test_a_stale_lock_is_reported_with_how_to_remove_it_never_broken(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a process that has exited (and was reaped)
    rec = recorder(tmp_path)
    rec.path.parent.mkdir(parents=True)
    for host, message in ((socket.gethostname(), "stale lock .* is no longer running"), ("elsewhere", "another host"),
                          (None, "cannot be read")):  # fmt: skip
        lock = {"pid": dead, "host": host, "started": "2020-01-01T00:00:00+00:00", "command": "train.py"}
        rec.lock_path.write_text("{broken" if host is None else json.dumps(lock))
        with pytest.raises(RecordLockedError, match=message) as err:
            rec.start()
        assert f"rm '{rec.lock_path}'" in str(err.value)
        assert rec.lock_path.is_file() and not rec.path.exists()  # nothing was written, the lock stays
    rec.lock_path.unlink()
    rec.finish({})


def test_a_resumed_run_takes_over_only_a_dead_local_processes_lock(tmp_path, capsys):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    killed = recorder(tmp_path).start()  # a run killed with SIGKILL: its record says running, its lock stays
    killed.lock_path.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train.py"}))
    fresh = recorder(tmp_path)
    with pytest.raises(RecordLockedError, match="continue it with resume=true"):
        fresh.check_can_start()
    for host, pid, message in (("elsewhere", dead, "another host"), (socket.gethostname(), os.getpid(),
                                                                       "another run of this configuration")):
        killed.lock_path.write_text(json.dumps({"pid": pid, "host": host, "command": "train.py"}))
        with pytest.raises(RecordLockedError, match=message):
            recorder(tmp_path, resume=True).start()
    killed.lock_path.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train.py"}))
    resumed = recorder(tmp_path, resume=True)
    resumed.check_can_start()
    with resumed:
        assert f"taking over {resumed.lock_path}, left by process {dead}" in capsys.readouterr().err
        assert json.loads(resumed.lock_path.read_text())["pid"] == os.getpid()
        resumed.finish({"BLEU": 0.5})
    assert on_disk(resumed.path)["status"] == "done" and not resumed.lock_path.exists()


def test_gpt2_stops_before_loading_anything_when_its_record_is_locked(tmp_path, monkeypatch):
    cfg = compose_cfg("preset=tiny", f"results_dir={tmp_path}")
    holder = train.make_recorder(cfg).start()
    monkeypatch.setattr(train, "load_model", forbid)
    with pytest.raises(RecordLockedError, match="another run of this configuration"):
        train.main(cfg)
    holder.finish({})


# ---------------------------------------------------------------------------------------------- a record from the start
def test_the_record_is_on_disk_from_the_start_and_rewritten_at_each_evaluation(tmp_path):
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2)
    seen = []

    def eval_fn(step):
        seen.append(on_disk(rec.path))  # what a kill at this moment would leave
        return {"loss_full": loss_fn(model, (X, Y)).item()}

    with recorder(tmp_path) as rec:
        first = on_disk(rec.path)
        assert first["status"] == "running" and first["steps"] == [] and first["schema_version"] == 2
        assert json.loads(rec.lock_path.read_text())["pid"] == os.getpid()
        train_loop(model, opt, BATCHES, loss_fn, epochs=5, recorder=rec, progress=False, eval_fn=eval_fn,
                   eval_every=4)
        assert [len(s["evals"]) for s in seen] == [0, 1]  # each evaluation is on disk before the next one
        running = on_disk(rec.path)
        assert running["status"] == "running" and len(running["evals"]) == 2 and len(running["steps"]) == 8
        rec.save(final_metrics={"partial": 1})
        assert on_disk(rec.path)["final_metrics"] == {"partial": 1}
        rec.finish({"BLEU": 0.5})
    done = on_disk(rec.path)
    assert done["status"] == "done" and done["error"] is None and len(done["steps"]) == 10
    assert done["final_metrics"] == {"partial": 1, "BLEU": 0.5} and not rec.lock_path.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def _raise(exc):
    raise exc


@pytest.mark.parametrize("end,status,error_type", [
    (lambda rec: _raise(ValueError("bad value 3")), "failed", "ValueError"),
    (lambda rec: _raise(KeyboardInterrupt()), "interrupted", "KeyboardInterrupt"),
    (lambda rec: _raise(TrainingDiverged("loss is nan at step 3", step=3)), "diverged", "TrainingDiverged"),
    (lambda rec: None, "failed", "RuntimeError"),  # the block ended without finish()
])  # fmt: skip
def test_how_a_run_ends_is_its_status(tmp_path, end, status, error_type):
    with pytest.raises(BaseException) as raised:
        with recorder(tmp_path) as rec:
            rec.log_step(1, loss=2.0)
            end(rec)
    assert type(raised.value).__name__ == error_type
    stored = on_disk(rec.path)
    assert stored["status"] == status and stored["error"]["type"] == error_type and len(stored["steps"]) == 1
    if status == "diverged":
        assert stored["final_metrics"]["diverged_at_step"] == 3
    if error_type == "ValueError":
        assert stored["error"]["message"] == "bad value 3"
    assert not rec.lock_path.exists()


def test_a_run_stopped_on_divergence_is_closed_as_diverged(tmp_path):
    model = MixedModel()
    opt = build_optimizer(model, "sgd", lr=1e-2)
    with recorder(tmp_path) as rec:
        with pytest.warns(UserWarning, match="diverged at step 1"):
            train_loop(model, opt, [(X[:8] * float("inf"), Y[:8])], loss_fn, recorder=rec, progress=False,
                       stop_on_divergence=True)
        assert on_disk(rec.path)["final_metrics"] == {"diverged_at_step": 1}  # on disk at once
        rec.finish({"BLEU": 0.1})
    assert on_disk(rec.path)["status"] == "diverged"


def test_sigterm_interrupts_the_run_and_closes_its_record(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from harness import RunRecorder
        with RunRecorder({str(tmp_path)!r}, "demo", "sgd", {{"lr": 0.1}}, 0) as rec:
            for step in range(1, 10 ** 6):
                rec.log_step(step, loss=1.0)
                if step == 3:
                    rec.save()
                    print(rec.path, flush=True)
                time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    time.sleep(0.5)  # steps logged after the last save must reach the closed record too
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted (RunInterrupted: SIGTERM)" in err
    stored = json.loads(open(path).read())
    assert stored["status"] == "interrupted" and stored["error"] == {"type": "RunInterrupted", "message": "SIGTERM"}
    assert len(stored["steps"]) > 3 and not list(tmp_path.rglob("*.lock"))


def test_a_finished_record_is_replaced_only_by_a_finished_run(tmp_path):
    def run(outputs, fail=None):
        with recorder(tmp_path) as rec:
            with rec.output_file("predictions", ".tsv") as tmp:
                tmp.write_text(outputs)
            if fail:
                raise fail
            rec.finish({"BLEU": len(outputs)})
        return rec

    first = run("old")
    record_before, predictions = first.path.read_text(), first.folder / "predictions" / f"{first.path.stem}.tsv"
    assert on_disk(first.path)["files"] == {"predictions": f"predictions/{first.path.stem}.tsv"}
    for fail in (RuntimeError("METEOR exited"), KeyboardInterrupt()):
        with pytest.raises(type(fail)):
            run("new", fail)
        assert first.path.read_text() == record_before and predictions.read_text() == "old"  # untouched
        pending = on_disk(first.pending_path)
        assert pending["status"] in ("failed", "interrupted") and pending["run_name"] == first.path.stem
        assert (first.folder / pending["files"]["predictions"]).read_text() == "new"
        assert pending["files"]["predictions"] == f"predictions/{first.path.stem}.pending.tsv"
    assert [r.status for r in load_records(tmp_path)] == ["done"]  # a configuration's result: its finished record
    assert sorted(r.status for r in load_records(tmp_path, pending=True)) == ["done", "interrupted"]
    second = run("newer")
    assert second.write_path == second.path and on_disk(second.path)["final_metrics"] == {"BLEU": 5}
    assert predictions.read_text() == "newer" and on_disk(second.path)["files"] == on_disk(first.path)["files"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [second.path.name, predictions.name]


def test_a_failed_re_run_scored_later_replaces_the_finished_record(tmp_path):
    with recorder(tmp_path) as first:
        first.finish({"BLEU": 0.1})
    with pytest.raises(RuntimeError):
        with recorder(tmp_path) as rerun:
            with rerun.output_file("predictions", ".tsv") as tmp:
                tmp.write_text("MR\toutput\n")
            raise RuntimeError("scoring failed")
    with RunRecorder.reopen(rerun.pending_path) as reopened:  # what evaluate.py --record does
        assert reopened.record.status == "failed" and reopened.write_path == rerun.pending_path
        reopened.finish({"BLEU": 0.2})
    stored = on_disk(first.path)
    assert stored["status"] == "done" and stored["final_metrics"] == {"BLEU": 0.2} and stored["error"] is None
    assert stored["files"] == {"predictions": f"predictions/{first.path.stem}.tsv"}
    assert not rerun.pending_path.exists() and (tmp_path / "demo" / stored["files"]["predictions"]).is_file()
    with pytest.raises(ValueError, match="a record named after its run_name"):
        RunRecorder.reopen(first.path.rename(first.path.with_name("elsewhere.json")))


def test_an_unfinished_record_is_replaced_by_the_next_run(tmp_path):
    with pytest.raises(ValueError):
        with recorder(tmp_path):
            raise ValueError("crash")
    with recorder(tmp_path) as rec:
        assert rec.write_path == rec.path  # a failed record holds no finished run: replaced at once
        rec.finish({"BLEU": 0.5})
    assert on_disk(rec.path)["status"] == "done" and not rec.pending_path.exists()


def test_a_file_that_is_not_a_record_is_never_overwritten(tmp_path):
    rec = recorder(tmp_path)
    rec.path.parent.mkdir(parents=True)
    rec.path.write_text("my notes")
    with pytest.raises(ValueError, match="not valid JSON"):
        rec.start()
    assert rec.path.read_text() == "my notes" and not rec.lock_path.exists()


def test_output_files_are_atomic_and_named_after_the_record(tmp_path):
    with recorder(tmp_path) as rec:
        with pytest.raises(OSError):
            with rec.output_file("samples", ".png") as tmp:
                tmp.write_bytes(b"half")
                raise OSError("disk full")
        assert not list((rec.folder / "samples").iterdir())
        assert on_disk(rec.path)["files"] == {}
        with rec.output_file("samples", ".png") as tmp:
            assert tmp.suffix == ".png" and tmp.parent == rec.folder / "samples"
            tmp.write_bytes(b"png")
        assert on_disk(rec.path)["files"] == {"samples": f"samples/{rec.path.stem}.png"}
        with pytest.raises(ValueError, match="kind is a folder name"):
            with rec.output_file("../x", ".png"):
                pass
        rec.finish({})


def test_records_of_schema_1_and_2_are_read_and_others_named(tmp_path):
    committed = load_records(REPO_ROOT / "results")
    assert {r.schema_version for r in committed} <= {1, 2} and any(r.status is None for r in committed)
    recorder(tmp_path).finish({"BLEU": 0.5})
    (rec,) = load_records(tmp_path)
    assert rec.schema_version == 2 and rec.status == "done" and rec.launch == {} and len(rec.config_hash) == 8
    with pytest.raises(ValueError, match="schema_version 3, expected one of"):
        RunRecord.from_dict({"experiment": "d", "optimizer": "sgd", "hparams": {}, "seed": 0, "schema_version": 3})


def test_the_trainer_callback_rewrites_the_record_at_evaluations_and_checkpoints(tmp_path):
    rec = recorder(tmp_path).start()
    callback = RecorderCallback(rec)
    state = SimpleNamespace(global_step=1)
    callback.on_step_begin(None, state, None)
    callback.on_step_end(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 0.7, "learning_rate": 1e-3})
    assert on_disk(rec.path)["steps"] == []  # steps alone are kept in memory ...
    callback.on_save(None, state, None)
    assert [s["loss"] for s in on_disk(rec.path)["steps"]] == [0.7]  # ... and written at a checkpoint
    callback.on_log(None, state, None, logs={"eval_accuracy": 0.5})
    assert on_disk(rec.path)["evals"] == [{"step": 1, "accuracy": 0.5}]  # and at an evaluation
    rec.finish({})


# ---------------------------------------------------------------------------------------------- GPT-2: checks first
def test_gpt2_checks_java_before_training(tmp_path, monkeypatch):
    cfg = compose_cfg("preset=tiny", f"results_dir={tmp_path}")
    monkeypatch.setenv("PATH", str(tmp_path / "bin-without-java"))
    monkeypatch.setattr(train, "load_model", forbid)
    with pytest.raises(RuntimeError, match="`java` was not found on PATH"):
        train.main(cfg)
    assert not list(tmp_path.rglob("*.json"))
    train.preflight(compose_cfg("preset=tiny", f"results_dir={tmp_path}", "data.test_mrs=0"))  # no scoring: no java


def test_gpt2_checks_the_metric_jars_model_files_and_results_folder(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocoevalcap" else
                      find_spec(name, *a))  # fmt: skip
        with pytest.raises(RuntimeError, match="pycocoevalcap"):
            train.preflight(compose_cfg("preset=tiny", f"results_dir={tmp_path}"))
    with pytest.raises(FileNotFoundError, match="model.tokenizer not found"):
        train.preflight(compose_cfg("preset=tiny", f"results_dir={tmp_path}", f"model.tokenizer={tmp_path / 'no'}"))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setattr(train, "load_model", forbid)
    with pytest.raises(PermissionError, match="results folder .*a_file.* is not writable"):
        train.main(compose_cfg("preset=tiny", f"results_dir={blocked}"))


def _gpt2_record(tmp_path):
    (path,) = (tmp_path / "gpt2_e2e").glob("*.json")
    return path, on_disk(path)


@pytest.mark.slow
def test_a_gpt2_scoring_failure_keeps_the_run_and_evaluate_record_scores_it_later(tmp_path, data_root, monkeypatch):
    cfg = compose_cfg("preset=tiny", f"results_dir={tmp_path}")
    with monkeypatch.context() as patch:
        patch.setattr(e2e_metrics, "score_corpus", lambda *a: _raise(RuntimeError("METEOR exited (code 1): test")))
        with pytest.raises(RuntimeError, match="METEOR exited"):
            train.main(cfg)
    path, failed = _gpt2_record(tmp_path)
    assert failed["status"] == "failed" and failed["error"] == {"type": "RuntimeError",
                                                                "message": "METEOR exited (code 1): test"}
    assert failed["final_metrics"]["valid_loss_best"] > 0 and "BLEU" not in failed["final_metrics"]
    assert len(failed["steps"]) == 3 and failed["files"] == {"predictions": f"predictions/{path.stem}.tsv"}
    predictions = (tmp_path / "gpt2_e2e" / failed["files"]["predictions"]).read_text()
    assert predictions.startswith("MR\toutput\n") and len(predictions.splitlines()) == 3
    scores = evaluate.main(["--record", str(path), "--json"])
    done = on_disk(path)
    assert done["status"] == "done" and done["error"] is None and done["final_metrics"]["BLEU"] == scores["BLEU"]
    assert {k: done["final_metrics"][k] for k in failed["final_metrics"]} == failed["final_metrics"]
    assert done["final_metrics"]["test_mrs"] == 2 and done["steps"] == failed["steps"]
    assert not list(tmp_path.rglob("*.lock"))


@pytest.mark.slow
def test_a_kill_during_scoring_never_leaves_new_predictions_beside_the_old_record(tmp_path, data_root, monkeypatch):
    cfg = compose_cfg("preset=tiny", f"results_dir={tmp_path}")
    scores = {name: 0.5 for name in e2e_metrics.METRIC_NAMES}
    monkeypatch.setattr(e2e_metrics, "score_corpus", lambda *a: dict(scores))
    train.main(cfg)
    path, done = _gpt2_record(tmp_path)
    record_before = path.read_text()
    predictions = tmp_path / "gpt2_e2e" / done["files"]["predictions"]
    predictions_before = predictions.read_text()
    monkeypatch.setattr(e2e_metrics, "score_corpus", lambda *a: _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg)  # the same configuration again
    assert path.read_text() == record_before and predictions.read_text() == predictions_before
    pending = on_disk(path.with_name(f"{path.stem}.pending.json"))
    assert pending["status"] == "interrupted" and pending["files"]["predictions"].endswith(".pending.tsv")


# ---------------------------------------------------------------------------------------------- evaluate.py
def test_a_tsv_saved_as_txt_is_read_by_its_header(tmp_path):
    mrs = ["name[A]", "name[B]"]
    table = tmp_path / "outputs.txt"
    e2e_metrics.write_predictions(table, list(reversed(mrs)), ["B out.", "A out."])
    assert e2e_metrics.read_predictions(table, mrs) == ["A out.", "B out."]
    (tmp_path / "comma.txt").write_text("mr,prediction\nname[B],b\nname[A],a\n")
    assert e2e_metrics.read_predictions(tmp_path / "comma.txt", mrs) == ["a", "b"]
    (tmp_path / "plain.txt").write_text("MR\tis not a header here\nsecond output\n")
    assert e2e_metrics.read_predictions(tmp_path / "plain.txt", mrs) == ["MR\tis not a header here", "second output"]


def test_evaluate_record_arguments_and_a_record_without_predictions(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["pred.txt", "refs.csv", "--record", "r.json"])
    assert "give no PRED, REFS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["pred.txt"])
    path = recorder(tmp_path).finish({"valid_loss_best": 2.0})
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--record", str(path)])
    assert err.value.code == 2 and "names no predictions file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the other experiments
def test_mistral_checks_its_files_and_folders_before_loading(tmp_path, monkeypatch):
    glue = write_glue(tmp_path / "glue")
    (glue / "RTE" / "dev.tsv").unlink()
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(mistral_train, "load_model", forbid)
    from hydra import compose, initialize_config_dir

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "Mistral-7B" / "conf"), version_base="1.3"):
            return compose("config", overrides=[f"model.name_or_path={model}", "quantize=false", "task=rte",
                                                f"results_dir={tmp_path / 'results'}", *overrides])

    with pytest.raises(FileNotFoundError, match="GLUE file.* not found.*dev.tsv"):
        mistral_train.train(cfg(f"data.root={glue}", f"output_dir={tmp_path / 'out'}"))
    write_glue(glue)
    with pytest.raises(FileNotFoundError, match="model.name_or_path not found"):
        mistral_train.train(cfg(f"data.root={glue}", f"model.name_or_path={tmp_path / 'none'}"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="output_dir .* is not writable"):
        mistral_train.train(cfg(f"data.root={glue}", f"output_dir={tmp_path / 'a_file'}"))
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("experiment", ["object_generation", "mix_of_show"])
def test_diffusion_checks_its_files_and_folders_before_loading(tmp_path, data_root, monkeypatch, experiment):
    train_module = load_diffusion(experiment, "train")
    monkeypatch.setattr(D, "load_lora_components", forbid)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="results folder .* is not writable"):
        train_module.main(compose_diffusion(experiment, diffusion_overrides(tmp_path / "a_file", "adamw")))
    with pytest.raises(FileNotFoundError, match="model.gpt2_dir not found"):
        train_module.main(compose_diffusion(experiment, diffusion_overrides(
            tmp_path, "adamw", f"model.gpt2_dir={tmp_path / 'no_tokenizer'}")))
    assert not list(tmp_path.rglob("*.json"))


def test_the_slug_is_what_it_was():  # the readable part of the default name did not change
    assert run_slug("scaled_gd", {"lr": "1e-3", "reg": 0.0}, 0, {"kappa": 10}) == \
        "scaled_gd_lr0.001_reg0_seed0_kappa-10"
