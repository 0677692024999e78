"""harness.diffusion: the pieces Object_Generation/ and Mix-of-Show/ share (tiny models, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from core import build_optimizer, find_lora_pairs
from harness import RunRecorder, load_records
from harness import diffusion as D

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture()
def gpt2_dir(data_root):
    return data_root / "gpt2-tokenizer"


@pytest.fixture()
def sd(gpt2_dir):
    """A fresh tiny random Stable Diffusion (32 px images, 16 px latents)."""
    return D.load_components(None, {"resolution": 32}, gpt2_dir, seed=0)


# ------------------------------------------------------------------------------------------------ data
def test_concept_dataset_fixed_prompt_and_captions(data_root):
    fixed = D.ConceptDataset(data_root / "concepts" / "vase", 32, prompt="a photo of <s1><s2>", jitter=(0.2, 0.1, 0.0))
    assert len(fixed) == 6
    item = fixed[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["prompt"] == "a photo of <s1><s2>"
    captioned = D.ConceptDataset(data_root / "concepts" / "dog", 32, replacement="<V1> <V2>", repeats=3)
    assert len(captioned) == 15
    assert captioned[0]["prompt"] == "<V1> <V2>, tongue out"


def test_concept_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.ConceptDataset(tmp_path / "nowhere", 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"holds no images.*") as err:
        D.ConceptDataset(empty, 32)
    assert str(empty) in str(err.value)
    Image.new("RGB", (40, 40), "red").save(empty / "a.png")
    with pytest.raises(ValueError, match="no caption file a.txt"):
        D.ConceptDataset(empty, 32)  # captions needed without a fixed prompt
    assert len(D.ConceptDataset(empty, 32, prompt="x")) == 1


def test_color_jitter_stays_in_range_and_changes_the_image():
    x = torch.rand(3, 8, 8)
    y = D.color_jitter(x, 0.5, 0.5, 0.5, generator=torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    assert torch.allclose(D.color_jitter(x, 0.0, 0.0, 0.0), x, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tokens
def test_tiny_tokenizer_is_clip_like(gpt2_dir):
    tok = D.build_tiny_tokenizer(gpt2_dir, num_words=200)
    assert 2 * 256 + 200 < len(tok) < 2 * 256 + 200 * 8
    assert tok.tokenize("the") == ["the</w>"]  # CLIP's word-end convention
    ids = D.tokenize(tok, ["a photo of a vase"])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
    assert ids[0, -1] == tok.pad_token_id
    assert D.build_tiny_tokenizer(gpt2_dir, num_words=200).get_vocab() == tok.get_vocab()  # deterministic
    with pytest.raises(FileNotFoundError, match="vocab.json. is missing"):
        D.build_tiny_tokenizer(gpt2_dir / "missing")


def test_new_tokens_are_single_tokens_with_new_rows(sd):
    old_rows = sd.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>", "<s2>"], [None, "a"])
    assert ids == [old_rows.shape[0], old_rows.shape[0] + 1]
    assert sd.tokenizer.tokenize("a photo of <s1><s2>")[-2:] == ["<s1>", "<s2>"]
    weight = sd.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[: old_rows.shape[0]], old_rows)
    a_id = sd.tokenizer.encode("a", add_special_tokens=False)[0]
    assert torch.equal(weight[ids[1]], weight[a_id])  # initialised from an existing token
    with pytest.raises(ValueError, match="not in the tokenizer already"):
        D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>"])
    with pytest.raises(ValueError, match="not one"):
        D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s3>"], ["a photo"])


@pytest.mark.parametrize("name", ["adamw", "scaled_adamw", "sgd", "scaled_gd"])
def test_only_new_embedding_rows_change(sd, name):
    D.add_lora(sd.text_encoder, TEXT_TARGETS, rank=2, alpha=2)
    ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>", "<s2>"])
    embedding = sd.text_encoder.get_input_embeddings()
    before = embedding.weight.detach().clone()
    hparams = {"lr": 1e-2, "weight_decay": 0.1} | ({"reg": 1e-3} if name.startswith("scaled") else {})
    opt = build_optimizer(sd.text_encoder, name, **hparams)
    D.keep_original_embedding_rows(opt, embedding, ids)
    input_ids = D.tokenize(sd.tokenizer, ["a photo of <s1><s2> on a table"])
    for _ in range(3):
        sd.text_encoder(input_ids)[0].pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = (embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids


def test_embedding_rows_freeze_at_norm(sd):
    ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>"], init_std=1.0)  # norm ~ sqrt(32) already
    embedding = sd.text_encoder.get_input_embeddings()
    opt = torch.optim.SGD([embedding.weight], lr=1.0)
    D.keep_original_embedding_rows(opt, embedding, ids, freeze_at_norm=0.5)
    input_ids = D.tokenize(sd.tokenizer, ["<s1>"])
    for step in range(2):
        sd.text_encoder(input_ids)[0].pow(2).mean().backward()
        before = embedding.weight[ids].detach().clone()
        opt.step()
        opt.zero_grad()
        moved = not torch.equal(embedding.weight[ids], before)
        assert moved == (step == 0)  # the first step reaches the threshold, then the rows are frozen


def test_keep_rows_needs_the_embedding_in_the_optimizer(sd):
    ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>"], trainable=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="not optimized by this optimizer"):
        D.keep_original_embedding_rows(opt, sd.text_encoder.get_input_embeddings(), ids)


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_pairs_of_unet_and_text_encoder_include_1x1_convs(sd):
    D.add_lora(sd.unet, UNET_TARGETS, rank=4, alpha=4)
    D.add_lora(sd.text_encoder, TEXT_TARGETS, rank=4, alpha=4)
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler)
    pairs = find_lora_pairs(model)
    layers = D.lora_layers(model)
    assert len(pairs) == len(layers) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {p.a_name for p in pairs} | {p.b_name for p in pairs}
    conv = [p for p in pairs if p.A.dim() == 4]
    assert conv and all(p.A.shape[2:] == (1, 1) and p.B.shape[2:] == (1, 1) for p in conv)
    assert {p.name.split(".")[0] for p in pairs} == {"unet", "text_encoder"}
    assert any(".proj_in" in p.name for p in conv) and any(".proj_out" in p.name for p in conv)
    assert sum(p.name.startswith("text_encoder.") for p in pairs) == 4 * sd.text_encoder.config.num_hidden_layers
    with pytest.raises(ValueError, match="match no module"):
        D.add_lora(sd.vae, ["to_nothing"], rank=2, alpha=2)


def test_optimizer_settings_split_unet_and_text_encoder(sd):
    D.add_lora(sd.unet, UNET_TARGETS, rank=2, alpha=2)
    D.add_lora(sd.text_encoder, TEXT_TARGETS, rank=2, alpha=2)
    D.add_concept_tokens(sd.tokenizer, sd.text_encoder, ["<s1>"])
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler)
    optim = {"name": "scaled_adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    name, hparams, overrides = D.optimizer_settings(optim, 1e-4, 1e-2, 0.0, 1e6, embedding_lr=1e-3,
                                                    text_encoder=sd.text_encoder)
    assert (name, hparams["lr"], hparams["reg"]) == ("scaled_adamw", 1e-4, 0.0)
    assert overrides["text_encoder"] == {"lr": 1e-2, "reg": 1e6}
    opt = build_optimizer(model, name, group_overrides=overrides, **hparams)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 1e-3, 1e-2]
    name, hparams, overrides = D.optimizer_settings({"name": "adamw"}, 1e-4, 1e-2, 0.0, 1e6)
    assert "reg" not in hparams and "reg" not in overrides["text_encoder"]


def _factors(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def test_fuse_lora_applies_the_scale(sd):
    D.add_lora(sd.unet, UNET_TARGETS, rank=2, alpha=4)  # scaling alpha / r = 2
    torch.manual_seed(0)
    layers = D.lora_layers(sd.unet)
    before = {}
    for layer in layers:
        torch.nn.init.normal_(_factors(layer)[1])  # B starts at zero; give it a value
        before[layer] = layer.get_base_layer().weight.detach().clone()
    delta_norm = D.lora_delta_norm(sd.unet)
    assert delta_norm > 0
    assert D.fuse_lora(sd.unet, 0.7) == len(layers)
    for layer in layers:
        A, B = _factors(layer)
        product = B.flatten(1) @ A.flatten(1)  # conv 1x1 factors seen as matrices
        expected = before[layer] + 0.7 * 2.0 * product.view_as(before[layer])
        torch.testing.assert_close(layer.get_base_layer().weight, expected)
    assert layers[0].merged
    with pytest.raises(RuntimeError, match="already fused"):
        D.fuse_lora(sd.unet, 0.7)


def test_lora_diffusion_model_loss_and_layerwise_input_ids(sd):
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler, noise_offset=0.01)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = D.tokenize(sd.tokenizer, ["a vase", "a chair"])
    loss = model(pixels, ids)
    assert loss.dim() == 0 and torch.isfinite(loss)
    layered = torch.stack([ids, ids], dim=1)  # (B, L=2, T)
    assert model.encode_text(layered).shape == (2, 2, 77, sd.text_encoder.config.hidden_size)


# ------------------------------------------------------------------------------------------------ sampling + metrics
def test_generate_is_seeded_per_image(sd):
    cond = sd.text_encoder(D.tokenize(sd.tokenizer, ["a blue vase"]))[0]
    uncond = sd.text_encoder(D.tokenize(sd.tokenizer, [""]))[0]
    sampler = D.make_sampler("euler_ancestral", sd.noise_scheduler)
    run = lambda seeds, batch: D.generate(sd.unet, sd.vae, sampler, cond, uncond, seeds, 16, steps=2,  # noqa: E731
                                         guidance_scale=7.0, batch_size=batch)
    a, b = run([3, 5], 2), run([5], 1)
    assert a.shape == (2, 3, 32, 32)
    torch.testing.assert_close(a[1], b[0])  # an image depends on its seed only
    assert not torch.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="unknown sampler"):
        D.make_sampler("plms", sd.noise_scheduler)


def test_black_image_mask_on_synthetic_images():
    images = torch.stack([
        torch.zeros(3, 8, 8),                       # black
        torch.full((3, 8, 8), float("nan")),        # NaN -> rendered black
        torch.full((3, 8, 8), 0.5),                 # grey
        torch.full((3, 8, 8), 0.04),                # darker than the threshold
        torch.full((3, 8, 8), 0.06),                # dark but above it
        torch.ones(3, 8, 8).index_put_((torch.tensor([0]),), torch.tensor(float("inf"))),  # one inf channel
    ])
    assert D.black_image_mask(images, threshold=0.05).tolist() == [True, True, False, True, False, True]
    assert D.black_image_mask(images, threshold=0.01).tolist() == [True, True, False, False, False, True]
    with pytest.raises(ValueError, match="N, C, H, W"):
        D.black_image_mask(torch.zeros(3, 8, 8))
    pil = D.to_pil(images[:2])
    assert pil[1].getextrema() == ((0, 0), (0, 0), (0, 0))


def test_strip_roundtrip_and_figure(tmp_path):
    images = D.to_pil(torch.rand(3, 3, 16, 16))
    path = D.save_strip(images, tmp_path / "samples" / "run.png")
    back = D.load_strip(path)
    assert len(back) == 3 and back[0].size == (16, 16)
    results = tmp_path / "results"
    for optimizer, lr, black in [("adamw", 1e-2, 3), ("scaled_adamw", 1e-2, 0), ("adamw", 1e-3, 1)]:
        rec = RunRecorder(results, "fig_test", optimizer, {"lr": lr}, seed=0, tags={"text_lr": lr})
        D.save_strip(images, results / "fig_test" / "samples" / f"{rec.record.run_name}.png")
        rec.finish({"black_count": black, "num_images": 3, "black_share": black / 3})
    records = load_records(results, "fig_test")
    out = D.black_share_figure(records, results / "fig_test" / "samples", lambda r: r.hparams["lr"],
                               lambda v: f"lr {v:g}", tmp_path / "fig.png", "test figure")
    figure = Image.open(out)
    assert figure.size[0] > 2 * 4 * 64 and figure.size[1] > 2 * 64
    with pytest.raises(ValueError, match="no run records"):
        D.black_share_figure([], tmp_path, lambda r: 0, str, tmp_path / "x.png", "empty")


def test_clip_similarity_with_a_local_tiny_clip(tmp_path, gpt2_dir):
    tok = D.build_tiny_tokenizer(gpt2_dir, num_words=100)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(tmp_path / "clip")
    images = D.to_pil(torch.rand(2, 3, 32, 32))
    scores = D.clip_similarity(tmp_path / "clip", images, ["a blue vase"] * 2, references=images)
    assert set(scores) == {"clip_text", "clip_image"}
    assert all(-1.0 <= v <= 1.0 for v in scores.values())
    assert math.isclose(D.clip_similarity(tmp_path / "clip", images[:1], ["x"], images[:1])["clip_image"], 1.0,
                        rel_tol=1e-4)
