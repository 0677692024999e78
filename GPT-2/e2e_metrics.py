"""The five official E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L, CIDEr.

Scores are computed the way the challenge's official script (tuetschek/e2e-metrics, ``measure_scores.py``)
computes them, so that numbers are comparable with published E2E results:

* BLEU and NIST follow the Perl scorer it ships (``mteval-v13a-sig.pl``, run with its defaults): the
  scorer's own tokenizer (ASCII lower-casing, punctuation split off, "." and "," kept inside numbers),
  corpus-level statistics over one document, BLEU-4 with the "closest reference" brevity penalty and the
  script's smoothing of zero n-gram matches, NIST-5 with information weights estimated from all references
  and the NIST length penalty computed against the average number of non-empty references per segment.
  This is a Python re-implementation; it needs neither Perl nor the script.
* METEOR, ROUGE-L and CIDEr follow the COCO caption evaluation the script calls: every text is first run
  through the Stanford PTB tokenizer (CoreNLP 3.4.1, lower-casing, one line per text) and PTB punctuation
  tokens are dropped. METEOR is METEOR 1.5 (``-l en -norm``) scored from corpus-summed statistics,
  ROUGE-L is the LCS F-measure with beta 1.2 (best precision and best recall over the references, averaged
  over segments), CIDEr is CIDEr-D (1- to 4-grams, tf-idf over the references of the corpus, clipped
  similarity, Gaussian length penalty with sigma 6, times 10). ROUGE-L and CIDEr-D are re-implemented
  here; the PTB tokenizer and METEOR are the Java programs shipped in the PyPI ``pycocoevalcap`` wheel and
  run with the system ``java``.

Reading files follows the official script too: lines are stripped, a byte-order mark is dropped, CRLF is
accepted, and CSV/TSV files get the script's repairs of mis-encoded characters (``Ł``/``Â£`` -> ``£``,
``Ã©``/``ã©`` -> ``é``). References are grouped by exact MR string. One deliberate difference: a BOM at
the start of a plain-text system file is removed (the official script would keep it glued to the first
output's first word).

Public API: :func:`score_corpus`, :func:`check_scorer`, :func:`read_references`, :func:`read_predictions`,
:func:`write_predictions`; the pure metric functions (:func:`mteval_tokenize`, :func:`bleu_nist`,
:func:`rouge_l`, :func:`cider_d`, ...) can be used on their own.
"""
from __future__ import annotations

import atexit
import csv
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# --------------------------------------------------------------------------------------------------------
# Reading E2E files
# --------------------------------------------------------------------------------------------------------

# Mis-encodings that the official script repairs in CSV/TSV files (system outputs and references).
_ENCODING_REPAIRS = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))

