"""The official E2E metrics (GPT-2/e2e_metrics.py) and the scoring command (GPT-2/evaluate.py).

The data-driven tests read the shared data folder ($RPLORA_DATA, default <repo>/../shared/data). Their expected
values beyond the published TGen scores were produced by running the official script (tuetschek/e2e-metrics,
measure_scores.py at commit 1b9c4d8, Perl mteval-v13a-sig and COCO caption code, BLEU/NIST printed with %.17e).
"""
import json
import math
import random
import subprocess
import sys

import pytest

from harness import REPO_ROOT, default_data_root, load_module

GPT2_DIR = REPO_ROOT / "GPT-2"
DATA = default_data_root()
TEST_CSV = DATA / "e2e" / "testset_w_refs.csv"
TGEN_TSV = DATA / "e2e-system-outputs" / "tgen-test-output.tsv"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (set RPLORA_DATA)")
m = load_module(GPT2_DIR / "e2e_metrics.py")  # under the name GPT-2/ scripts import it by


# ---------------------------------------------------------------------------------------------- MT-Eval
@pytest.mark.parametrize("text, tokens", [
    ("Hello, World! It's £20-25.", ["hello", ",", "world", "!", "it's", "£20", "-", "25", "."]),
    ("3.5 stars, 1,000 people", ["3.5", "stars", ",", "1,000", "people"]),
    ("fish &amp; chips &quot;x&quot; <skipped>", ["fish", "&", "chips", '"', "x", '"']),
    ("ÉCOLE Cafe", ["École", "cafe"]),  # ASCII-only lower-casing
    ("a\u00a0b\t c(d)", ["a", "b", "c", "(", "d", ")"]),
    ("", []),
])
def test_mteval_tokenize(text, tokens):
    assert m.mteval_tokenize(text) == tokens


def test_closest_reference_length():
    assert m.closest_reference_length(4, [3, 5]) == 3  # tie: the shorter
    assert m.closest_reference_length(4, [6, 0, 2]) == 2  # later empty references are skipped
    assert m.closest_reference_length(1, [0, 3]) == 0  # ... but the first one competes
    assert m.closest_reference_length(7, [11, 8, 6, 7]) == 7


def test_nist_length_penalty():
    assert m.nist_length_penalty(1.0) == m.nist_length_penalty(2.0) == 1.0
    assert m.nist_length_penalty(0.0) == 0.0
    assert m.nist_length_penalty(2 / 3) == pytest.approx(0.5)
    assert 0 < m.nist_length_penalty(0.3) < m.nist_length_penalty(0.6) < 0.5


def test_nist_information_weights():
    w = m.nist_information_weights([[["a", "b"], ["a", "c"]]])  # 4 words: a twice
    assert w[("a",)] == pytest.approx(1.0) and w[("b",)] == pytest.approx(2.0)
    assert w[("a", "b")] == pytest.approx(1.0)  # count(a) / count(a b) = 2
    # Perl's truth test on the prefix string "0" makes a prefix "0" fall back to the total word count (3).
    w = m.nist_information_weights([[["0", "x", "0"]]])
    assert w[("0", "x")] == pytest.approx(math.log2(3)) and w[("x", "0")] == pytest.approx(0.0)


def test_bleu_nist_hand_checked():
    s = m.bleu_nist(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert s["BLEU"] == pytest.approx(1.0)
    # unigrams: 'the' 2 of 6 words, others 1 of 6; bigrams 'the cat', 'the mat' carry 1 bit; the rest 0
    assert s["NIST"] == pytest.approx((2 * math.log2(3) + 4 * math.log2(6)) / 6 + 2 / 5)
    # all precisions 1, brevity penalty exp(1 - 6/4)
    assert m.bleu_nist(["a b c d"], [["a b c d e f"]])["BLEU"] == pytest.approx(math.exp(-0.5))
    # precisions 3/4, 1/3, then zero matches smoothed to 1/(2*2) and 1/(4*1); brevity exp(1 - 5/4)
    bleu = m.bleu_nist(["a b c d"], [["a b x d y"]])["BLEU"]
    assert bleu == pytest.approx((3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25 * math.exp(-0.25))
    # NIST length ratio 2/3 gives penalty 0.5; the empty reference does not count as a reference
    nist = m.bleu_nist(["a b"], [["a b c", ""]])["NIST"]
    assert nist == pytest.approx(0.5 * math.log2(3))


# ---------------------------------------------------------------------------------------------- ROUGE-L, CIDEr-D
def _lcs_dp(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = row[:]
        for j, y in enumerate(b, start=1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return row[-1]


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 80))]
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 80))]
        assert m.lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_hand_checked():
    p, r = 3 / 4, 3 / 5  # LCS "a c d"
    assert m.rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert m.rouge_l(["a b"], [["a b c d", "a"]]) == pytest.approx(1.0)  # best P and best R from different refs
    assert m.rouge_l(["x", "a b"], [["a"], ["a b"]]) == pytest.approx(0.5)  # mean over segments


