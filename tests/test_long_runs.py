"""Re-runnable sweeps and the long CPU runs: ``resume=auto`` (continue from the latest complete checkpoint, else start
afresh, taking over the stale lock of a killed local run), ``skip_finished`` (a finished configuration is not run
again), the long presets and sweeps as the README lists them, and the driver that runs a step's jobs as two halves
side by side (main_figures/long_runs.py), end to end on the tiny GPT-2 preset."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from harness import REPO_ROOT, RecordLockedError, RunCheckpoints, RunRecorder, load_module, load_records, skip_finished
from harness.checkpoint import LATEST, MANIFEST
from main_figures import long_runs
from main_figures.long_runs import LONG_STEPS, LongStep, Part, halves, run_step, sweep_jobs
from main_figures.reproduce_cpu import default_steps, select_steps

config_groups = load_module(REPO_ROOT / "Mistral-7B" / "config_groups.py")
config_groups.register_config_groups()


def _sealed(checkpoints: RunCheckpoints, step: int) -> None:
    folder = checkpoints.staging(step)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(checkpoints.config))
    checkpoints.seal(folder, step)


# ------------------------------------------------------------------------------------------------ resume=auto
def test_resume_auto_continues_from_a_complete_checkpoint_else_starts_afresh(tmp_path, capsys):
    folder, config = tmp_path / "run", {"optim": {"lr": 1e-3}, "resume": "auto"}
    fresh = RunCheckpoints(folder, every=2, resume="auto", config=config)
    assert fresh.resume_from is None and fresh.resumed_step == 0
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):  # resume=true still needs one
        RunCheckpoints(folder, every=2, resume=True, config=config)
    cut_short = folder / ".tmp-step-2"
    cut_short.mkdir(parents=True)
    assert RunCheckpoints(folder, every=2, resume="auto", config=config).resume_from is None
    assert not cut_short.exists() and "starting afresh" in capsys.readouterr().out  # never complete: removed
    _sealed(fresh, 2)
    _sealed(fresh, 4)
    resumed = RunCheckpoints(folder, every=2, resume="auto", config={**config, "resume": True, "skip_finished": True})
    assert resumed.resume_from == folder / "step-4" and resumed.resumed_step == 4
    with pytest.raises(ValueError, match=r"another configuration \(optim.lr"):  # auto keeps resume=true's checks
        RunCheckpoints(folder, every=2, resume="auto", config={"optim": {"lr": 1e-2}, "resume": "auto"})
    with pytest.raises(ValueError, match="resume must be true, false or auto, got 'always'"):
        RunCheckpoints(folder, every=2, resume="always", config=config)
    with pytest.raises(ValueError, match="resume must be true, false or auto"):
        RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, resume="yes")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _left_running(tmp_path) -> RunRecorder:
    """A record left ``running`` by a killed process of this host: its lock names a pid that is gone."""
    recorder = RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, config={"x": 1})
    recorder.start()
    recorder.lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "t",
                                              "command": "train.py"}))  # fmt: skip
    return recorder


def test_resume_auto_replaces_a_running_record_of_a_killed_process(tmp_path, capsys):
    killed = _left_running(tmp_path)
    with pytest.raises(RecordLockedError, match="stale lock"):  # without resume the lock stops the run
        RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, config={"x": 1}).check_can_start()
    again = RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, config={"x": 1}, resume="auto")
    again.check_can_start()
    with again:
        assert "taking over" in capsys.readouterr().err
        again.finish({"accuracy": 0.5})
    [record] = load_records(tmp_path, "exp")
    assert record.run_name == killed.record.run_name and record.status == "done"
    assert not again.lock_path.exists()


# ------------------------------------------------------------------------------------------------ skip_finished
def test_skip_finished_skips_done_and_diverged_records_only(tmp_path, capsys):
    def recorder():
        return RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, config={"x": 1})

    assert skip_finished(True, recorder()) is None  # no record yet
    running = recorder().start()
    assert skip_finished(True, recorder()) is None  # running: not finished
    running.finish({"diverged_at_step": 3})
    path = skip_finished(True, recorder())
    assert path == running.path and f"{path} is finished (diverged)" in capsys.readouterr().out
    assert skip_finished(False, recorder()) is None  # off: the run replaces the record, as before
    assert skip_finished(True, None) is None  # the processes without a recorder
    with pytest.raises(ValueError, match="skip_finished must be true or false, got 'yes'"):
        skip_finished("yes", recorder())


SKIPPED = {"GPT-2": ("gpt2_e2e", ["preset=tiny", "run_name=finished"]),
           "Mistral-7B": ("glue", ["preset=minilm_sst2", "run_name=finished"]),
           "Object_Generation": ("object_generation", ["preset=tiny", "train.steps=1", "sample.steps=1",
                                                       "sample.seeds=[0]"]),
           "Mix-of-Show": ("mix_of_show", ["preset=tiny", "train.steps=1", "sample.steps=1", "sample.seeds=[0]"])}


@pytest.mark.parametrize("experiment", list(SKIPPED))
def test_each_experiment_skips_a_finished_configuration_before_training(experiment, tmp_path, data_root, capsys):
    """A finished record of the configuration (written here under a fixed run_name; by a first tiny run for the
    diffusion experiments, whose run name needs the model) stops the run before any training."""
    record_folder, overrides = SKIPPED[experiment]
    train = load_module(REPO_ROOT / experiment / "train.py", f"skip_{record_folder}_train")

    def config(*more):
        with initialize_config_dir(config_dir=str(REPO_ROOT / experiment / "conf"), version_base="1.3"):
            return compose("config", overrides=[*overrides, f"results_dir={tmp_path}", *more])

    if "run_name=finished" in overrides:
        RunRecorder(tmp_path, record_folder, "adamw", {"lr": 1e-3}, 0, run_name="finished").finish({"x": 0.5})
    else:
        train.main(config())
    [path] = (tmp_path / record_folder).glob("*.json")
    before = path.read_text()
    capsys.readouterr()
    result = train.main(config("skip_finished=true", "checkpoint.every=1"))
    assert result != result  # nan: nothing ran
    assert f"skip_finished: {path} is finished (done); not run again" in capsys.readouterr().out
    assert path.read_text() == before and list((tmp_path / record_folder).glob("*.json")) == [path]
    assert not (tmp_path / record_folder / "checkpoints").exists()  # no checkpoint: training never started


# ------------------------------------------------------------------------------------------------ presets, sweeps
def _compose(experiment: str, job: list[str]):
    with initialize_config_dir(config_dir=str(REPO_ROOT / experiment / "conf"), version_base="1.3"):
        return compose("config", overrides=job)


def test_long_presets_only_override_the_cpu_presets():
    e2e, e2e_short = _compose("GPT-2", ["preset=smollm2_long"]), _compose("GPT-2", ["preset=smollm2_cpu"])
    assert e2e.train.max_steps == 5 * e2e_short.train.max_steps == 100 and e2e.checkpoint.every == 25
    assert e2e.train.max_steps // e2e.train.eval_every == 10 and e2e.tags.preset == "smollm2_long"
    assert (e2e.model, e2e.lora, e2e.decode) == (e2e_short.model, e2e_short.lora, e2e_short.decode)
    e2e_longer = _compose("GPT-2", ["preset=smollm2_longer"])
    assert e2e_longer.train.max_steps == 3 * e2e.train.max_steps and e2e_longer.tags.preset == "smollm2_longer"
    assert e2e_longer.train.warmup_steps * 10 == e2e_longer.train.max_steps and e2e_longer.checkpoint.every == 25
    assert (e2e_longer.model, e2e_longer.lora, e2e_longer.decode, e2e_longer.data) == (e2e.model, e2e.lora,
                                                                                       e2e.decode, e2e.data)
    sst2, sst2_short = _compose("Mistral-7B", ["preset=minilm_long"]), _compose("Mistral-7B", ["preset=minilm_sst2"])
    steps = sst2.data.max_train_samples // sst2.train.batch_size
    assert steps == 1000 >= 3 * sst2_short.data.max_train_samples // sst2_short.train.batch_size
    assert sst2.train.eval_strategy == "steps" and sst2.train.eval_steps == 250 and sst2.checkpoint.every == 250
    assert sst2.checkpoint.every % sst2.train.logging_steps == 0 and sst2.tags.preset == "minilm_long"
    assert (sst2.model, sst2.lora) == (sst2_short.model, sst2_short.lora)
    longer = _compose("Mistral-7B", ["preset=minilm_longer"])
    assert longer.data.max_train_samples // longer.train.batch_size == 3 * steps and longer.train.epochs == 1
    assert (longer.train.eval_steps, longer.checkpoint.every, longer.tags.preset) == (250, 250, "minilm_longer")
    assert (longer.model, longer.lora, longer.train.scheduler) == (sst2.model, sst2.lora, sst2.train.scheduler)
    epochs = _compose("Mistral-7B", ["preset=minilm_three_epochs"])
    assert epochs.data.max_train_samples == sst2.data.max_train_samples and epochs.train.epochs == 3
    assert (epochs.train.eval_steps, epochs.checkpoint.every, epochs.tags.preset) == (250, 250, "minilm_three_epochs")
    assert (epochs.model, epochs.lora, epochs.train.scheduler) == (sst2.model, sst2.lora, sst2.train.scheduler)


GRID = ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2"]


def test_long_sweeps_span_three_decades_at_half_decade_points():
    for experiment, sweep, seeds in (("GPT-2", "long_lr", ["110", "111"]), ("Mistral-7B", "minilm_long_lr",
                                                                             ["42", "43", "44"])):  # fmt: skip
        params = long_runs.sweep_params(REPO_ROOT / experiment, sweep)
        assert params["optim"] == ["adamw", "scaled_adamw", "loraplus"] and params["optim.lr"] == GRID
        assert params["seed"] == seeds
        update = long_runs.sweep_params(REPO_ROOT / experiment, sweep.replace("lr", "lr_update"))
        # its best rate at the first seed was the grid's edge: the largest on SST-2, the smallest on E2E
        below, beyond = ([], ["3e-2"]) if experiment == "Mistral-7B" else (["1e-6", "3e-6"], [])
        assert update["+optim.variant"] == ["update"] and update["optim.lr"] == below + GRID + beyond
        assert update["seed"] == seeds


def test_sweep_jobs_expand_and_narrow_like_hydra(tmp_path):
    experiment = tmp_path / "exp"
    (experiment / "conf" / "sweep").mkdir(parents=True)
    (experiment / "conf" / "sweep" / "s.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      optim: a,b\n      optim.lr: 1e-3,1e-2\n      seed: 1\n")
    assert sweep_jobs(experiment, Part("s")) == [
        ["sweep=s", "optim=a", "optim.lr=1e-3", "seed=1"], ["sweep=s", "optim=a", "optim.lr=1e-2", "seed=1"],
        ["sweep=s", "optim=b", "optim.lr=1e-3", "seed=1"], ["sweep=s", "optim=b", "optim.lr=1e-2", "seed=1"]]
    assert sweep_jobs(experiment, Part("s", {"optim": "b"})) == [
        ["sweep=s", "optim=b", "optim.lr=1e-3", "seed=1"], ["sweep=s", "optim=b", "optim.lr=1e-2", "seed=1"]]
    with pytest.raises(ValueError, match=r"optim.lr=\['3e-3'\] is not among its values"):
        sweep_jobs(experiment, Part("s", {"optim.lr": "3e-3"}))
    with pytest.raises(ValueError, match="does not sweep 'reg'"):
        sweep_jobs(experiment, Part("s", {"reg": "1"}))
    with pytest.raises(FileNotFoundError, match=r"no sweep 'nope'.*\['s'\]"):
        sweep_jobs(experiment, Part("nope"))
    assert halves([1, 2, 3, 4, 5]) == ([1, 3, 5], [2, 4])


# each long step's jobs, as README "Long CPU runs" lists them: (optimizer[/variant], lrs, seeds)
BOTH = {"adamw", "scaled_adamw"}
README_STEPS = {
    "long_e2e_lr_a": (BOTH, ["1e-3", "1e-2", "1e-4"], {110}),
    "long_e2e_lr_b": (BOTH, ["1e-5", "3e-4", "3e-3"], {110}),
    "long_e2e_lr_c": (BOTH, ["3e-5"], {110}),
    "long_sst2_lr_a": (BOTH, ["1e-5", "1e-4", "1e-3", "1e-2"], {42}),
    "long_sst2_lr_b": (BOTH, ["3e-5", "3e-4", "3e-3"], {42}),
    "long_sst2_update": ({"scaled_adamw/update"}, GRID + ["3e-2"], {42}),
    "long_sst2_seeds": (BOTH, ["1e-3", "3e-3"], {43, 44}),
    "long_sst2_curves": ({"sgd", "scaled_gd"}, ["0.3", "1.0", "3.0"], {42}),
    "long_sst2_loraplus": ({"loraplus"}, GRID, {42}),
    "long_e2e_curves": ({"sgd", "scaled_gd"}, ["1e-2", "3e-2", "1e-1"], {110}),
    "long_e2e_longer": (BOTH, ["1e-3", "3e-3"], {110}),
    "long_e2e_longer_seeds": (BOTH, ["1e-3", "3e-3"], {111}),
    "long_sst2_longer": (BOTH, ["1e-3", "3e-3"], {42}),
    "long_sst2_epochs": (BOTH, ["1e-3"], {42}),
    "long_sst2_epochs_seeds_b": (BOTH, ["3e-3"], {43, 44}),
    "long_sst2_epochs_update": ({"scaled_adamw/update"}, ["3e-3", "1e-2"], {42, 43, 44}),
    "long_sst2_epochs_loraplus": ({"loraplus"}, ["1e-4", "3e-4"], {42, 43, 44}),
    "long_sst2_seeds_b": (BOTH, ["1e-5", "3e-5", "1e-4", "3e-4", "1e-2"], {43, 44}),
    "long_sst2_loraplus_seeds": ({"loraplus"}, GRID, {43, 44}),
    "long_sst2_update_seeds": ({"scaled_adamw/update"}, GRID + ["3e-2"], {43, 44}),
}
# the steps outside the long presets
STEP_PRESETS = {"long_sst2_longer": "minilm_longer", "long_e2e_longer": "smollm2_longer",
                "long_e2e_longer_seeds": "smollm2_longer",
                **{f"long_sst2_epochs{part}": "minilm_three_epochs"
                   for part in ("", "_seeds", "_seeds_b", "_update", "_loraplus")}}
# the paper's settings (each optimizer's conf/optim preset), one seed
PAPER_LRS = {"sgd": "9e-2", "scaled_gd": "2e-2", "adamw": "2e-4", "scaled_adamw": "8e-4"}
# a step of several sweeps: each sweep's (optimizer, lr) pairs and its seeds, or (optimizer, lr, seed) and None
README_MIXED_STEPS = {
    "long_sst2_peers": ({("peft_riemannian", lr) for lr in ("1e-3", "3e-3", "1e-2")}
                        | {("lora_rite", lr) for lr in ("3e-4", "1e-3", "3e-3")}, {42}),
    "long_e2e_table1": (set(PAPER_LRS.items()), {110}),
    "long_e2e_seeds": ({("adamw", "3e-4"), ("adamw", "1e-3"), ("scaled_adamw", "1e-3"), ("scaled_adamw", "1e-2")},
                       {111}),
    "long_e2e_seeds_b": ({("adamw", lr) for lr in ("1e-5", "3e-5", "1e-4", "3e-3", "1e-2")}
                         | {("scaled_adamw", lr) for lr in ("1e-5", "3e-5", "1e-4", "3e-4", "3e-3")}, {111}),
    "long_e2e_peers": ({("peft_riemannian", lr) for lr in ("3e-3", "1e-2", "3e-2")}
                       | {("lora_rite", lr) for lr in ("3e-5", "1e-4", "3e-4")}, {110}),
    "long_e2e_variants": ({("loraplus", lr) for lr in GRID}
                          | {("scaled_adamw/update", lr) for lr in ["1e-6", "3e-6"] + GRID}, {110}),
    "long_e2e_variants_seeds": ({("loraplus", lr) for lr in GRID}
                                | {("scaled_adamw/update", lr) for lr in ["1e-6", "3e-6"] + GRID}, {111}),
    "long_sst2_epochs_seeds": ({(o, "3e-3", 42) for o in BOTH} | {(o, "1e-3", seed) for o in BOTH for seed in (43, 44)},
                               None),
}


@pytest.mark.parametrize("step", LONG_STEPS, ids=lambda s: s.name)
def test_each_long_step_runs_the_jobs_the_readme_lists(step):
    if step.name in README_MIXED_STEPS:
        pairs, seeds = README_MIXED_STEPS[step.name]
        if seeds is None:  # (optimizer, lr, seed) triples
            expected = {(o, float(lr), seed) for o, lr, seed in pairs}
        else:
            expected = {(o, float(lr), seed) for o, lr in pairs for seed in seeds}
    else:
        optimizers, lrs, seeds = README_STEPS[step.name]
        expected = {(o, float(lr), seed) for o in optimizers for lr in lrs for seed in seeds}
    experiment = long_runs.EXPERIMENTS[step.experiment]
    jobs = step.jobs()
    assert len(jobs) == len(expected) and len({tuple(j) for j in jobs}) == len(jobs)
    seen = set()
    for job in jobs:
        cfg = _compose(experiment, job + list(long_runs.RESUMABLE))
        preset = STEP_PRESETS.get(step.name, {"gpt2_e2e": "smollm2_long", "glue": "minilm_long"}[step.experiment])
        assert cfg.tags.preset == preset
        assert cfg.resume == "auto" and cfg.skip_finished is True
        variant = cfg.optim.get("variant")
        seen.add((cfg.optim.name + (f"/{variant}" if variant else ""), cfg.optim.lr, cfg.seed))
    assert seen == expected
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"python main_figures/reproduce_cpu.py --only {step.name}" in readme
    names = [s.name for s in select_steps(default_steps(), step.name)]
    assert names == [step.name] and step.name not in [s.name for s in select_steps(default_steps(), "")]


def test_the_steps_together_hold_every_run_of_the_long_sweeps():
    from main_figures.long_tables import LONG, LONGER

    for experiment, long in LONG.items():
        folder = REPO_ROOT / long_runs.EXPERIMENTS[experiment]
        longer = tuple(sweep for _, sweeps in LONGER[experiment].presets.values() for sweep in sweeps)
        sweeps = long.sweeps + longer
        planned = {tuple(job) for sweep in sweeps for job in long_runs.sweep_jobs(folder, Part(sweep))}
        in_steps = [tuple(job) for step in LONG_STEPS if step.experiment == experiment for job in step.jobs()]
        assert planned <= set(in_steps), sorted(planned - set(in_steps))[:3]
        assert len(in_steps) == len(set(in_steps))  # no run in two steps


# ------------------------------------------------------------------------------------------------ the driver
def test_the_driver_runs_two_halves_then_skips_finished_and_resumes_killed_runs(tmp_path, data_root, capfd):
    """Two tiny GPT-2 jobs, one per half; then one record is made to look killed after its checkpoint at step 2
    (left running, a stale lock, its last checkpoint gone): the re-run skips the finished one and resumes the
    other from step 2 to the same record."""
    step = LongStep("tiny", "two tiny runs", "gpt2_e2e", (Part("loss_curves", {"optim": "scaled_gd",
                                                                               "optim.lr": "1e-2,1e-3"}),))
    extra = ("preset=tiny", f"results_dir={tmp_path}", "checkpoint.every=1", "checkpoint.keep=2",
             f"hydra.run.dir={tmp_path / 'hydra'}")  # fmt: skip
    run_step(step, extra=extra)
    first = capfd.readouterr().out
    assert "2 jobs as two halves of 1 and 1" in first and "[A] job 1/1 done" in first and "[B] job 1/1 done" in first
    records = {r.hparams["lr"]: r for r in load_records(tmp_path, "gpt2_e2e")}
    assert set(records) == {1e-2, 1e-3} and all(r.status == "done" for r in records.values())
    # the lr 1e-3 run, as a kill right after its checkpoint at step 2 leaves it
    killed = records[1e-3]
    from harness.records import training_name

    gpt2_train = load_module(REPO_ROOT / "GPT-2" / "train.py", "gpt2_train")  # its checkpoints: the training's name
    checkpoints = tmp_path / "gpt2_e2e" / "checkpoints" / training_name(killed, gpt2_train.AFTER_TRAINING)
    assert (checkpoints / "step-2" / MANIFEST).is_file()
    for path in (checkpoints / "step-3").iterdir():
        path.unlink()
    (checkpoints / "step-3").rmdir()
    (checkpoints / LATEST).write_text("step-2")
    path = tmp_path / "gpt2_e2e" / f"{killed.run_name}.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "status": "running", "steps": data["steps"][:2], "final_metrics": {}}))
    path.with_suffix(".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    finished = (tmp_path / "gpt2_e2e" / f"{records[1e-2].run_name}.json").read_text()
    run_step(step, extra=extra)
    second = capfd.readouterr()
    assert "is finished (done); not run again" in second.out
    assert f"resuming from {checkpoints / 'step-2'} (step 2)" in second.out and "taking over" in second.err
    assert (tmp_path / "gpt2_e2e" / f"{records[1e-2].run_name}.json").read_text() == finished  # untouched
    resumed = {r.hparams["lr"]: r for r in load_records(tmp_path, "gpt2_e2e")}[1e-3]
    assert resumed.status == "done" and resumed.steps[-1]["step"] == 3
    assert [s["loss"] for s in resumed.steps] == [s["loss"] for s in killed.steps]
    assert resumed.final_metrics == killed.final_metrics


def test_the_driver_fails_loudly_naming_the_failed_job(tmp_path, capfd):
    step = LongStep("broken", "one bad job", "gpt2_e2e", (Part("loss_curves", {"optim": "sgd", "optim.lr": "1e-2"}),))
    with pytest.raises(RuntimeError, match=r"1 job\(s\) failed.*optim=sgd optim.lr=1e-2.*re-run `python "
                                           r"main_figures/long_runs.py broken`"):
        run_step(step, extra=("optim.no_such_key=1", f"results_dir={tmp_path}"))
    assert "FAILED (exit status 1)" in capfd.readouterr().out
    assert not list(tmp_path.glob("*/*.json"))  # the job failed before any record


# ------------------------------------------------------------------------------------------------ tables
def _long_record(results, optimizer, lr, seed, accuracy=None, curve=(0.5, 0.45, 0.44, 0.439), diverged_at=None,
                 variant=None, status="done", preset="minilm_long", steps=1000):
    hparams = {"lr": lr, **({"variant": variant} if variant else {})}
    recorder = RunRecorder(results, "glue", optimizer, hparams, seed, config={"lr": lr, "preset": preset},
                           tags={"preset": preset, "task": "sst2"})
    recorder.start()
    for i, loss in enumerate(curve, 1):
        recorder.log_metrics(250 * i * steps // 1000, validation_loss=loss)
    if status == "running":
        return recorder
    if diverged_at is not None:
        recorder.finish({"diverged_at_step": diverged_at, "steps": diverged_at})
    else:
        recorder.finish({"accuracy": accuracy, "steps": steps})
    return recorder


def test_long_table_marks_a_partial_grid_diverged_runs_and_the_flattening(tmp_path):
    from main_figures.long_tables import long_table, validation_drop, validation_new_low

    _long_record(tmp_path, "adamw", 1e-3, 42, 0.80)
    _long_record(tmp_path, "adamw", 1e-3, 43, 0.82)
    _long_record(tmp_path, "adamw", 1e-4, 42, 0.60)
    _long_record(tmp_path, "adamw", 1e-2, 42, diverged_at=5, curve=(0.7,))
    _long_record(tmp_path, "scaled_adamw", 1e-3, 42, 0.81, curve=(0.6, 0.5, 0.45, 0.40))  # still falling
    _long_record(tmp_path, "scaled_adamw", 3e-3, 42, 0.805)
    _long_record(tmp_path, "scaled_adamw", 1e-2, 42, status="running")
    _long_record(tmp_path, "scaled_adamw", 1e-3, 42, 0.5, variant="update")
    # a noisy plateau: its low came before the last quarter, but the evaluation that starts it is a bump
    _long_record(tmp_path, "lora_rite", 1e-3, 42, 0.7, curve=(0.40, 0.35, 0.39, 0.37))
    table, per_rate = long_table(tmp_path, "glue").split("Per rate")
    assert "**8 of the 99 planned runs are present (partial grid).**" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| adamw |  |  | 60.00 |  | 81.00 |  | - (1 diverged) |" in per_rate
    assert "| scaled_adamw |  |  |  |  | 81.00 | 80.50 | running |" in per_rate
    assert rows["adamw"].startswith("| adamw | 4 / 21 | 3 of 7 | 0.001 | 81.00 ± 1.41 (2) | 0.00 |")
    assert "| yes (low +0.2%, ends +0.2%) |" in rows["adamw"] and "lr 0.01 seed 42: diverged@5" in rows["adamw"]
    assert rows["scaled_adamw"].startswith("| scaled_adamw | 2 / 21 | 2 of 7 | 0.001 | 81.00 (1 seed) | ≥ 0.48 |")
    assert "| no (low +11.1%, ends +11.1%) |" in rows["scaled_adamw"]  # still falling at every evaluation
    assert "1 running / interrupted" in rows["scaled_adamw"]
    assert "| yes (low -5.7%, ends +5.1%) |" in rows["lora_rite"]
    assert rows["scaled_adamw (update)"].startswith("| scaled_adamw (update) | 1 / 24 |")
    assert rows["loraplus"] == "| loraplus | 0 / 21 | 7 planned | - | - | - | - | none |"
    record = next(r for r in load_records(tmp_path, "glue") if r.optimizer == "lora_rite")
    assert validation_new_low(record, "validation_loss") == pytest.approx((0.35 - 0.37) / 0.35)
    assert validation_drop(record, "validation_loss") == pytest.approx((0.39 - 0.37) / 0.39)


def test_the_longer_runs_stand_beside_the_1000_step_runs_of_the_same_settings(tmp_path):
    from main_figures.long_tables import long_tables, longer_table

    assert longer_table(tmp_path, "glue") == ""
    _long_record(tmp_path, "adamw", 1e-3, 42, 0.83, curve=(0.6, 0.5, 0.45, 0.40))
    _long_record(tmp_path, "adamw", 1e-3, 43, 0.85)
    _long_record(tmp_path, "adamw", 1e-3, 42, 0.86, curve=(0.6, 0.45, 0.392, 0.39), preset="minilm_longer", steps=3000)
    _long_record(tmp_path, "scaled_adamw", 3e-3, 42, status="running", preset="minilm_longer")
    _long_record(tmp_path, "adamw", 1e-3, 42, 0.84, curve=(0.4, 0.38, 0.41, 0.45), preset="minilm_three_epochs",
                 steps=3000)
    _long_record(tmp_path, "adamw", 1e-3, 43, 0.86, preset="minilm_three_epochs", steps=3000)
    _long_record(tmp_path, "adamw", 3e-3, 42, 0.80, preset="minilm_three_epochs", steps=3000)
    _long_record(tmp_path, "scaled_adamw", 1e-2, 42, 0.845, variant="update", preset="minilm_three_epochs", steps=3000)
    table = longer_table(tmp_path, "glue")
    assert ("Present: 1 of the 4 planned runs of preset=minilm_longer; 4 of the 24 planned runs of "
            "preset=minilm_three_epochs.") in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| adamw | 0.001 | one epoch of 24,000 sentences | 42 | 83.00 (1 seed) | **86.00 (1 seed)** | "
        "no (low +11.1%, ends +11.1%) | yes (low +0.5%, ends +0.5%) |",
        "| scaled_adamw | 0.003 | one epoch of 24,000 sentences | 42 | - | seed 42: running | - | - |",
        # mean ± std over the seeds; the flattening holds for every seed (a loss that rises again is flattened too)
        "| adamw | 0.001 | three epochs of the 8,000 sentences | 42, 43 | 84.00 ± 1.41 (2) | **85.00 ± 1.41 (2)** | "
        "no (low +11.1%, ends +11.1%) | yes (low +0.2%, ends +0.2%) |",
        "| adamw | 0.003 | three epochs of the 8,000 sentences | 42 | not run | 80.00 (1 seed) | - | "
        "yes (low +0.2%, ends +0.2%) |",
        "| scaled_adamw (update) | 0.01 | three epochs of the 8,000 sentences | 42 | not run | **84.50 (1 seed)** | "
        "- | yes (low +0.2%, ends +0.2%) |"]
    assert "2 of the 99 planned runs" in long_tables(tmp_path)  # the longer runs are not in the 1000-step grid
    assert long_tables(tmp_path).endswith(table)


def test_the_longer_e2e_runs_stand_beside_the_100_step_runs(tmp_path):
    from main_figures.long_tables import longer_table

    def e2e_record(lr, preset, bleu, curve, steps):
        recorder = RunRecorder(tmp_path, "gpt2_e2e", "scaled_adamw", {"lr": lr}, 110,
                               config={"lr": lr, "preset": preset}, tags={"preset": preset})
        recorder.start()
        for i, loss in enumerate(curve, 1):
            recorder.log_metrics(i * steps // len(curve), valid_loss=loss)
        recorder.finish({"BLEU": bleu, "steps": steps})

    e2e_record(1e-3, "smollm2_long", 0.50, (3.0, 2.8, 2.7, 2.6), 100)
    assert longer_table(tmp_path, "gpt2_e2e") == ""
    e2e_record(1e-3, "smollm2_longer", 0.52, (3.0, 2.6, 2.5, 2.49), 300)
    table = longer_table(tmp_path, "gpt2_e2e")
    assert "Present: 1 of the 8 planned runs of preset=smollm2_longer." in table
    assert "| test BLEU, 100 steps | test BLEU, 300 steps | flattened, 100 steps | flattened, 300 steps |" in table
    assert ("| scaled_adamw | 0.001 | 1,200 pairs, one pass | 110 | 0.500 (1 seed) | **0.520 (1 seed)** | "
            "no (low +3.7%, ends +3.7%) | yes (low +0.4%, ends +0.4%) |") in table


def test_long_table_says_complete_only_when_every_planned_run_is_there(tmp_path, monkeypatch):
    from main_figures import long_tables

    monkeypatch.setitem(long_tables.LONG, "glue", long_tables.LongExperiment(
        "glue", "minilm_long", "t", "validation_loss", ("minilm_long_lora_rite",), "minilm_long_curves"))
    for lr in (3e-4, 1e-3):
        _long_record(tmp_path, "lora_rite", lr, 42, 0.7)
    assert "2 of the 3 planned runs are present (partial grid)" in long_tables.long_table(tmp_path, "glue")
    _long_record(tmp_path, "lora_rite", 3e-3, 42, 0.7)
    assert "3 of the 3 planned runs are present (complete)" in long_tables.long_table(tmp_path, "glue")


def test_loss_curves_of_sgd_vs_scaled_gd_over_the_whole_run(tmp_path):
    from main_figures.long_tables import loss_curves_figure

    with pytest.raises(LookupError, match="sweep=minilm_long_curves skip_finished=true resume=auto"):
        loss_curves_figure(tmp_path, "glue", tmp_path / "curves.png")
    for optimizer in ("sgd", "scaled_gd"):
        for lr in (0.3, 1.0, 3.0):
            recorder = RunRecorder(tmp_path, "glue", optimizer, {"lr": lr}, 42, config={"lr": lr},
                                   tags={"preset": "minilm_long", "task": "sst2"})
            with recorder:
                for step in range(25, 1001, 25):
                    recorder.log_step(step, loss=0.7 / (1 + step * lr / 1000))
                recorder.finish({"accuracy": 0.8})
    out = loss_curves_figure(tmp_path, "glue", tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table2_keeps_the_update_variant_of_scaled_adamw_apart(tmp_path):
    make_table = load_module(REPO_ROOT / "Mistral-7B" / "make_table.py", "long_make_table").make_table
    _long_record(tmp_path, "scaled_adamw", 1e-3, 42, 0.83)
    _long_record(tmp_path, "scaled_adamw", 1e-3, 42, 0.60, variant="update")
    rows = {ln.split("|")[1].strip(): ln for ln in make_table(tmp_path).splitlines()
            if ln.startswith("| ") and "optimizer" not in ln}
    assert "83.0 @ 0.001" in rows["scaled_adamw"] and "60.0 @ 0.001" in rows["scaled_adamw (update)"]
