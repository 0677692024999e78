"""GLUE data: a local GLUE-format folder or the Hugging Face hub, normalised to columns text1, [text2], label.

Local layout (as written by the GLUE download script): `<root>/<TASK>/train.tsv` and `dev.tsv`
(MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`), where <TASK> is the official folder name (CoLA, SST-2, MRPC,
QQP, STS-B, MNLI, QNLI, RTE, WNLI) or the lower-case task name (`sst2`, as in ../shared/data). Each task keeps
its own column layout; columns are found by header name (with the hub's names accepted too), CoLA's
header-less files by position. String labels get the hub's ids (mnli: entailment 0, neutral 1,
contradiction 2; qnli/rte: entailment 0, not_entailment 1), so local and hub data are interchangeable.
"""
from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from glue_metrics import check_task

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)  # a few GLUE rows are longer than csv's default limit

_NLI = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class TaskLayout:
    """Where a task's fields live: accepted header names per field, or positions for header-less files."""
    folder: str                           # official GLUE folder name
    text1: tuple[str, ...]
    text2: tuple[str, ...] | None
    label: tuple[str, ...]
    label_map: dict[str, int] = field(default_factory=dict)
    positions: tuple[int, int] | None = None  # (text1, label) columns of a header-less file (CoLA)
    hub_text: tuple[str, str | None] = ("sentence1", "sentence2")  # the hub's text column names
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)


LAYOUTS: dict[str, TaskLayout] = {
    "cola": TaskLayout("CoLA", ("sentence",), None, ("label",), positions=(3, 1), hub_text=("sentence", None)),
    "sst2": TaskLayout("SST-2", ("sentence",), None, ("label",), hub_text=("sentence", None)),
    "mrpc": TaskLayout("MRPC", ("#1 String", "sentence1"), ("#2 String", "sentence2"), ("Quality", "label")),
    "qqp": TaskLayout("QQP", ("question1",), ("question2",), ("is_duplicate", "label"),
                      hub_text=("question1", "question2")),
    "stsb": TaskLayout("STS-B", ("sentence1",), ("sentence2",), ("score", "label")),
    "mnli": TaskLayout("MNLI", ("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label"),
                       label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
                       hub_text=("premise", "hypothesis"),
                       dev_files=(("validation_matched", "dev_matched.tsv"),
                                  ("validation_mismatched", "dev_mismatched.tsv"))),
    "qnli": TaskLayout("QNLI", ("question",), ("sentence",), ("label",), label_map=_NLI,
                       hub_text=("question", "sentence")),
    "rte": TaskLayout("RTE", ("sentence1",), ("sentence2",), ("label",), label_map=_NLI),
    "wnli": TaskLayout("WNLI", ("sentence1",), ("sentence2",), ("label",)),
}


def num_labels(task: str) -> int:
    """Classifier outputs: 1 (regression) for stsb, 3 for mnli, 2 otherwise."""
    return {"stsb": 1, "mnli": 3}.get(check_task(task), 2)


def eval_splits(task: str) -> list[str]:
    """Names of the dev splits (hub naming): mnli has a matched and a mismatched one."""
    return [name for name, _ in LAYOUTS[check_task(task)].dev_files]


def task_dir(root: str | Path, task: str) -> Path:
    """The folder of `task` under a GLUE-format `root`; a clear FileNotFoundError when there is none."""
    layout = LAYOUTS[check_task(task)]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"GLUE data folder {str(root)!r} does not exist (set data.root to a folder "
                                f"holding <TASK>/train.tsv and dev.tsv, or data.root=null to use the hub)")
    for name in (layout.folder, task, task.upper()):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no folder for task {task!r} in {str(root)!r}: expected {layout.folder}/ or {task}/ "
                            f"holding train.tsv and {', '.join(f for _, f in layout.dev_files)}")


def _column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: none of the columns {names} in header {header}")


