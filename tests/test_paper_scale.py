"""The paper-scale paths at full size where that is cheap (meta device: counts, pairing) and through the same code
at reduced size where it is not (scripts/paper_scale_check.py; the full check is that script, not a test)."""

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import core

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "GPT-2"), str(ROOT / "scripts")]
e2e_data = importlib.import_module("e2e_data")
gpt2_models = importlib.import_module("models")
lora_layers = importlib.import_module("lora_layers")
gpt2_train = importlib.import_module("train")  # GPT-2/train.py: registers the config resolvers
check = importlib.import_module("paper_scale_check")


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "Mistral-7B" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mistral_train = _load("mistral_train_scale", "train.py")


def gpt2_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "GPT-2" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def mistral_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "Mistral-7B" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- GPT-2 medium ---------------------------------------------------------------------------------------------

def test_gpt2_medium_paper_lora_has_393216_trainable_parameters(data_root):
    cfg = gpt2_cfg("model=gpt2_medium_random")
    assert (cfg.lora.r, cfg.train.batch_size, cfg.data.max_length, cfg.decode.num_beams) == (4, 8, 512, 10)
    with torch.device("meta"):  # the full-size model without allocating its 355M weights
        model = gpt2_models.build_config_model(cfg.model)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (24, 1024, 16)
    model = lora_layers.apply_lora(model, cfg.lora)
    assert lora_layers.count_trainable(model) == 393_216 == 24 * 2 * 4 * (1024 + 1024)
    assert check.expected_gpt2_trainable(Path(cfg.model.config_file), 4) == 393_216
    pairs = core.find_lora_pairs(model)
    assert len(pairs) == 24 and {p.blocks for p in pairs} == {2}  # c_attn of each layer: a q and a v block
    assert {(tuple(p.A.shape), tuple(p.B.shape)) for p in pairs} == {((2 * 4, 1024), (2 * 1024, 4))}


def test_gpt2_medium_random_model_and_tokenizer_load_with_a_layer_override(data_root):
    cfg = gpt2_cfg("model=gpt2_medium_random", "model.config={n_layer: 1}")
    model, tokenizer = gpt2_models.load_model(cfg.model)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 1024, 50257)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_e2e_pair_cut_before_its_reference_is_a_clear_error(data_root):
    """Such pairs have no loss term: a batch of them gave a NaN loss, recorded as a divergence."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(data_root / "gpt2-tokenizer")
    dev = e2e_data.read_pairs(data_root / "e2e" / "devset.csv")
    pairs = dev[:7] + [max(dev, key=lambda p: len(p[0]))]  # the longest MR: its prompt alone is over 32 tokens
    assert len(e2e_data.E2EDataset(pairs, tokenizer, 64)) == 8
    with pytest.raises(ValueError, match=r"1 of 8 E2E pairs keep no reference token within max_length=32 .*"
                                         r"raise data.max_length"):
        e2e_data.E2EDataset(pairs, tokenizer, 32)


@pytest.mark.slow
def test_the_gpt2_check_through_train_py_with_one_layer(tmp_path, data_root):
    """The check's gpt2 part (paper config through GPT-2/train.py, hub-layout data, decoding, scoring), 1 layer."""
    lines = list(check.part_gpt2(argparse.Namespace(
        data_root=data_root, workdir=tmp_path, optimizers=["scaled_gd"], threads=1,
        gpt2_override=["model.config={n_layer: 1}", "data.max_length=64", "decode.max_new_tokens=8"])))
    assert len(lines) == 1 and lines[0].startswith("scaled_gd: 16,384 trainable; steps ")
    rec = json.loads((tmp_path / "results" / "gpt2_e2e" / "paper_scale_scaled_gd.json").read_text())
    assert rec["config"]["data"]["root"] is None and rec["config"]["train"]["batch_size"] == 8
    assert rec["config"]["decode"]["num_beams"] == 10 and rec["tags"]["preset"] == "paper_scale_check"
    assert [s["step"] for s in rec["steps"]] == [1, 2, 3] and rec["final_metrics"]["test_mrs"] == 2
    assert rec["final_metrics"]["decode_time_s"] > 0 and rec["final_metrics"]["score_time_s"] > 0
    # the training data: the dev set minus 2 held-out MRs, read through data.hub_path
    hub = tmp_path / "gpt2_e2e_hub" / "default"
    dev = e2e_data.read_pairs(data_root / "e2e" / "devset.csv")
    held = e2e_data.group_by_mr(dev)[0][-2:]
    splits = e2e_data.load_hub_splits(str(hub))
    assert splits["train"] == [p for p in dev if p[0] not in held]
    assert {mr for mr, _ in splits["validation"]} <= set(held) and len(splits["validation"]) == 16


