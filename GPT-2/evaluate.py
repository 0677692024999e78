"""Score E2E NLG outputs with the five official E2E challenge metrics.

    python GPT-2/evaluate.py PRED REFS [--json]

REFS is an E2E CSV with columns ``mr`` and ``ref`` (several rows per MR), e.g. ``testset_w_refs.csv``.
PRED is either plain text with one output per line in the order of REFS' distinct MRs, or a ``.tsv``/``.csv``
file with a header naming an MR column and an output column (rows matched to REFS by MR, any order).
Prints BLEU, NIST, METEOR, ROUGE_L and CIDEr (4 decimals, like the official script), or with ``--json`` one
JSON object at full precision. Needs ``java`` on PATH (METEOR 1.5 and the PTB tokenizer).
"""
import argparse
import json

from e2e_metrics import METRIC_NAMES, read_predictions, read_references, score_corpus


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pred", help="system outputs: plain text (one per MR) or a TSV/CSV with MR and output columns")
    parser.add_argument("refs", help="E2E references CSV with columns mr, ref")
    parser.add_argument("--json", action="store_true", help="print one JSON object with full-precision scores")
    args = parser.parse_args(argv)
    try:
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
