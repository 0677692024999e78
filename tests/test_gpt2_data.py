"""GPT-2/E2E data: file formats, multi-reference grouping by MR, splits, tokenisation, batching."""


import pytest
import torch
from omegaconf import OmegaConf

from harness import load_module

e2e_data = load_module("GPT-2/e2e_data.py")

PAIRS = [("name[A], food[Thai]", "A serves Thai food."), ("name[B]", "B is here."),
         ("name[A], food[Thai]", "Thai food at A."), ("name[A], food[Thai]", "A: Thai."), ("name[C]", "C.")]


def data_cfg(root, **over):
    base = {"root": str(root) if root is not None else None, "hub_path": None, "train": "train.txt",
            "validation": "valid.csv", "test": "test.csv", "holdout_mrs": 0, "train_examples": None,
            "validation_examples": None, "test_mrs": None, "max_length": 32}
    return OmegaConf.create({**base, **over})


def write_csv(path, pairs, bom=False, crlf=False):
    end = "\r\n" if crlf else "\n"
    rows = ['"mr","ref"'] + [f'"{mr}","{ref}"' for mr, ref in pairs]
    path.write_text(("\ufeff" if bom else "") + end.join(rows) + end, encoding="utf-8")


def test_group_by_mr_keeps_all_references_in_first_appearance_order():
    mrs, refs = e2e_data.group_by_mr(PAIRS)
    assert mrs == ["name[A], food[Thai]", "name[B]", "name[C]"]
    assert refs == [["A serves Thai food.", "Thai food at A.", "A: Thai."], ["B is here."], ["C."]]


@pytest.mark.parametrize("bom,crlf", [(False, False), (True, True)])
def test_csv_and_line_formats_read_the_same_pairs(tmp_path, bom, crlf):
    write_csv(tmp_path / "x.csv", PAIRS, bom=bom, crlf=crlf)
    (tmp_path / "x.txt").write_text("".join(f"{mr}||{ref}\n" for mr, ref in PAIRS), encoding="utf-8")
    assert e2e_data.read_pairs(tmp_path / "x.csv") == PAIRS
    assert e2e_data.read_pairs(tmp_path / "x.txt") == PAIRS


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        e2e_data.read_pairs(tmp_path / "nope.txt")
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'MR\|\|reference'"):
        e2e_data.read_pairs(tmp_path / "bad.txt")
    (tmp_path / "bad.csv").write_text("source,target\nx,y\n")
    with pytest.raises(ValueError, match="columns 'mr' and 'ref'"):
        e2e_data.read_pairs(tmp_path / "bad.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown E2E file format '.json'"):
        e2e_data.read_pairs(tmp_path / "x.json")


def test_real_test_set_grouping_matches_the_scorer(data_root):
    e2e_metrics = load_module("GPT-2/e2e_metrics.py")
    path = data_root / "e2e" / "testset_w_refs.csv"
    mrs, refs = e2e_data.group_by_mr(e2e_data.read_pairs(path))
    assert (len(mrs), sum(map(len, refs))) == (630, 4693)
    assert (mrs, refs) == e2e_metrics.read_references(path)
    line_mrs, line_refs = e2e_data.group_by_mr(e2e_data.read_pairs(data_root / "e2e" / "test.txt"))
    assert len(line_mrs) == 630 and [len(r) for r in line_refs] == [len(r) for r in refs]


def test_load_splits_local_holdout_and_limits(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"{mr}||{ref}\n" for mr, ref in PAIRS))
    write_csv(tmp_path / "test.csv", PAIRS)
    splits = e2e_data.load_splits(data_cfg(tmp_path, validation=None, holdout_mrs=1))
    assert splits["validation"] == [PAIRS[4]]  # the last distinct MR with all its references
    assert splits["train"] == PAIRS[:4]
    limited = e2e_data.load_splits(data_cfg(tmp_path, validation=None, holdout_mrs=2, train_examples=2))
    assert {mr for mr, _ in limited["validation"]} == {"name[B]", "name[C]"}
    assert limited["train"] == [PAIRS[0], PAIRS[2]]
    with pytest.raises(ValueError, match="holdout_mrs must be in"):
        e2e_data.load_splits(data_cfg(tmp_path, validation=None, holdout_mrs=0))


def test_missing_data_folder_and_split_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root='.*nowhere' is not a folder"):
        e2e_data.load_splits(data_cfg(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="E2E train split not found: .*train.txt"):
        e2e_data.load_splits(data_cfg(tmp_path))


def test_hub_rows_of_both_datasets():
    original = [{"meaning_representation": "name[A]", "human_reference": " A. "}]
    gem = [{"gem_id": "x", "meaning_representation": "name[B]", "target": "B.", "references": ["B."]}]
    assert e2e_data.pairs_from_hub(original) == [("name[A]", "A.")]
    assert e2e_data.pairs_from_hub(gem) == [("name[B]", "B.")]
    with pytest.raises(ValueError, match="expected one of"):
        e2e_data.pairs_from_hub([{"text": "x"}])


def test_even_subset_is_fixed_and_spread():
    assert e2e_data.even_subset(630, 20) == e2e_data.even_subset(630, 20)
    idx = e2e_data.even_subset(630, 20)
    assert len(set(idx)) == 20 and idx[0] == 0 and idx[-1] > 580
    assert e2e_data.even_subset(5, None) == list(range(5)) and e2e_data.even_subset(5, 0) == []


def test_encoding_masks_the_prompt_and_collate_pads(data_root):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(data_root / "gpt2-tokenizer")
    ex = e2e_data.encode_pair(tok, "name[A]", "A is a pub.", max_length=64)
    n_prompt = len(tok(e2e_data.prompt_text("name[A]"))["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == " A is a pub."
    short = e2e_data.encode_pair(tok, "name[A]", "A is a pub.", max_length=4)
    batch = e2e_data.collate([ex, short], pad_id=tok.eos_token_id)
    assert batch["input_ids"].shape == (2, len(ex["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * (len(ex["input_ids"]) - 4)
    assert (batch["labels"][1, 4:] == -100).all() and torch.equal(batch["labels"][0], torch.tensor(ex["labels"]))