def test_seq512_step_that_cannot_fit_in_memory_stops_before_running(tmp_path):
    with pytest.raises(check.CheckFailed, match="needs about 362 GB on CPU.*--seq512-batch"):
        check.main(["--parts", "gpt2_seq512", "--seq512-batch", "100", "--workdir", str(tmp_path)])


# --- Mistral-7B -----------------------------------------------------------------------------------------------

def test_mistral_7b_meta_model_has_the_paper_trainable_count_and_every_factor_is_paired():
    from transformers import MistralConfig

    cfg = mistral_cfg()  # the paper recipe: rte, scaled_adamw, quantize=true
    model = mistral_train.empty_model(cfg, 2, MistralConfig(**check.MISTRAL_7B))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 7.1e9
    # by hand: r (in + out) per target: q 4096->4096, k and v 4096->1024 (8 kv heads x 128), o 4096->4096,
    # gate 4096->14336; 32 layers; the classifier head 4096 x 2 (no bias) trains too (task_type SEQ_CLS)
    r = 16
    per_layer = r * (4096 + 4096) + 2 * r * (4096 + 1024) + r * (4096 + 4096) + r * (4096 + 14336)
    expected = 32 * per_layer + 4096 * 2
    assert expected == 23_076_864
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert check.mistral_expected_trainable(check.MISTRAL_7B, r, list(cfg.lora.target_modules), 2) == expected
    from omegaconf import OmegaConf

    optimizer = core.build_optimizer(model, "scaled_adamw", **{k: v for k, v in OmegaConf.to_container(
        cfg.optim).items() if k != "name"})
    pairs = core.find_lora_pairs(model)
    assert len(pairs) == 32 * 5
    lora_ids = {id(p) for n, p in trainable.items() if "lora_" in n}
    assert {id(t) for p in pairs for t in (p.A, p.B)} == lora_ids and len(lora_ids) == 2 * 32 * 5
    group_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in group_params} == {id(p) for p in trainable.values()}
    assert sum(len(g["pairs"]) for g in optimizer.param_groups) == 160  # every factor pair is preconditioned


def test_the_4bit_config_composes_with_the_paper_recipe(monkeypatch):
    from transformers import BitsAndBytesConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    cfg = mistral_cfg("task=mrpc", "model.dtype=bfloat16")
    kwargs = mistral_train.model_kwargs(cfg, 2)
    q = kwargs["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig) and q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype, q.bnb_4bit_use_double_quant) == (
        "nf4", torch.bfloat16, False)
    assert kwargs["device_map"] == {"": 0} and kwargs["num_labels"] == 2 and kwargs["dtype"] == torch.bfloat16
    assert BitsAndBytesConfig.from_dict(q.to_dict()).to_dict() == q.to_dict()