def test_cider_d_hand_checked():
    # identical two-word captions: orders 1 and 2 have cosine 1, orders 3 and 4 are empty -> 10 * 2/4
    assert m.cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    assert m.cider_d(["a x", "a y"], [["a x"], ["a y"]]) == pytest.approx(5.0)  # 'a' has idf 0
    # one extra word (so one extra bigram) in the hypothesis; every n-gram has the same idf, log 2
    score = m.cider_d(["p q r s", "z"], [["p q r"], ["z"]])
    cosines = [3 / math.sqrt(4 * 3), 2 / math.sqrt(3 * 2), 1 / math.sqrt(2 * 1), 0.0]
    first = 10 * sum(cosines) / 4 * math.exp(-1 / (2 * 6.0 ** 2))  # Gaussian length penalty, sigma 6
    assert score == pytest.approx((first + 10 * 1 / 4) / 2)


def test_rouge_and_cider_match_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    rng = random.Random(1)
    words = "the a pub eat near cheap family friendly river 5 of out".split()
    hyps = [" ".join(rng.choices(words, k=rng.randrange(1, 15))) for _ in range(40)]
    refs = [[" ".join(rng.choices(words, k=rng.randrange(1, 15))) for _ in range(rng.randrange(1, 5))] for _ in hyps]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    assert m.rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert m.cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------- files
def _write(path, text, bom=False, crlf=False):
    text = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


REFS_CSV = ('mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[B]",B is a pub.\n'
            '"name[A], food[Thai]","Thai food, at A."\n\n"name[B]",It costs Ł20.\n')


def test_read_references_groups_by_exact_mr(tmp_path):
    mrs, refs = m.read_references(_write(tmp_path / "refs.csv", REFS_CSV, bom=True, crlf=True))
    assert mrs == ["name[A], food[Thai]", "name[B]"]
    assert refs == [["A serves Thai food.", "Thai food, at A."], ["B is a pub.", "It costs £20."]]


def test_read_references_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        m.read_references(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="reference column"):
        m.read_references(_write(tmp_path / "bad.csv", "mr,foo\nx,y\n"))


def test_read_predictions_plain_text(tmp_path):
    mrs = ["name[A]", "name[B]", "name[C]"]
    path = _write(tmp_path / "out.txt", "A is good.\n\nC is bad.\n\n", bom=True, crlf=True)
    assert m.read_predictions(path, mrs) == ["A is good.", "", "C is bad."]
    with pytest.raises(ValueError, match="has 2 lines but the references have 3"):
        m.read_predictions(_write(tmp_path / "short.txt", "one\ntwo\n"), mrs)


def test_read_predictions_tsv_and_csv(tmp_path):
    mrs = ["name[A], food[Thai]", "name[B]"]
    tsv = 'id\tMR\toutput\n2\tname[B]\tB out.\n1\t"name[A], food[Thai]"\tA out.\n'
    assert m.read_predictions(_write(tmp_path / "o.tsv", tsv, bom=True, crlf=True), mrs) == ["A out.", "B out."]
    csv_text = 'mr,prediction\n"name[A], food[Thai]","A, out."\nname[B],B costs Ł5.\n'
    assert m.read_predictions(_write(tmp_path / "o.csv", csv_text), mrs) == ["A, out.", "B costs £5."]