def _parse_label(task: str, value: str, layout: TaskLayout, path: Path) -> float | int:
    value = value.strip()
    if task == "stsb":
        return float(value)
    if value in layout.label_map:
        return layout.label_map[value]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}: bad {task} label {value!r} (expected an integer or one of "
                         f"{sorted(layout.label_map)})") from None


def read_tsv(path: str | Path, task: str) -> dict[str, list]:
    """Read one GLUE TSV file of `task` into columns {"text1", ["text2"], "label"}."""
    path, layout = Path(path), LAYOUTS[check_task(task)]
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file {str(path)!r} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty")
    if layout.positions is not None and not set(layout.text1) & set(rows[0]):  # header-less CoLA
        (i1, il), i2 = layout.positions, None
    else:
        header, rows = rows[0], rows[1:]
        i1, il = _column(header, layout.text1, path), _column(header, layout.label, path)
        i2 = _column(header, layout.text2, path) if layout.text2 else None
    cols: dict[str, list] = {"text1": [], "label": []}
    if i2 is not None:
        cols["text2"] = []
    need, skipped = max(i for i in (i1, i2, il) if i is not None), 0
    for row in rows:
        if len(row) <= need:  # a few official train files hold broken lines
            skipped += 1
            continue
        cols["text1"].append(row[i1])
        if i2 is not None:
            cols["text2"].append(row[i2])
        cols["label"].append(_parse_label(task, row[il], layout, path))
    if skipped:
        log.warning("%s: skipped %d malformed rows", path, skipped)
    if not cols["label"]:
        raise ValueError(f"{path}: no usable rows")
    return cols


def split_files(root: str | Path, task: str) -> list[tuple[str, Path]]:
    """``(split name, file)`` of the train and dev splits of `task` under a GLUE-format `root`, each checked to
    exist (a clear FileNotFoundError otherwise): what a run checks before it loads anything."""
    layout = LAYOUTS[check_task(task)]
    folder = task_dir(root, task)
    files = [(name, folder / fname) for name, fname in [("train", "train.tsv"), *layout.dev_files]]
    missing = [str(path) for _, path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"GLUE file(s) not found: {missing} (data.root={str(root)!r}, task {task!r})")
    return files


def load_glue(task: str, root: str | Path | None = None, hub_id: str = "nyu-mll/glue"):
    """The train and dev splits of `task` as a datasets.DatasetDict with columns text1, [text2], label.

    root: a GLUE-format folder, or None to load `hub_id` from the Hugging Face hub (needs network or cache).
    """
    from datasets import Dataset, DatasetDict, load_dataset

    layout = LAYOUTS[check_task(task)]
    splits = [("train", "train.tsv"), *layout.dev_files]
    if root is not None:
        return DatasetDict({name: Dataset.from_dict(read_tsv(path, task)) for name, path in split_files(root, task)})
    hub = load_dataset(hub_id, task)
    t1, t2 = layout.hub_text
    out = DatasetDict()
    for name, _ in splits:
        ds = hub[name].rename_column(t1, "text1")
        if t2 is not None:
            ds = ds.rename_column(t2, "text2")
        out[name] = ds.remove_columns([c for c in ds.column_names if c not in ("text1", "text2", "label")])
    return out


def subsample(ds, n: int | None, seed: int):
    """A fixed random subset of `n` rows (all rows when n is None or not smaller than the split)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    return ds.shuffle(seed=seed).select(range(n))


def tokenize(dsd, tokenizer, max_length: int | None):
    """Tokenise text1 (and text2 as the second segment), keep `label`; padding is left to the collator."""
    def encode(batch):
        pair = (batch["text1"], batch["text2"]) if "text2" in batch else (batch["text1"],)
        return tokenizer(*pair, truncation=True, max_length=max_length)

    return dsd.map(encode, batched=True, remove_columns=[c for c in dsd["train"].column_names if c != "label"])