_MR_HEADER = re.compile(r"(mr|src|source|input|da|meaning[ _.-]?rep(resentation)?|dial(ogue)?[ _.-]?act)s?", re.I)
_REF_HEADER = re.compile(r"(ref(erence)?|human[ _.-]?ref(erence)?|target|tgt|trg|text)s?", re.I)
_OUT_HEADER = re.compile(
    r"(out(put)?|sys(tem)?([ _.-]?out(put)?)?|pred(iction)?|hyp(othesis)?|gen(erated)?|ref(erence)?|text)s?", re.I)


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Stripped lines of a UTF-8 text file (BOM removed, any line break, CRLF included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {str(path)!r} is not UTF-8 text: {err}") from err
    return [line.strip() for line in text.removeprefix("\ufeff").splitlines()]


def _read_table(path: str | os.PathLike, what: str) -> list[list[str]]:
    """Rows of a CSV or TSV file (tab-separated if its first line has a tab), header row included."""
    lines = [_repair(line) for line in _read_lines(path, what)]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file {str(path)!r} is empty")
    rows = list(csv.reader(lines, delimiter="\t" if "\t" in lines[0] else ","))
    bad = [i for i, row in enumerate(rows[1:], start=2) if len(row) != len(rows[0])]
    if bad:
        raise ValueError(f"{what} file {str(path)!r}: rows {bad[:10]} do not have the header's "
                         f"{len(rows[0])} columns")
    return rows


def _repair(line: str) -> str:
    for wrong, right in _ENCODING_REPAIRS:
        line = line.replace(wrong, right)
    return line


def _find_column(header: list[str], pattern: re.Pattern, kind: str, path, what: str) -> int:
    cols = [i for i, name in enumerate(header) if pattern.fullmatch(name.strip())]
    if len(cols) != 1:
        raise ValueError(f"{what} file {str(path)!r}: expected exactly one {kind} column in the header "
                         f"{header}, found {len(cols)} (accepted names match /{pattern.pattern}/)")
    return cols[0]


def read_references(csv_path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Read an E2E CSV (columns ``mr`` and ``ref``) into ``(mrs, refs)``.

    ``mrs`` are the distinct MR strings in order of first appearance and ``refs[i]`` lists every reference
    of ``mrs[i]`` in file order (rows are grouped by exact MR string).
    """
    rows = _read_table(csv_path, "references")
    mr_col = _find_column(rows[0], _MR_HEADER, "MR", csv_path, "references")
    ref_col = _find_column(rows[0], _REF_HEADER, "reference", csv_path, "references")
    grouped: dict[str, list[str]] = {}
    for row in rows[1:]:
        grouped.setdefault(row[mr_col], []).append(row[ref_col])
    if not grouped:
        raise ValueError(f"references file {str(csv_path)!r} has a header but no rows")
    return list(grouped), list(grouped.values())


def _is_table_header(line: str) -> bool:
    """Whether ``line`` is the header of a predictions table: tab- (or comma-) separated names, each an MR or an
    output column name, exactly one of each (e.g. ``MR<TAB>output``, the layout :func:`write_predictions` writes)."""
    for delimiter in ("\t", ","):
        cells = [cell.strip() for cell in next(csv.reader([line], delimiter=delimiter))]
        if len(cells) < 2:
            continue
        mr = sum(bool(_MR_HEADER.fullmatch(cell)) for cell in cells)
        out = sum(bool(_OUT_HEADER.fullmatch(cell)) for cell in cells)
        return mr == 1 and out == 1 and mr + out == len(cells)
    return False


def read_predictions(path: str | os.PathLike, mrs: list[str]) -> list[str]:
    """Read system outputs aligned with ``mrs`` (the distinct MRs from :func:`read_references`).

    A table (a ``.csv``/``.tsv`` file, or any file whose first line is a table header: tab- or comma-separated
    column names, one MR column (``mr``, ``src``, ...) and one output column (``output``, ``sys``, ``prediction``,
    ...) and nothing else, e.g. a TSV saved as ``.txt``) has its rows matched to ``mrs`` by exact MR string, in any
    order. Any other file is plain text with one output per line in the order of ``mrs`` (blank lines beyond the
    last MR are ignored; other blank lines are empty outputs).
    """
    lines = _read_lines(path, "predictions")
    first = next((line for line in lines if line), "")
    if Path(path).suffix.lower() in (".csv", ".tsv") or _is_table_header(_repair(first)):
        rows = _read_table(path, "predictions")
        mr_col = _find_column(rows[0], _MR_HEADER, "MR", path, "predictions")
        out_col = _find_column(rows[0], _OUT_HEADER, "output", path, "predictions")
        by_mr: dict[str, str] = {}
        for row in rows[1:]:
            if row[mr_col] in by_mr:
                raise ValueError(f"predictions file {str(path)!r} has more than one output for MR {row[mr_col]!r}")
            by_mr[row[mr_col]] = row[out_col]
        wanted = set(mrs)
        unknown = [mr for mr in by_mr if mr not in wanted]
        if unknown:
            raise ValueError(f"predictions file {str(path)!r}: {len(unknown)} MRs are not in the references, "
                             f"e.g. {unknown[0]!r}")
        missing = [mr for mr in mrs if mr not in by_mr]
        if missing:
            raise ValueError(f"predictions file {str(path)!r} has no output for {len(missing)} of the "
                             f"{len(mrs)} MRs, e.g. {missing[0]!r}")
        return [by_mr[mr] for mr in mrs]
    if len(lines) > len(mrs) and not any(lines[len(mrs):]):
        lines = lines[:len(mrs)]  # blank lines at the end of the file
    if len(lines) != len(mrs):
        raise ValueError(f"predictions file {str(path)!r} has {len(lines)} lines but the references have "
                         f"{len(mrs)} distinct MRs (plain text needs one output per MR, in reference order; "
                         f"a table needs a header line naming its MR and output columns)")
    return lines


PREDICTIONS_HEADER = ("MR", "output")


def write_predictions(path: str | os.PathLike, mrs: list[str], outputs: list[str]) -> Path:
    """Write outputs as the TGen system file's layout: a TSV with the header ``MR<TAB>output``, one row per MR (what
    :func:`read_predictions` reads back, whatever the file's name)."""
    if len(mrs) != len(outputs):
        raise ValueError(f"{len(mrs)} MRs but {len(outputs)} outputs")
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([PREDICTIONS_HEADER, *zip(mrs, outputs)])
    return path


# --------------------------------------------------------------------------------------------------------
# BLEU and NIST as mteval-v13a computes them
# --------------------------------------------------------------------------------------------------------

# Perl's \s on Unicode strings (the White_Space property); Python's \s differs slightly (e.g. \x1c-\x1f).
_PERL_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_PUNCT = re.compile(r"([\x20-\x26\x28-\x2b\x2f\x3a-\x40\x5b-\x60\x7b-\x7e])")  # not ' - . , digits letters
_BLEU_N, _NIST_N = 4, 5


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` under mteval-v13a's default (non-international) normalization."""
    text = _PERL_SPACE.sub(" ", text)  # the scorer reads segments from SGML with whitespace runs collapsed
    text = text.replace("<skipped>", "")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _ASCII_PUNCT.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)  # split "." and "," unless preceded by a digit
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)  # ... or unless followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # split "-" after a digit
    text = _PERL_SPACE.sub(" ", text).strip(" ")
    return text.split(" ") if text else []


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    """Counts of all 1- to max_n-grams of ``tokens`` (as tuples)."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def nist_information_weights(references: list[list[list[str]]]) -> dict[tuple, float]:
    """NIST information weight of every 1- to 5-gram of the tokenized references.

    ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` over all references of the corpus, with the
    total word count in place of the (empty) prefix count for unigrams. As in the Perl scorer, whose test
    ``$mgram ? ... : ...`` treats the prefix string "0" as false, a prefix made of the single token "0" also
    uses the total word count.
    """
    counts: Counter = Counter()
    total_words = 0
    for refs in references:
        for ref in refs:
            total_words += len(ref)
            counts.update(_ngrams(ref, _NIST_N))
    weights = {}
    for gram, count in counts.items():
        prefix = gram[:-1]
        denominator = counts[prefix] if prefix and prefix != ("0",) else total_words
        weights[gram] = -math.log(count / denominator) / math.log(2)
    return weights


def closest_reference_length(hyp_len: int, ref_lens: list[int]) -> int:
    """mteval's "closest" BLEU reference length: nearest to ``hyp_len``, the shorter one on a tie.

    The first reference always competes; later empty references are skipped (the script pads instances
    that have fewer references with empty ones).
    """
    candidates = ref_lens[:1] + [n for n in ref_lens[1:] if n > 0]
    return min(candidates, key=lambda n: (abs(hyp_len - n), n))


def nist_length_penalty(ratio: float) -> float:
    """NIST brevity penalty for ``ratio`` = system words / average reference words (0.5 at ratio 2/3)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def bleu_nist(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and NIST-5 of raw (untokenized) texts, as mteval-v13a-sig.pl reports them."""
    _check_corpus(hypotheses, references)
    hyps = [mteval_tokenize(h) for h in hypotheses]
    refs = [[mteval_tokenize(r) for r in rs] for rs in references]
    info = nist_information_weights(refs)
    n_max = max(_BLEU_N, _NIST_N)
    match, hyp_count, ref_count, hyp_info = ([0.0] * (n_max + 1) for _ in range(4))
    ref_length = 0
    nonempty_refs = 0
    for hyp, rs in zip(hyps, refs):
        ref_max: dict[tuple, int] = {}
        for ref in rs:
            for gram, count in _ngrams(ref, n_max).items():
                ref_max[gram] = max(ref_max.get(gram, 0), count)
        for n in range(1, n_max + 1):
            hyp_count[n] += max(len(hyp) - n + 1, 0)
            ref_count[n] += sum(max(len(ref) - n + 1, 0) for ref in rs)
        for gram, count in _ngrams(hyp, n_max).items():
            if gram in ref_max:
                clipped = min(count, ref_max[gram])
                match[len(gram)] += clipped
                hyp_info[len(gram)] += info[gram] * clipped
        ref_length += closest_reference_length(len(hyp), [len(ref) for ref in rs])
        nonempty_refs += sum(1 for ref in rs if ref)
    if ref_count[1] == 0:
        raise ValueError("all references are empty after tokenization; BLEU/NIST are undefined")

    # BLEU: geometric mean of n-gram precisions; a zero match count at order n counts as 1/(2^k * total)
    # for the k-th such order (the script's smoothing), an order with no system n-grams counts as 1.
    log_precision, smooth = 0.0, 1
    for n in range(1, _BLEU_N + 1):
        if hyp_count[n] == 0:
            continue
        if match[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_count[n]))
        else:
            log_precision += math.log(match[n] / hyp_count[n])
    brevity = math.exp(min(0.0, 1 - ref_length / hyp_count[1])) if hyp_count[1] > 0 else 0.0
    bleu = math.exp(log_precision / _BLEU_N) * brevity

    # NIST: information gained per system n-gram, summed over orders, times the length penalty.
    refs_per_segment = nonempty_refs / len(hyps)
    nist = sum(hyp_info[n] / max(hyp_count[n], 1) for n in range(1, _NIST_N + 1))
    nist *= nist_length_penalty(hyp_count[1] / (ref_count[1] / refs_per_segment))
    return {"BLEU": bleu, "NIST": nist}


# --------------------------------------------------------------------------------------------------------
# COCO caption metrics: ROUGE-L, CIDEr-D (Python) and PTB tokenization, METEOR 1.5 (Java)
# --------------------------------------------------------------------------------------------------------

# Tokens that the COCO evaluation drops after PTB tokenization (compared after lower-casing, so the
# bracket tokens, which become "-lrb-" etc., are in fact kept, as in the official pipeline).
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# Characters the PTB tokenizer treats as line breaks; each text must stay on one line.
_PTB_LINE_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\u2028\u2029]")
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
_CIDER_N = 4


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, Hyyro 2004)."""
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    all_ones = (1 << len(a)) - 1
    row = all_ones  # bit i cleared <=> the LCS grows at a[i]
    for token in b:
        matches = row & masks.get(token, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    return len(a) - bin(row).count("1")


def rouge_l(hypotheses: list[str], references: list[list[str]], beta: float = ROUGE_BETA) -> float:
    """Mean ROUGE-L F-measure of tokenized texts (tokens separated by single spaces).

    Per segment, precision and recall are each maximized over the references before combining, and
    ``F = (1 + beta^2) P R / (R + beta^2 P)`` (0 when P or R is 0), as in the COCO caption code.
    """
    _check_corpus(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = hyp.split(" ")
        best_p = best_r = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = lcs_length(ref_tokens, hyp_tokens)
            best_p = max(best_p, lcs / len(hyp_tokens))
            best_r = max(best_r, lcs / len(ref_tokens))
        f = (1 + beta ** 2) * best_p * best_r / (best_r + beta ** 2 * best_p) if best_p and best_r else 0.0
        scores.append(f)
    return _mean(scores)


def cider_d(hypotheses: list[str], references: list[list[str]], sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D of tokenized texts (whitespace-separated tokens), as the COCO caption code computes it.

    Document frequencies of the 1- to 4-grams come from the references (an n-gram counts once per segment),
    the idf is ``log(#segments) - log(max(1, df))``. For each n-gram order, the system and reference tf-idf
    vectors are compared by a cosine in which the system weights are clipped at the reference weights, times
    ``exp(-delta^2 / (2 sigma^2))`` where ``delta`` is the difference of the two texts' bigram counts (the
    COCO code's length). The segment score is 10 x the mean over orders of the similarity averaged over
    references; the corpus score is the mean over segments.
    """
    _check_corpus(hypotheses, references)
    hyp_grams = [_ngrams(h.split(), _CIDER_N) for h in hypotheses]
    ref_grams = [[_ngrams(r.split(), _CIDER_N) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for grams in ref_grams:
        doc_freq.update(set().union(*grams))
    log_docs = math.log(len(hypotheses))

    def tfidf(counts: Counter):
        vec = [{} for _ in range(_CIDER_N)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, bigrams

    scores = []
    for hyp_counts, refs in zip(hyp_grams, ref_grams):
        h_vec, h_norm, h_len = tfidf(hyp_counts)
        total = [0.0] * _CIDER_N
        for ref_counts in refs:
            r_vec, r_norm, r_len = tfidf(ref_counts)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for n in range(_CIDER_N):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] != 0 and r_norm[n] != 0:
                    dot /= h_norm[n] * r_norm[n]
                total[n] += dot * penalty
        scores.append(10.0 * sum(total) / _CIDER_N / len(refs))
    return _mean(scores)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _pycocoevalcap_file(*parts: str) -> Path:
    """A file shipped in the PyPI ``pycocoevalcap`` package (its Java programs)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package pycocoevalcap (1.2) is required: it ships the METEOR 1.5 and "
                           "Stanford PTB tokenizer jars; install it with `pip install pycocoevalcap==1.2`")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"pycocoevalcap is installed but lacks {str(path)!r}; reinstall pycocoevalcap==1.2")
    return path


_SCORER_FILES = (("tokenizer", "stanford-corenlp-3.4.1.jar"), ("meteor", "meteor-1.5.jar"),
                 ("meteor", "data", "paraphrase-en.gz"))


def check_scorer() -> None:
    """Raise now, saying what to install, if :func:`score_corpus` could not run: ``java`` on PATH and the PTB
    tokenizer and METEOR 1.5 jars (with METEOR's paraphrase table) of ``pycocoevalcap``. What a run that will
    score checks before it trains."""
    _java()
    for parts in _SCORER_FILES:
        _pycocoevalcap_file(*parts)


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("`java` was not found on PATH: METEOR 1.5 and the PTB tokenizer of the official "
                           "E2E metrics are Java programs; install a Java runtime (e.g. apt-get install "
                           "default-jre-headless) and make sure `java` is on PATH")
    return java


class _PTBTokenizer:
    """Runs Stanford's PTBTokenizer (``-preserveLines -lowerCase``) on a list of texts in the background."""

    def __init__(self, java: str, texts: list[str], workdir: str, name: str):
        self.n = len(texts)
        path = Path(workdir, name)
        path.write_text("\n".join(_PTB_LINE_BREAKS.sub(" ", t) for t in texts), encoding="utf-8")
        jar = _pycocoevalcap_file(*_SCORER_FILES[0])
        self.proc = subprocess.Popen(
            [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def result(self) -> list[str]:
        """Tokenized texts, PTB punctuation tokens removed, tokens joined by single spaces."""
        out, err = self.proc.communicate()
        lines = out.decode("utf-8").split("\n")
        if self.proc.returncode != 0 or len(lines) < self.n:
            raise RuntimeError(f"PTB tokenizer failed (exit {self.proc.returncode}, {len(lines)} lines for "
                               f"{self.n} texts): {err.decode('utf-8', 'replace')[-2000:]}")
        return [" ".join(t for t in line.rstrip().split(" ") if t not in PTB_PUNCTUATION) for line in lines[:self.n]]


class _Meteor:
    """A METEOR 1.5 process (``-l en -norm``, as in the COCO caption code).

    Loading its paraphrase table takes several seconds, so one process is shared by all calls of
    :func:`score_corpus` in a Python process (the jar's SCORE/EVAL commands keep no state between calls).
    """

    def __init__(self, java: str):
        jar = _pycocoevalcap_file(*_SCORER_FILES[1])
        _pycocoevalcap_file(*_SCORER_FILES[2])
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [java, "-Dfile.encoding=UTF-8", "-Xmx2G", "-XX:+UseSerialGC", "-jar", str(jar),
             "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def score(self, hypotheses: list[str], references: list[list[str]]) -> float:
        """Corpus METEOR from the summed statistics of all segments (the jar's EVAL command)."""
        lines = [" ||| ".join(["SCORE", " ||| ".join(refs), hyp.replace("|||", "").replace("  ", " ")])
                 for hyp, refs in zip(hypotheses, references)]
        writer = threading.Thread(target=self._send, args=("".join(line + "\n" for line in lines),), daemon=True)
        writer.start()
        stats = [self._receive() for _ in lines]
        writer.join()
        self._send("EVAL" + "".join(" ||| " + s for s in stats) + "\n")
        for _ in lines:  # per-segment scores, then the corpus score
            self._receive()
        return float(self._receive())

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode("utf-8"))
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process died; _receive reports why

    def _receive(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"METEOR exited (code {self.proc.returncode}): "
                               f"{self.stderr.read().decode('utf-8', 'replace')[-2000:]}")
        return line.decode("utf-8").strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.communicate()
        self.stderr.close()


_METEOR_LOCK = threading.Lock()
_METEOR: list[_Meteor] = []  # the shared process, once started


def _shared_meteor(java: str) -> _Meteor:
    if not _METEOR or not _METEOR[0].alive():
        _close_shared_meteor()
        _METEOR.append(_Meteor(java))
    return _METEOR[0]


@atexit.register
def _close_shared_meteor() -> None:
    while _METEOR:
        _METEOR.pop().close()


def _check_corpus(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists: "
                         f"one hypothesis per MR is needed")
    if not hypotheses:
        raise ValueError("cannot score an empty corpus")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypothesis {i} is {type(hyp).__name__}, not str: {hyp!r}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of item {i} must be a non-empty list of str, got {refs!r}")


def score_corpus(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """The five official E2E metrics of ``hypotheses`` (one per MR) against ``references`` (a list per MR).

    Returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` as full-precision floats. Needs ``java``.
    """
    _check_corpus(hypotheses, references)
    java = _java()
    with _METEOR_LOCK, tempfile.TemporaryDirectory(prefix="e2e-metrics-") as workdir:
        meteor = _shared_meteor(java)  # (re)started first, so that it loads while the texts are tokenized
        tokenizers = []
        try:
            tokenizers.append(_PTBTokenizer(java, [r for refs in references for r in refs], workdir, "refs.txt"))
            tokenizers.append(_PTBTokenizer(java, hypotheses, workdir, "hyps.txt"))
            scores = bleu_nist(hypotheses, references)  # pure Python, runs while the JVMs work
            tok_flat = iter(tokenizers[0].result())
            tok_refs = [[next(tok_flat) for _ in refs] for refs in references]
            tok_hyps = tokenizers[1].result()
        finally:
            for tokenizer in tokenizers:
                tokenizer.kill()
        try:
            scores["METEOR"] = meteor.score(tok_hyps, tok_refs)
        except BaseException:
            _close_shared_meteor()  # its input/output may be out of step now
            raise
    scores["ROUGE_L"] = rouge_l(tok_hyps, tok_refs)
    scores["CIDEr"] = cider_d(tok_hyps, tok_refs)
    return {name: float(scores[name]) for name in METRIC_NAMES}
