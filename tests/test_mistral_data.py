"""Mistral-7B/glue_data.py: GLUE-format folders with each task's own column layout, errors for bad input."""
from pathlib import Path

import pytest

from harness import load_module

glue_data = load_module("Mistral-7B/glue_data.py")

# The official GLUE files (as written by the GLUE download script), a few rows each.
FIXTURE = {
    "CoLA": {  # no header: source, label, original label, sentence
        "train.tsv": "gj04\t1\t\tthe cat sat on the mat .\ngj04\t0\t*\tcat the mat on sat .\n",
        "dev.tsv": "gj04\t1\t\tthe dog is good .\ngj04\t0\t*\tgood is dog the .\n",
    },
    "SST-2": {
        "train.tsv": "sentence\tlabel\nthe cat is good \t1\nthe dog is bad \t0\n",
        "dev.tsv": "sentence\tlabel\na good cat \t1\na bad dog \t0\n",
    },
    "MRPC": {  # the official file starts with a byte-order mark
        "train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     "1\t1\t2\tthe cat sat .\ta cat sat .\n0\t3\t4\tthe dog is good .\tthe mat is bad .\n",
        "dev.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t5\t6\ta dog sat .\tthe dog sat .\n"
                   "0\t7\t8\tthe cat is bad .\ta mat is good .\n",
    },
    "QQP": {  # the second train row is one of the official file's broken lines
        "train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                     "0\t1\t2\tis the cat good ?\tis a cat good ?\t1\n1\t3\t4\tbroken row\n"
                     "2\t5\t6\tis the dog bad ?\tis the mat good ?\t0\n",
        "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                   "3\t7\t8\tis a dog good ?\tis the dog good ?\t1\n4\t9\t10\tcat ?\tmat ?\t0\n",
    },
    "STS-B": {
        "train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                     "0\tmain\tx\t2012\t1\tnone\tnone\tthe cat sat .\ta cat sat .\t5.000\n"
                     "1\tmain\tx\t2012\t2\tnone\tnone\tthe dog is good .\tthe mat is bad .\t0.500\n",
        "dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                   "0\tmain\tx\t2012\t1\tnone\tnone\ta dog sat .\tthe dog sat .\t4.200\n"
                   "1\tmain\tx\t2012\t2\tnone\tnone\tthe cat .\tthe mat .\t1.000\n",
    },
    "MNLI": {  # many columns; labels are words; two dev files
        **{name: "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                 "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                 "0\t1\t1e\tfiction\t(x)\t(y)\t(X)\t(Y)\tthe cat sat .\ta cat sat .\tentailment\tentailment\n"
                 "1\t2\t2n\tfiction\t(x)\t(y)\t(X)\t(Y)\tthe dog sat .\tthe dog is good .\tneutral\tneutral\n"
                 "2\t3\t3c\tfiction\t(x)\t(y)\t(X)\t(Y)\tthe dog is good .\tthe dog is bad .\tcontradiction\t"
                 "contradiction\n"
           for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")},
    },
    "QNLI": {
        "train.tsv": "index\tquestion\tsentence\tlabel\n0\tis the cat good ?\tthe cat is good .\tentailment\n"
                     "1\tis the dog bad ?\tthe mat sat .\tnot_entailment\n",
        "dev.tsv": "index\tquestion\tsentence\tlabel\n0\tis a dog good ?\ta dog is good .\tentailment\n"
                   "1\tis the mat bad ?\tthe cat sat .\tnot_entailment\n",
    },
    "RTE": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tthe cat sat on the mat .\ta cat sat .\tentailment\n"
                     "1\tthe dog is good .\tthe dog is bad .\tnot_entailment\n"
                     "2\ta good dog sat .\ta dog sat .\tentailment\n3\tthe cat is bad .\tthe cat is good .\t"
                     "not_entailment\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta dog sat on the mat .\ta dog sat .\tentailment\n"
                   "1\tthe mat is good .\tthe mat is bad .\tnot_entailment\n",
    },
    "WNLI": {
        "train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tthe cat sat .\ta cat sat .\t1\n"
                     "1\tthe dog sat .\tthe mat sat .\t0\n",
        "dev.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta dog is good .\tthe dog is good .\t1\n"
                   "1\tthe cat is bad .\tthe mat is bad .\t0\n",
    },
}


