"""Score E2E NLG outputs with the five official E2E challenge metrics.

    python GPT-2/evaluate.py PRED REFS [--json]
    python GPT-2/evaluate.py --record results/gpt2_e2e/RUN.json [--json]

REFS is an E2E CSV with columns ``mr`` and ``ref`` (several rows per MR), e.g. ``testset_w_refs.csv``.
PRED is either plain text with one output per line in the order of REFS' distinct MRs, or a table whose header
names an MR column and an output column (a ``.tsv``/``.csv`` file, or any file whose first line is such a header,
e.g. a TSV saved as ``.txt``; rows matched to REFS by MR, any order).
``--record`` scores the predictions a ``train.py`` run wrote (the record's ``files.predictions``) against the test
references of the run's own config, into the same record: e.g. a run whose scoring failed (``status: failed``)
becomes ``done`` (``diverged`` for a run that diverged and was scored from its last good state).
Prints BLEU, NIST, METEOR, ROUGE_L and CIDEr (4 decimals, like the official script), or with ``--json`` one
JSON object at full precision. Needs ``java`` on PATH (METEOR 1.5 and the PTB tokenizer).
"""
import argparse
import json
import sys
from pathlib import Path

from e2e_metrics import METRIC_NAMES, check_scorer, read_predictions, read_references, score_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for harness


def score_record(path: str | Path) -> dict:
    """Score the predictions of the record at ``path`` into it (see the module docstring); returns the scores.

    The record is locked while it is scored; if scoring fails again, the record says so (``status: failed`` with
    the new error) and keeps everything else."""
    from omegaconf import OmegaConf  # imported here: plain scoring needs neither torch nor the config tools

    import harness
    from e2e_data import load_splits, scored_test_set

    recorder = harness.RunRecorder.reopen(path)
    predictions = recorder.record.files.get("predictions")
    if predictions is None:
        raise ValueError(f"record {path} (status {recorder.record.status}) names no predictions file: the run "
                         f"stopped before it decoded the test MRs, so there is nothing to score")
    check_scorer()
    with recorder:
        data = OmegaConf.create(recorder.record.config["data"])
        mrs, references = scored_test_set(load_splits(data)["test"], data.test_mrs)
        scores = score_corpus(read_predictions(recorder.folder / predictions, mrs), references)
        written = recorder.finish({**scores, "test_mrs": len(mrs)})
    print(f"record: {written} ({recorder.record.status})", file=sys.stderr)
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pred", nargs="?", help="system outputs: plain text (one per MR) or a table with MR and "
                                                "output columns")
    parser.add_argument("refs", nargs="?", help="E2E references CSV with columns mr, ref")
    parser.add_argument("--record", help="a train.py record: score its predictions into it (no PRED, REFS)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with full-precision scores")
    args = parser.parse_args(argv)
    if args.record is not None and (args.pred or args.refs):
        parser.error("--record scores the record's own predictions against its run's references: give no PRED, REFS")
    if args.record is None and not (args.pred and args.refs):
        parser.error("give PRED and REFS, or --record RUN.json")
    try:
        if args.record is not None:
            scores = score_record(args.record)
        else:
            mrs, references = read_references(args.refs)
            hypotheses = read_predictions(args.pred, mrs)
            scores = score_corpus(hypotheses, references)
    except (OSError, ValueError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.json:
        print(json.dumps(scores))
    else:
        for name in METRIC_NAMES:
            print(f"{name}: {scores[name]:.4f}")
    return scores


if __name__ == "__main__":
    main()
