"""Object_Generation/ and Mix-of-Show/: configs compose, both train scripts run end to end on the tiny models with
each optimizer, EDLoRA's layer-wise conditioning, clear errors. CPU, tiny models, a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import REPO_ROOT, load_module, load_records
from harness import diffusion as D

FOLDERS = {"object_generation": REPO_ROOT / "Object_Generation", "mix_of_show": REPO_ROOT / "Mix-of-Show"}
OPTIMIZERS = ["sgd", "scaled_gd", "adamw", "scaled_adamw"]


def _load(experiment, name):
    """``train`` or ``make_figure`` of an experiment folder (each has its own), under a name of their own."""
    return load_module(FOLDERS[experiment] / f"{name}.py", f"{experiment}_{name}")


@pytest.fixture(scope="module")
def edlora():
    return load_module(FOLDERS["mix_of_show"] / "edlora.py")


def _compose(experiment, overrides=(), hydra_config=False):
    with initialize_config_dir(str(FOLDERS[experiment] / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("experiment", list(FOLDERS))
def test_configs_compose_with_every_option(experiment):
    conf = FOLDERS[experiment] / "conf"
    base = _compose(experiment)
    assert base.tags.preset == "full" and base.model.pretrained in ("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                                    "windwhinny/chilloutmix")
    for group in ("optim", "paper_lr", "concept", "preset"):
        for option in sorted((conf / group).glob("*.yaml")):
            cfg = _compose(experiment, [f"{group}={option.stem}"])
            if group == "optim":
                assert cfg.optim.name == option.stem
    tiny = _compose(experiment, ["preset=tiny"])
    assert tiny.model.pretrained is None and tiny.model.tiny.resolution == tiny.data.resolution == 32
    assert (tiny.tags.preset, tiny.threads, base.threads, base.wandb) == ("tiny", 1, None, None)
    with pytest.raises(Exception, match="nosuch"):
        _compose(experiment, ["optim=nosuch"])


@pytest.mark.parametrize("experiment", list(FOLDERS))
def test_paths_default_to_the_repository_and_the_shared_data(experiment, data_root):
    base = _compose(experiment)
    assert Path(base.results_dir) == REPO_ROOT / "results" and Path(base.data.root) == data_root
    assert Path(base.model.gpt2_dir) == data_root / "gpt2-tokenizer"


def test_paper_settings_are_versioned_in_the_configs():
    og = {p: _compose("object_generation", [f"paper_lr={p}"]) for p in ("lr1e-2", "lr1e-3", "lr5e-5", "lr1e-6")}
    assert {p: (c.text_lr, c.text_reg, c.fusion_scale) for p, c in og.items()} == {
        "lr1e-2": (1e-2, 1e6, 0.7), "lr1e-3": (1e-3, 1e6, 0.67),
        "lr5e-5": (5e-5, 1e6, 0.7), "lr1e-6": (1e-6, 1e8, 0.67)}
    assert all(c.unet_lr == 1e-4 and c.unet_reg == 0 for c in og.values())
    mos = {p: _compose("mix_of_show", [f"paper_lr={p}"]) for p in ("t5e-4_u5e-4", "t1e-5_u1e-4", "t5e-6_u5e-5")}
    assert {p: (c.text_lr, c.unet_lr, c.text_reg, c.unet_reg, c.fusion_scale) for p, c in mos.items()} == {
        "t5e-4_u5e-4": (5e-4, 5e-4, 10, 10, 0.7), "t1e-5_u1e-4": (1e-5, 1e-4, 0, 0, 1.0),
        "t5e-6_u5e-5": (5e-6, 5e-5, 0, 0, 1.0)}
    sweep = _compose("object_generation", ["sweep=paper"], hydra_config=True).hydra.sweeper.params
    assert sweep.optim == "adamw,scaled_adamw" and len(sweep.paper_lr.split(",")) == 4
    sweep = _compose("mix_of_show", ["sweep=paper"], hydra_config=True).hydra.sweeper.params
    assert len(sweep.paper_lr.split(",")) == 3


# ------------------------------------------------------------------------------------------------ end to end
def _tiny_overrides(tmp_path, optimizer, *extra):
    return ["preset=tiny", f"optim={optimizer}", f"results_dir={tmp_path}", "train.steps=3", "sample.steps=2",
            "sample.seeds=[0,1]", *extra]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_object_generation_runs_end_to_end(tmp_path, data_root, optimizer):
    train = _load("object_generation", "train")
    cfg = _compose("object_generation", _tiny_overrides(tmp_path, optimizer, "paper_lr=lr1e-3",
                                                        "lora.unet_targets=[to_q,to_k,to_v,to_out.0,proj_in]"))
    black_share = train.main(cfg)
    [record] = load_records(tmp_path, "object_generation")
    assert record.optimizer == optimizer and len(record.steps) == 3
    assert record.hparams["text_lr"] == 1e-3 and record.hparams["fusion_scale"] == 0.67
    assert record.tags == {"preset": "tiny", "concept": "vase", "text_lr": 1e-3}
    metrics = record.final_metrics
    assert metrics["num_images"] == 2 and metrics["black_share"] == black_share
    assert metrics["token_embedding_delta"] > 0 and metrics["text_lora_delta"] > 0
    assert (tmp_path / "object_generation" / "samples" / f"{record.run_name}.png").is_file()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mix_of_show_runs_end_to_end(tmp_path, data_root, optimizer):
    train = _load("mix_of_show", "train")
    cfg = _compose("mix_of_show", _tiny_overrides(tmp_path, optimizer, "paper_lr=t5e-4_u5e-4",
                                                  "lora.unet_targets=[to_q,to_k,to_v,to_out.0,proj_out]"))
    black_share = train.main(cfg)
    [record] = load_records(tmp_path, "mix_of_show")
    assert record.optimizer == optimizer and len(record.steps) == 3
    assert record.hparams["layers"] == 4 and record.hparams["lr"] == 5e-4 and record.hparams["text_lr"] == 5e-4
    assert record.final_metrics["black_share"] == black_share and record.final_metrics["num_images"] == 2
    assert record.final_metrics["token_embedding_delta"] > 0
    assert [s["lr"] for s in record.steps] == sorted((s["lr"] for s in record.steps), reverse=True)  # linear decay


def test_figures_from_the_tiny_runs(tmp_path, data_root):
    for experiment, concept in (("object_generation", "vase"), ("mix_of_show", "dog")):
        train = _load(experiment, "train")
        figure = _load(experiment, "make_figure")
        for optimizer in ("adamw", "scaled_adamw"):
            train.main(_compose(experiment, _tiny_overrides(tmp_path, optimizer, "train.steps=1", "sample.seeds=[0]")))
        out = figure.make_figure(tmp_path, tmp_path / f"{experiment}.png")
        assert out.is_file() and out.stat().st_size > 1000
        with pytest.raises(ValueError, match="no .* records for concept 'teapot'"):
            figure.make_figure(tmp_path, tmp_path / "x.png", concept="teapot")


@pytest.mark.parametrize("experiment", list(FOLDERS))
def test_empty_concept_folder_is_a_clear_error(tmp_path, data_root, experiment):
    train = _load(experiment, "train")
    empty = tmp_path / "empty_concept"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images") as err:
        train.main(_compose(experiment, _tiny_overrides(tmp_path, "adamw", f"concept.dir={empty}")))
    assert str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError, match="concept folder"):
        train.main(_compose(experiment, _tiny_overrides(tmp_path, "adamw", f"concept.dir={tmp_path / 'missing'}")))


# ------------------------------------------------------------------------------------------------ EDLoRA pieces
def test_layerwise_prompts_and_tokens(edlora):
    assert edlora.layer_tokens(["<V1>", "<V2>"], 2) == [["<V1_l0>", "<V1_l1>"], ["<V2_l0>", "<V2_l1>"]]
    assert edlora.bind_prompts(["a sketch of <V1> <V2>", "plain"], ["<V1>", "<V2>"], 2) == [
        ["a sketch of <V1_l0> <V2_l0>", "a sketch of <V1_l1> <V2_l1>"], ["plain", "plain"]]
    with pytest.raises(ValueError, match="must look like <name>"):
        edlora.layer_tokens(["V1"], 2)


def test_each_cross_attention_layer_reads_its_own_conditioning(edlora, data_root):
    sd = D.load_components(None, {"resolution": 32}, data_root / "gpt2-tokenizer", seed=0)
    unet = sd.unet.eval()
    names = [n for n, _ in edlora.cross_attention_modules(unet)]
    assert names[0].startswith("down_blocks") and names[-1].startswith("up_blocks") and len(names) == 4
    torch.manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = unet(x, t, c).sample
        assert edlora.enable_layerwise_conditioning(unet) == 4
        same = unet(x, t, c.unsqueeze(1).expand(1, 4, 77, 32)).sample
        torch.testing.assert_close(same, plain)  # equal layers = ordinary conditioning
        for layer in range(4):
            cond = c.unsqueeze(1).repeat(1, 4, 1, 1)
            cond[:, layer] = torch.randn(77, 32)
            assert not torch.allclose(unet(x, t, cond).sample, plain), layer
        with pytest.raises(ValueError, match="conditioning has 2 layers"):
            unet(x, t, c.unsqueeze(1).expand(1, 2, 77, 32))


def test_layerwise_tokenization_and_distinct_embeddings(edlora, data_root):
    sd = D.load_components(None, {"resolution": 32}, data_root / "gpt2-tokenizer", seed=0)
    per_layer = edlora.layer_tokens(["<V1>"], 3)[0]
    ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, per_layer)
    batch = edlora.tokenize_layerwise(sd.tokenizer, ["a photo of <V1>", ""], ["<V1>"], 3)
    assert batch.shape == (2, 3, 77)
    for layer in range(3):  # layer l's prompt holds layer l's token
        assert ids[layer] in batch[0, layer].tolist() and sum(i in batch[0, layer].tolist() for i in ids) == 1
    assert torch.equal(batch[1, 0], batch[1, 2])  # a prompt without the concept is the same in every layer


def test_full_scale_loading_path_with_a_local_diffusers_folder(tmp_path, data_root):
    """The `model.pretrained=<folder>` path of the full-scale runs, on a tiny model saved in diffusers' layout."""
    sd = D.load_components(None, {"resolution": 32}, data_root / "gpt2-tokenizer", seed=0)
    folder = tmp_path / "tiny-sd"
    for part in ("tokenizer", "text_encoder", "vae", "unet"):
        getattr(sd, part).save_pretrained(folder / part)
    sd.noise_scheduler.save_pretrained(folder / "scheduler")
    loaded = D.load_components(str(folder))
    assert loaded.tokenizer("a photo of a vase").input_ids == sd.tokenizer("a photo of a vase").input_ids
    torch.testing.assert_close(loaded.unet.conv_in.weight, sd.unet.conv_in.weight)
    train = _load("object_generation", "train")
    cfg = _compose("object_generation", _tiny_overrides(tmp_path, "scaled_adamw", f"model.pretrained={folder}",
                                                        "model.tiny=null", "tags.preset=local"))
    train.main(cfg)
    [record] = load_records(tmp_path, "object_generation")
    assert record.tags["preset"] == "local" and record.config["model"]["pretrained"] == str(folder)
    with pytest.raises(FileNotFoundError, match="no unet/ inside"):
        D.load_components(str(tmp_path))
