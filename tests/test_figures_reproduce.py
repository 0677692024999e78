"""main_figures/reproduce_cpu.py: step selection, dry run, progress, and a clear stop at the first failure."""

import sys

import pytest

from harness import REPO_ROOT as ROOT
from main_figures.reproduce_cpu import Step, StepFailed, default_steps, main, run_steps, select_steps


def _steps(tmp_path):
    marker = tmp_path / "ran.txt"
    write = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    return marker, [
        Step("first", "writes a marker", [write], []),
        Step("broken", "exits with 3", [[sys.executable, "-c", "raise SystemExit(3)"]], []),
        Step("last", "writes a marker too", [write], []),
    ]


def test_default_steps_cover_theory_real_runs_and_figures():
    names = [s.name for s in select_steps(default_steps(), "")]
    assert names[0] == "theory" and names[-1] == "figures" and {"gpt2_table1", "gpt2_lr", "glue"} <= set(names)
    every = [s.name for s in select_steps(default_steps(), "", run_all=True)]
    assert every[-1] == "figures" and {"gpt2_peers", "glue_peers", "glue_sgd", "glue_lora_scale"} <= set(every) - set(names)
    for step in default_steps():  # every script a step calls is committed in the repository
        assert all((ROOT / f).is_file() for f in step.needs), step.needs
    assert [s.name for s in select_steps(default_steps(), "figures,theory")] == ["theory", "figures"]
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['bogus'\]"):
        select_steps(default_steps(), "theory,bogus")


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
    marker, steps = _steps(tmp_path)
    assert main(["--dry-run"], steps=steps) == 0
    out = capsys.readouterr().out
    assert "[1/3] first" in out and "[3/3] last" in out and "raise SystemExit(3)" in out
    assert not marker.exists()


def test_failure_stops_with_the_step_and_a_resume_command(tmp_path, capsys):
    marker, steps = _steps(tmp_path)
    assert main([], steps=steps) == 1
    err = capsys.readouterr().err
    assert "step 'broken' failed (exit status 3)" in err
    assert "--only broken,last" in err
    assert marker.read_text() == "x"  # the first step ran, the last one did not

    with pytest.raises(StepFailed, match="missing nowhere.sh"):
        run_steps([Step("x", "needs a file", [["bash", "nowhere.sh"]], ["nowhere.sh"])], root=tmp_path)


def test_only_runs_the_selected_steps_in_order(tmp_path):
    marker, steps = _steps(tmp_path)
    assert main(["--only", "last,first"], steps=steps) == 0
    assert marker.read_text() == "xx"