def _forbid_loading(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the quantization check")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_quantize_without_bitsandbytes_stops_before_loading_anything(monkeypatch):
    _forbid_loading(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="quantize=true needs bitsandbytes .*is not installed.*quantize=false"):
        mistral_train.train(mistral_cfg())


@pytest.mark.parametrize("use_cpu", [False, True])
def test_quantize_on_cpu_stops_before_loading_anything(monkeypatch, use_cpu):
    _forbid_loading(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = "train.use_cpu=true" if use_cpu else "no CUDA GPU is visible"
    with pytest.raises(RuntimeError, match=f"quantize=true needs a CUDA GPU .*but {reason}; use quantize=false"):
        mistral_train.train(mistral_cfg(f"train.use_cpu={str(use_cpu).lower()}"))


# --- the check script -----------------------------------------------------------------------------------------

def test_check_script_hub_data_and_mistral_parts(tmp_path, capsys, data_root):
    times = check.main(["--parts", "hub_data", "mistral", "--workdir", str(tmp_path)])
    assert set(times) == {"hub_data", "mistral"} and all(t > 0 for t in times.values())
    out = capsys.readouterr().out
    assert "630 test MRs grouped as the scorer groups them" in out and "labels equal" in out
    assert "23,076,864 trainable (= 23,076,864 from the shapes" in out and "pairs all 160 (A, B)" in out
    assert "summary: hub_data " in out


def test_check_script_lists_parts_and_rejects_unknown_ones(capsys):
    assert check.main(["--list"]) == {}
    assert set(capsys.readouterr().out.split()) >= set(check.PARTS)
    with pytest.raises(SystemExit):
        check.main(["--parts", "nope"])
    assert "unknown part(s) or optimizer(s) ['nope']" in capsys.readouterr().err


# --- Stable Diffusion 1.5 (Object_Generation/, Mix-of-Show/) -------------------------------------------------

from harness import diffusion as D  # noqa: E402

sys.path.insert(0, str(ROOT / "Mix-of-Show"))
edlora = importlib.import_module("edlora")


def _sd15_meta(data_root):
    """SD-1.5's UNet, VAE and text encoder from the committed configs, on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return D.load_components(str(check.SD15_CONFIGS), gpt2_dir=data_root / "gpt2-tokenizer", random_init=True)


def test_sd15_configs_build_the_real_architectures(data_root):
    sd = _sd15_meta(data_root)
    # the published sizes of stable-diffusion-v1-5's unet, vae and text_encoder
    assert [sum(p.numel() for p in m.parameters()) for m in (sd.unet, sd.vae, sd.text_encoder)] == [
        859_520_964, 83_653_863, 123_060_480]
    tok = sd.tokenizer  # CLIP's vocabulary size and special ids, built from GPT-2's words
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (
        49408, 49406, 49407, 49407, 77)
    assert len(tok.encode("dog", add_special_tokens=False)) == 1  # Mix-of-Show's class word initialises <V2>
    assert sd.noise_scheduler.config.num_train_timesteps == 1000 and sd.vae.config.scaling_factor == 0.18215


@pytest.mark.parametrize("folder", ["Object_Generation", "Mix-of-Show"])
def test_sd15_paper_lora_placement_and_count_from_the_configuration(data_root, folder):
    """The experiments' own LoRA placement on the full-size UNet and text encoder against the count computed from
    the config files; every LoRA layer's (A, B) is a pair of the experiment's optimizer."""
    cfg = check.diffusion_cfg(folder, [*check.DIFFUSION_OVERRIDES, f"model.pretrained={check.SD15_CONFIGS}"])
    sd = _sd15_meta(data_root)
    D.add_lora(sd.unet, cfg.lora.unet_targets, cfg.lora.rank, cfg.lora.alpha)  # as load_lora_components does
    D.add_lora(sd.text_encoder, cfg.lora.text_targets, cfg.lora.rank, cfg.lora.alpha)
    # by hand: 16 transformers (down 320 x2, 640 x2, 1280 x2; mid 1280; up 1280 x3, 640 x3, 320 x3), each with
    # self-attention q, k, v, out d -> d and cross-attention q, out d -> d, k, v 768 -> d; r = 4
    widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    unet_config, text_config = (json.loads((check.SD15_CONFIGS / part / "config.json").read_text())
                                for part in ("unet", "text_encoder"))
    assert check.unet_transformer_widths(unet_config) == widths
    unet = sum(4 * (6 * 2 * d + 2 * (768 + d)) for d in widths)
    text = 12 * 4 * 4 * (768 + 768)
    assert (unet, text) == (797_184, 294_912)
    assert sum(p.numel() for p in sd.unet.parameters() if p.requires_grad) == unet
    assert sum(p.numel() for p in sd.text_encoder.parameters() if p.requires_grad) == text
    expected = check.expected_diffusion_trainable(cfg)
    assert expected["lora_params"] == unet + text
    assert expected["lora_pairs"] == expected["lora_layers"] == 16 * 8 + 12 * 4
    layers = 16 if folder == "Mix-of-Show" else None
    if layers:
        assert edlora.enable_layerwise_conditioning(sd.unet) == layers
    assert expected["new_tokens"] == (2 * layers if layers else 2)
    assert expected["embedding_params"] == (49408 + expected["new_tokens"]) * 768
    # the shapes the formula lists are the wrapped layers' shapes
    built = sorted((m.in_features, m.out_features) for m in D.lora_layers(sd.unet) + D.lora_layers(sd.text_encoder))
    assert built == sorted(check.unet_lora_shapes(unet_config, list(cfg.lora.unet_targets))
                           + check.text_lora_shapes(text_config, list(cfg.lora.text_targets)))
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler)
    name, hparams, overrides = D.optimizer_settings(
        {k: v for k, v in dict(cfg.optim).items()}, cfg.unet_lr, cfg.text_lr, cfg.unet_reg, cfg.text_reg)
    optimizer = core.build_optimizer(model, name, group_overrides=overrides, **hparams)
    counts = D.trainable_counts(model, optimizer)
    assert counts == {"trainable_params": unet + text, "lora_pairs": 176}  # (no new token rows added here)
    paired = {id(t) for g in optimizer.param_groups for a, b, _ in g["pairs"] for t in (g["params"][a], g["params"][b])}
    assert paired == {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    # plain AdamW preconditions nothing, and the expectation says so
    adamw = check.expected_diffusion_trainable(check.diffusion_cfg(folder, ["optim=adamw"]))
    assert adamw["lora_pairs"] == 0 and adamw["lora_layers"] == 176
    assert D.trainable_counts(model, core.build_optimizer(model, "adamw", lr=1e-4))["lora_pairs"] == 0


def test_sd15_proj_targets_and_unknown_targets():
    unet = json.loads((check.SD15_CONFIGS / "unet" / "config.json").read_text())
    with_proj = check.unet_lora_shapes(unet, ["to_q", "proj_in", "proj_out"])
    # per transformer of width d: to_q of both attentions and proj_in, proj_out, each r (d + d)
    assert len(with_proj) == 16 * 4 and sum(4 * (i + o) for i, o in with_proj) == 4 * 4 * 2 * 12480
    with pytest.raises(check.CheckFailed, match=r"no shape formula for the UNet LoRA targets \['ff.net.2'\]"):
        check.unet_lora_shapes(unet, ["to_q", "ff.net.2"])
    with pytest.raises(check.CheckFailed, match="SD-1.x layout only"):
        check.unet_transformer_widths({**unet, "transformer_layers_per_block": 2})


def test_clip_sized_tokenizer_from_gpt2_words(data_root):
    tok = D.build_tiny_tokenizer(data_root / "gpt2-tokenizer", vocab_size=600)
    assert len(tok) == 600 and (tok.bos_token_id, tok.eos_token_id) == (598, 599)
    assert tok("a dog")["input_ids"][0] == 598 and tok("a dog")["input_ids"][-1] == 599
    assert D.build_tiny_tokenizer(data_root / "gpt2-tokenizer", vocab_size=600).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="give 50253 vocabulary entries, fewer than vocab_size=60000"):
        D.build_tiny_tokenizer(data_root / "gpt2-tokenizer", vocab_size=60000)


def _reduced_sd_configs(folder: Path) -> Path:
    """A reduced SD-1.x-layout model as a folder of config files (what --sd-configs takes)."""
    unet = {"_class_name": "UNet2DConditionModel", **D.tiny_unet_config(32, (32, 64), cross_attention_dim=32)}
    vae = {"_class_name": "AutoencoderKL", **D.tiny_vae_config(64, (16, 32))}
    text = {"model_type": "clip_text_model", **D.tiny_text_encoder_config(10000, 32, 2), "eos_token_id": 2,
            "bos_token_id": 0}
    for part, config in {"unet": unet, "vae": vae, "text_encoder": text}.items():
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        (check.SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return folder


def _diffusion_args(tmp_path, configs, **kw):
    (tmp_path / "work").mkdir(parents=True)
    return argparse.Namespace(workdir=tmp_path / "work", sd_resolution=64, sd_configs=configs, sd_override=[],
                              threads=1, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["sd_custom_diffusion", "mix_of_show"])
def test_the_diffusion_check_through_train_py_on_a_reduced_model(tmp_path, data_root, part):
    """The check's diffusion part (the experiment's train.py, one step, one sampling step, the count check) on a
    reduced model in SD-1.5's layout: 4 transformers, text width 32 in 2 layers, vocabulary 10000."""
    configs = _reduced_sd_configs(tmp_path / "configs")
    lines = check.PARTS[part](_diffusion_args(tmp_path, configs))
    # by hand: widths 32 (down), 64 (mid), 32, 32 (up), cross dim 32: r (6 * 2d + 2 (32 + d)) each; text
    # 2 layers x 4 projections x r (32 + 32); the embedding (10000 + new tokens) x 32
    lora = sum(4 * (12 * d + 2 * (32 + d)) for d in (32, 64, 32, 32)) + 2 * 4 * 4 * 64
    new_tokens = 2 * 4 if part == "mix_of_show" else 2
    trainable = lora + (10000 + new_tokens) * 32
    assert f"{trainable:,} trainable (= {trainable:,} from the configuration" in lines[0]
    assert f"with {new_tokens} new rows" in lines[0] and "pairs all 40 (A, B)" in lines[0]
    assert "denoising step + VAE decode" in lines[1] and "peak memory" in lines[1]
    folder, experiment = check.DIFFUSION_PARTS[part]
    (path,) = (tmp_path / "work" / f"results_{part}" / experiment).glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["config"]["model"]["random_init"] and rec["config"]["data"]["resolution"] == 64
    assert rec["config"]["train"]["steps"] == 1 and rec["config"]["sample"]["steps"] == 1
    assert rec["final_metrics"]["sample_time_s"] > 0 and rec["tags"]["preset"] == "sd15_random"
    # a count other than the configuration's is a failure of the check
    wrong = check.expected_diffusion_trainable
    check_args = _diffusion_args(tmp_path / "again", configs)
    try:
        check.expected_diffusion_trainable = lambda cfg, c: {**wrong(cfg, c), "trainable_params": trainable + 1}
        with pytest.raises(check.CheckFailed, match=f"{trainable:,} trainable_params, expected {trainable + 1:,}"):
            check.PARTS[part](check_args)
    finally:
        check.expected_diffusion_trainable = wrong


def test_sd_step_that_cannot_fit_in_memory_stops_before_running(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "_run_measured", lambda *a, **k: pytest.fail("the step ran"))
    need = check.sd_step_memory_gb("mix_of_show", 2, 4096)
    assert need == pytest.approx(7.6 + 2.1 * 2 * 64)
    with pytest.raises(check.CheckFailed, match=rf"mix_of_show: a step at batch 2 x 4096 x 4096 needs about "
                                                rf"{need:.1f} GB on CPU.*use a smaller --sd-resolution"):
        check.main(["--parts", "mix_of_show", "--sd-resolution", "4096", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit):
        check.main(["--parts", "mix_of_show", "--sd-resolution", "500"])


def test_random_init_preflight_names_what_is_missing(tmp_path, data_root):
    configs = _reduced_sd_configs(tmp_path / "configs")
    (configs / "vae" / "config.json").unlink()
    cfg = check.diffusion_cfg("Object_Generation", ["preset=sd15_random", f"model.pretrained={configs}",
                                                    f"results_dir={tmp_path / 'results'}"])
    with pytest.raises(FileNotFoundError, match="model.pretrained's vae configuration not found"):
        D.runs.preflight(cfg, "object_generation")
    with pytest.raises(FileNotFoundError, match=r"lacks the configuration files \['vae/config.json'\]"):
        D.load_components(str(configs), gpt2_dir=data_root / "gpt2-tokenizer", random_init=True)
    with pytest.raises(ValueError, match="random_init needs pretrained"):
        D.load_components(None, {"resolution": 32}, data_root / "gpt2-tokenizer", random_init=True)
    cfg = check.diffusion_cfg("Object_Generation", ["model.random_init=true", "model.pretrained=null",
                                                    f"results_dir={tmp_path / 'results'}"])
    with pytest.raises(ValueError, match="model.random_init=true needs model.pretrained"):
        D.runs.preflight(cfg, "object_generation")
