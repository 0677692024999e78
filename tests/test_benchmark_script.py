"""The speed benchmark's plumbing (not its timings: speed is measured by running it, never asserted in tests)."""

import pytest

from harness import load_module


def _load():
    return load_module("benchmarks/optimizer_step.py")


def test_benchmark_runs_every_candidate_and_writes_warm_cold_and_floor_tables(monkeypatch, tmp_path):
    bench = _load()
    monkeypatch.setitem(bench.CASES, "tiny", ([(16, 8), (16, 24)], 2, 2))
    out = tmp_path / "table.md"
    text = bench.main(["--cases", "tiny", "--rounds", "2", "--steps", "2", "--threads", "1", "--out", str(out)])
    assert out.read_text() == text + "\n"
    for section in ("## warm", "## cold", "## compute floor"):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 3 and all(line.count(" ms [") == 5 for line in rows[:2])
    # per pair 3 r² (n + m): 2 layers x (3·4·24 + 3·4·40) flops
    assert bench.preconditioner_flops("tiny") == 2 * (12 * 24 + 12 * 40)


def test_benchmark_rejects_bad_arguments():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--cases", "gpt2m_r5"])
    with pytest.raises(SystemExit):
        bench.main(["--steps", "1"])


@pytest.mark.parametrize("rounds", ["0", "-2"])
def test_benchmark_rejects_fewer_than_one_round_quoting_the_value(rounds, capsys):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--rounds", rounds])
    assert f"--rounds must be at least 1, got {rounds}" in capsys.readouterr().err