def write_glue(root: Path, folders=None) -> Path:
    """Write the GLUE-format fixture (all tasks, or the given official folder names) under `root`."""
    for folder, files in FIXTURE.items():
        if folders is None or folder in folders:
            (root / folder).mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (root / folder / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def glue_root(tmp_path):
    return write_glue(tmp_path / "glue")


EXPECTED_TRAIN = {  # task: (first text1, first text2, labels)
    "cola": ("the cat sat on the mat .", None, [1, 0]),
    "sst2": ("the cat is good ", None, [1, 0]),
    "mrpc": ("the cat sat .", "a cat sat .", [1, 0]),
    "qqp": ("is the cat good ?", "is a cat good ?", [1, 0]),
    "stsb": ("the cat sat .", "a cat sat .", [5.0, 0.5]),
    "mnli": ("the cat sat .", "a cat sat .", [0, 1, 2]),
    "qnli": ("is the cat good ?", "the cat is good .", [0, 1]),
    "rte": ("the cat sat on the mat .", "a cat sat .", [0, 1, 0, 1]),
    "wnli": ("the cat sat .", "a cat sat .", [1, 0]),
}


@pytest.mark.parametrize("task", sorted(EXPECTED_TRAIN))
def test_local_layouts_are_normalised(glue_root, task):
    data = glue_data.load_glue(task, root=glue_root)
    assert set(data) == {"train", *glue_data.eval_splits(task)}
    text1, text2, labels = EXPECTED_TRAIN[task]
    train = data["train"]
    assert train["label"] == labels
    assert train[0]["text1"] == text1
    if text2 is None:
        assert "text2" not in train.column_names
    else:
        assert train[0]["text2"] == text2
    for split in glue_data.eval_splits(task):
        assert len(data[split]) >= 2


def test_mnli_has_matched_and_mismatched_dev():
    assert glue_data.eval_splits("mnli") == ["validation_matched", "validation_mismatched"]
    assert glue_data.eval_splits("rte") == ["validation"]


def test_num_labels():
    assert [glue_data.num_labels(t) for t in ("stsb", "mnli", "rte", "cola")] == [1, 3, 2, 2]


def test_lower_case_task_folder_and_cola_with_header(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood \t1\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nbad \t0\n")
    assert glue_data.load_glue("sst2", root=tmp_path)["validation"]["label"] == [0]
    (tmp_path / "cola").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "cola" / name).write_text("sentence\tlabel\nthe cat sat .\t1\n")
    assert glue_data.load_glue("cola", root=tmp_path)["train"]["text1"] == ["the cat sat ."]


def test_unknown_task_is_a_clear_error(glue_root):
    with pytest.raises(ValueError, match="unknown GLUE task 'sst5'"):
        glue_data.load_glue("sst5", root=glue_root)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glue_data.load_glue("rte", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no folder for task 'rte'.*RTE/ or rte/"):
        glue_data.load_glue("rte", root=tmp_path)
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text(FIXTURE["RTE"]["train.tsv"])
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        glue_data.load_glue("rte", root=tmp_path)


def test_bad_label_and_header_name_the_file(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"train.tsv: bad rte label 'maybe'"):
        glue_data.read_tsv(tmp_path / "RTE" / "train.tsv", "rte")
    (tmp_path / "RTE" / "dev.tsv").write_text("premise\thypo\tlabel\na\tb\t0\n")
    with pytest.raises(ValueError, match=r"dev.tsv: none of the columns \('sentence1',\)"):
        glue_data.read_tsv(tmp_path / "RTE" / "dev.tsv", "rte")


def test_subsample_is_fixed_and_sized(glue_root):
    train = glue_data.load_glue("rte", root=glue_root)["train"]
    a, b = glue_data.subsample(train, 2, seed=0), glue_data.subsample(train, 2, seed=0)
    assert len(a) == 2 and a["text1"] == b["text1"]
    assert glue_data.subsample(train, None, seed=0) is train
    assert glue_data.subsample(train, 99, seed=0) is train
    with pytest.raises(ValueError, match="positive, got 0"):
        glue_data.subsample(train, 0, seed=0)


@pytest.mark.parametrize("task,text_cols,splits", [
    ("mnli", ("premise", "hypothesis"), ("train", "validation_matched", "validation_mismatched", "test_matched")),
    ("sst2", ("sentence",), ("train", "validation", "test")),
    ("qqp", ("question1", "question2"), ("train", "validation", "test")),
])
def test_hub_columns_are_normalised(tmp_path, task, text_cols, splits):
    """The hub path (no download: a local folder laid out like the hub's parquet files)."""
    row = {**{c: [f"{c} text"] for c in text_cols}, "label": [1], "idx": [0]}
    glue_data.write_hub_layout(tmp_path, task, {s: row for s in splits})
    data = glue_data.load_glue(task, hub_path=str(tmp_path))
    assert set(data) == {"train", *glue_data.eval_splits(task)}  # the unlabelled test splits are left out
    expected = ["text1", "label"] if len(text_cols) == 1 else ["text1", "text2", "label"]
    for split in data.values():
        assert sorted(split.column_names) == sorted(expected)
        assert split[0]["text1"] == f"{text_cols[0]} text" and split[0]["label"] == 1
