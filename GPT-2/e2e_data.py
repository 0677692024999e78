"""E2E NLG data: reading the splits (local folder or Hugging Face hub), grouping references by MR, tokenising.

A split is a list of ``(mr, ref)`` pairs. Two local file formats are read, chosen by the file's extension:

* ``.txt``: the LoRA/GPT-2 line format ``MR||reference`` (one pair a line, e.g. ``e2e/valid.txt``);
* ``.csv``: the original E2E challenge CSVs with ``mr`` and ``ref`` columns (e.g. ``e2e/devset.csv``,
  ``e2e/testset_w_refs.csv``), optionally with a byte-order mark.

The test set is scored per distinct MR against *all* its references: :func:`group_by_mr` groups pairs by the exact
MR string, in order of first appearance (the order the official E2E script uses). Each training example is the
prompt ``"<mr> ||"`` followed by the target ``" <ref><eos>"``; the loss is on the target tokens only.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import torch

SPLITS = ("train", "validation", "test")
# Column names of the E2E datasets on the Hugging Face hub: `e2e_nlg` (original) and `GEM/e2e_nlg` (cleaned).
HUB_MR_COLUMNS = ("meaning_representation", "mr")
HUB_REF_COLUMNS = ("human_reference", "target", "ref")


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read ``(mr, ref)`` pairs from a ``MR||ref`` line file (``.txt``) or an E2E CSV (``.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"E2E data file not found: {path}")
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"mr", "ref"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: E2E CSV needs columns 'mr' and 'ref', found {reader.fieldnames}")
            return [(row["mr"].strip(), row["ref"].strip()) for row in reader]
    if path.suffix == ".txt":
        pairs = []
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if "||" not in line:
                    raise ValueError(f"{path}:{lineno}: expected 'MR||reference', got {line[:80]!r}")
                mr, ref = line.split("||", 1)
                pairs.append((mr.strip(), ref.strip()))
        return pairs
    raise ValueError(f"{path}: unknown E2E file format {path.suffix!r} (expected .txt 'MR||ref' lines or .csv)")


def group_by_mr(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance and, for each, all of its references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(ref)
    return list(refs), list(refs.values())


def even_subset(n_total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)`` (all of them when ``n`` is None or >= ``n_total``)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    return [int(i * n_total / n) for i in range(n)]


def pairs_from_hub(rows: Any) -> list[tuple[str, str]]:
    """``(mr, ref)`` pairs from a hub split (a ``datasets.Dataset`` or a list of dicts) of either E2E dataset."""
    names = rows.column_names if hasattr(rows, "column_names") else list(rows[0]) if len(rows) else []
    mr_col = next((c for c in HUB_MR_COLUMNS if c in names), None)
    ref_col = next((c for c in HUB_REF_COLUMNS if c in names), None)
    if mr_col is None or ref_col is None:
        raise ValueError(f"hub dataset has columns {names}; expected one of {HUB_MR_COLUMNS} and {HUB_REF_COLUMNS}")
    return [(row[mr_col].strip(), row[ref_col].strip()) for row in rows]


def split_paths(data_cfg: Any) -> dict[str, Path]:
    """The split files under ``data_cfg.root`` (``{}`` when it is null: the hub), each checked to exist; a clear
    FileNotFoundError otherwise. What a run checks before it loads anything."""
    if data_cfg.root is None:
        return {}
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} is not a folder (set data.root=null to use the hub)")
    paths = {}
    for split in SPLITS:
        name = data_cfg[split]
        if name is None:
            continue
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"E2E {split} split not found: {root / name} (data.{split}={name!r} under data.root={str(root)!r}; "
                "set data.root=null to read the hub dataset data.hub_name instead)"
            )
        paths[split] = root / name
    if "train" not in paths or "test" not in paths:
        raise ValueError(f"data.train and data.test must name files, got {data_cfg.train!r}, {data_cfg.test!r}")
    return paths


def scored_test_set(test_pairs: Sequence[tuple[str, str]], n: int | None) -> tuple[list[str], list[list[str]]]:
    """The test MRs a run scores and all references of each: ``n`` distinct MRs spread evenly over the test split
    (:func:`even_subset`; all of them when ``n`` is None, none when 0)."""
    mrs, refs = group_by_mr(test_pairs)
    keep = even_subset(len(mrs), n)
    return [mrs[i] for i in keep], [refs[i] for i in keep]


def load_splits(data_cfg: Any) -> dict[str, list[tuple[str, str]]]:
    """All three splits as ``(mr, ref)`` pairs, read as ``data_cfg`` says (see ``conf/config.yaml``, ``data:``).

    ``root`` null -> the hub dataset ``hub_name``; otherwise the files ``train``/``validation``/``test`` under
    ``root``. A null ``validation`` file holds out the last ``holdout_mrs`` distinct training MRs (with all their
    references) as the validation split, so selection never sees a training MR.
    """
    if data_cfg.root is None:
        from datasets import load_dataset  # imported here: only the hub path needs it

        splits = {s: pairs_from_hub(load_dataset(data_cfg.hub_name, split=s)) for s in SPLITS}
    else:
        splits = {split: read_pairs(path) for split, path in split_paths(data_cfg).items()}
    if "validation" not in splits:
        k = int(data_cfg.holdout_mrs)
        mrs, _ = group_by_mr(splits["train"])
        if not 0 < k < len(mrs):
            raise ValueError(f"data.validation is null, so data.holdout_mrs must be in [1, {len(mrs) - 1}], got {k}")
        held = set(mrs[-k:])
        splits["validation"] = [p for p in splits["train"] if p[0] in held]
        splits["train"] = [p for p in splits["train"] if p[0] not in held]
    for split, limit in (("train", data_cfg.train_examples), ("validation", data_cfg.validation_examples)):
        if limit is not None:
            splits[split] = splits[split][: int(limit)]
    return splits


def prompt_text(mr: str) -> str:
    """The model's input for an MR; the reference follows it after a space."""
    return f"{mr} ||"


def encode_pair(tokenizer: Any, mr: str, ref: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + ``" ref<eos>"`` and labels (-100 on the prompt), cut to ``max_length`` tokens."""
    context = tokenizer(prompt_text(mr), add_special_tokens=False)["input_ids"]
    target = tokenizer(" " + ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (context + target)[:max_length]
    labels = ([-100] * len(context) + target)[:max_length]
    return {"input_ids": ids, "labels": labels}


class E2EDataset(torch.utils.data.Dataset):
    """Tokenised ``(mr, ref)`` pairs for causal-LM fine-tuning."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int):
        if not pairs:
            raise ValueError("E2EDataset got no (mr, ref) pairs")
        self.examples = [encode_pair(tokenizer, mr, ref, max_length) for mr, ref in pairs]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