@pytest.mark.parametrize("body, message", [
    ("mr\toutput\nname[B]\tB.\n", "no output for 1 of the 2 MRs, e.g. 'name\\[A\\]'"),
    ("mr\toutput\nname[A]\tA.\nname[A]\tA2.\nname[B]\tB.\n", "more than one output"),
    ("mr\toutput\nname[A]\tA.\nname[B]\tB.\nname[Z]\tZ.\n", "not in the references"),
    ("mr\tfoo\nname[A]\tA.\n", "one output column"),
])
def test_read_predictions_table_errors(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        m.read_predictions(_write(tmp_path / "o.tsv", body), ["name[A]", "name[B]"])


def test_read_predictions_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        m.read_predictions(tmp_path / "absent.txt", ["x"])


def test_score_corpus_input_errors(monkeypatch):
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference lists"):
        m.score_corpus(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        m.score_corpus(["a"], [[]])
    monkeypatch.setattr(m.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`java` was not found"):
        m.score_corpus(["a"], [["a"]])


# ---------------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def test_refs():
    return m.read_references(TEST_CSV)


@pytest.fixture(scope="module")
def cli_json_process(tmp_path_factory):
    """The CLI on the TGen output, run from another directory; started early so it overlaps other tests."""
    proc = subprocess.Popen([sys.executable, str(GPT2_DIR / "evaluate.py"), str(TGEN_TSV), str(TEST_CSV), "--json"],
                            cwd=tmp_path_factory.mktemp("cwd"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def tgen_scores(test_refs, cli_json_process):
    mrs, refs = test_refs
    return m.score_corpus(m.read_predictions(TGEN_TSV, mrs), refs)


@needs_data
def test_tgen_matches_published_scores(tgen_scores):
    assert len(m.read_references(TEST_CSV)[0]) == 630
    published = {"BLEU": 0.6593, "NIST": 8.6094, "METEOR": 0.4483, "ROUGE_L": 0.6850, "CIDEr": 2.2338}
    assert {k: round(v, 4) for k, v in tgen_scores.items()} == published
    official = {"BLEU": 0.6592719327817853, "NIST": 8.609377620337353, "METEOR": 0.44825963401948726,
                "ROUGE_L": 0.685022628460141, "CIDEr": 2.2338463877854293}
    for name, value in official.items():
        assert tgen_scores[name] == pytest.approx(value, rel=1e-10), name


def _first_refs(refs, transform):
    return [transform(rs[0].split()) for rs in refs]


@needs_data
def test_second_system_matches_official_script(test_refs):
    """First references cut to half their words: short outputs, so both brevity penalties act."""
    mrs, refs = test_refs
    hyps = _first_refs(refs, lambda w: " ".join(w[:max(1, len(w) // 2)]))
    official = {"BLEU": 0.5192785229444398, "NIST": 1.493724322518218, "METEOR": 0.33135925822604445,
                "ROUGE_L": 0.623386774415368, "CIDEr": 0.6198346593700585}
    scores = m.score_corpus(hyps, refs)
    for name, value in official.items():
        assert scores[name] == pytest.approx(value, rel=1e-10), name


@needs_data
def test_bleu_nist_edge_systems_match_official_script(test_refs):
    mrs, refs = test_refs
    swapped = _first_refs(refs, lambda w: " ".join(w[:2][::-1]))  # no 3-/4-gram matches: smoothing
    s = m.bleu_nist(swapped, refs)
    assert s["BLEU"] == pytest.approx(2.094514304738688e-05, rel=1e-10)
    assert s["NIST"] == pytest.approx(9.382807987676432e-12, rel=1e-8)
    s = m.bleu_nist(_first_refs(refs, " ".join), refs)
    assert s["BLEU"] == 1.0 and s["NIST"] == pytest.approx(14.236498836851847, rel=1e-10)


@needs_data
def test_cli_json_from_another_directory(cli_json_process, tgen_scores):
    out, err = cli_json_process.communicate(timeout=600)
    assert cli_json_process.returncode == 0, err
    scores = json.loads(out)
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores == tgen_scores


@needs_data
def test_cli_table_output_in_process(capsys, monkeypatch, tgen_scores):
    evaluate = load_module(GPT2_DIR / "evaluate.py", "gpt2_evaluate_cli")
    assert evaluate.main([str(TGEN_TSV), str(TEST_CSV)]) == tgen_scores
    assert capsys.readouterr().out.splitlines() == [
        "BLEU: 0.6593", "NIST: 8.6094", "METEOR: 0.4483", "ROUGE_L: 0.6850", "CIDEr: 2.2338"]


def test_cli_reports_missing_file(tmp_path):
    run = subprocess.run([sys.executable, str(GPT2_DIR / "evaluate.py"), str(tmp_path / "none.txt"),
                          str(tmp_path / "refs.csv")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not found" in run.stderr
