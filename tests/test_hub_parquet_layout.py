"""The hub data paths read parquet files, never a loading script: E2E (the parquet export of the original
``e2e_nlg``) and GLUE (``nyu-mll/glue``), pointed at local folders laid out like the hub, built here from the
shared data. Nothing is downloaded."""


import pytest
from omegaconf import OmegaConf

from harness import REPO_ROOT as ROOT
from harness import load_module

e2e_data = load_module(ROOT / "GPT-2" / "e2e_data.py")
e2e_metrics = load_module(ROOT / "GPT-2" / "e2e_metrics.py")
glue_data = load_module(ROOT / "Mistral-7B" / "glue_data.py")


def hub_cfg(hub_path, **over):
    base = {"root": None, "hub_path": str(hub_path), "train": None, "validation": None, "test": None,
            "holdout_mrs": 0, "train_examples": None, "validation_examples": None, "test_mrs": None, "max_length": 32}
    return OmegaConf.create({**base, **over})


@pytest.fixture(scope="module")
def e2e_hub(data_root, tmp_path_factory):
    """A folder laid out like the parquet export of e2e_nlg (default/<split>/0000.parquet), from the shared files."""
    e2e = data_root / "e2e"
    local = {"train": e2e_data.read_pairs(e2e / "valid.txt"), "validation": e2e_data.read_pairs(e2e / "devset.csv"),
             "test": e2e_data.read_pairs(e2e / "testset_w_refs.csv")}
    folder = e2e_data.write_hub_layout(tmp_path_factory.mktemp("e2e_nlg") / "default", local)
    return folder, local


def test_e2e_hub_layout_reads_the_same_pairs_and_grouped_references(e2e_hub, data_root):
    folder, local = e2e_hub
    import pyarrow.parquet as pq

    assert pq.read_schema(folder / "test" / "0000.parquet").names == ["meaning_representation", "human_reference"]
    splits = e2e_data.load_splits(hub_cfg(folder))
    assert splits == local
    assert len(splits["test"]) == 4693 and len(splits["validation"]) == 4672
    mrs, refs = e2e_data.group_by_mr(splits["test"])
    ref_mrs, ref_refs = e2e_metrics.read_references(data_root / "e2e" / "testset_w_refs.csv")
    assert len(mrs) == 630 and (mrs, refs) == (ref_mrs, ref_refs)  # grouped exactly as the scorer groups the file


def test_e2e_hub_layout_holdout_and_limits_apply_as_for_local_files(e2e_hub):
    folder, local = e2e_hub
    splits = e2e_data.load_splits(hub_cfg(folder, train_examples=10, validation_examples=3))
    assert splits["train"] == local["train"][:10] and splits["validation"] == local["validation"][:3]


def test_e2e_hub_layout_missing_split_is_named_before_reading(tmp_path):
    e2e_data.write_hub_layout(tmp_path, {"train": [("name[A]", "A.")], "test": [("name[A]", "A.")]})
    with pytest.raises(FileNotFoundError, match=r"no parquet files for split\(s\) \['validation'\].*<split>/0000"):
        e2e_data.load_splits(hub_cfg(tmp_path))


def test_e2e_default_hub_path_is_the_parquet_export_of_the_original_dataset():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "GPT-2" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data.root=null"])
    assert cfg.data.hub_path == "hf://datasets/tuetschek/e2e_nlg@refs%2Fconvert%2Fparquet/default"
    assert e2e_data.hub_split_pattern(cfg.data.hub_path, "test") == (
        "hf://datasets/tuetschek/e2e_nlg@refs%2Fconvert%2Fparquet/default/test/*.parquet")
    from huggingface_hub.utils._hf_uris import parse_hf_uri

    uri = parse_hf_uri(e2e_data.hub_split_pattern(cfg.data.hub_path, "train"))
    assert (uri.id, uri.revision, uri.path_in_repo) == ("tuetschek/e2e_nlg", "refs/convert/parquet",
                                                        "default/train/*.parquet")


def _hub_columns(task, cols):
    """Local columns (text1, [text2], label) -> the hub's column names, with idx."""
    t1, t2 = glue_data.LAYOUTS[task].hub_text
    out = {t1: cols["text1"], "label": cols["label"], "idx": list(range(len(cols["label"])))}
    if t2 is not None:
        out[t2] = cols["text2"]
    return out


def test_sst2_hub_layout_reads_the_same_sentences_and_labels(data_root, tmp_path):
    local = glue_data.load_glue("sst2", root=data_root)
    hub_splits = {s: _hub_columns("sst2", local[s].to_dict()) for s in ("train", "validation")}
    glue_data.write_hub_layout(tmp_path, "sst2", hub_splits)
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    hub = glue_data.load_glue("sst2", hub_path=str(tmp_path))
    assert set(hub) == {"train", "validation"} and len(hub["train"]) == 67349 and len(hub["validation"]) == 872
    for split in hub:
        assert hub[split]["text1"] == local[split]["text1"] and hub[split]["label"] == local[split]["label"]
    assert hub["train"].features["label"].names == ["negative", "positive"]


@pytest.mark.parametrize("task", ["mnli", "qnli", "rte"])
def test_string_labels_of_local_files_get_the_hub_ids(tmp_path, task):
    """A local TSV with string labels and the hub's ClassLabel ids give the same label ids."""
    layout = glue_data.LAYOUTS[task]
    names = glue_data.HUB_LABEL_NAMES[task]
    header = [layout.text1[0], layout.text2[0], layout.label[0]]
    rows = [[f"premise {i}", f"hypothesis {i}", names[i % len(names)]] for i in range(6)]
    local_dir = tmp_path / "local" / layout.folder
    local_dir.mkdir(parents=True)
    for _, fname in (("train", "train.tsv"), *layout.dev_files):
        (local_dir / fname).write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    local = glue_data.load_glue(task, root=tmp_path / "local")
    ids = [i % len(names) for i in range(6)]
    hub_cols = _hub_columns(task, {"text1": [r[0] for r in rows], "text2": [r[1] for r in rows], "label": ids})
    glue_data.write_hub_layout(tmp_path / "hub", task, {s: hub_cols for s in local})
    hub = glue_data.load_glue(task, hub_path=str(tmp_path / "hub"))
    for split in local:
        assert hub[split].to_dict() == local[split].to_dict()
        assert local[split]["label"] == ids


def test_glue_hub_layout_missing_split_is_named(tmp_path):
    glue_data.write_hub_layout(tmp_path, "mnli", {"train": {"premise": ["p"], "hypothesis": ["h"], "label": [0]}})
    with pytest.raises(FileNotFoundError, match=r"mnli split\(s\) \['validation_matched', 'validation_mismatched'\]"):
        glue_data.load_glue("mnli", hub_path=str(tmp_path))


def test_glue_default_hub_path_is_the_parquet_repository():
    from hydra import compose, initialize_config_dir

    load_module(ROOT / "Mistral-7B" / "config_groups.py").register_config_groups()
    with initialize_config_dir(config_dir=str(ROOT / "Mistral-7B" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=mnli"])
    assert cfg.data.root is None and cfg.data.hub_path == "hf://datasets/nyu-mll/glue"
    assert glue_data.hub_split_pattern(cfg.data.hub_path, "mnli", "validation_matched") == (
        "hf://datasets/nyu-mll/glue/mnli/validation_matched-*.parquet")
