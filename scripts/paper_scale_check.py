"""Paper-scale check: the full-size paths of the experiments, run with the real architectures and sizes, random
weights, on whatever machine this is (CPU here), and nothing downloaded. For each part it prints what ran and how
long it took, then a summary.

    bash scripts/paper_scale_check.sh                          # every part (longer than 10 minutes on 2 CPU cores)
    bash scripts/paper_scale_check.sh --parts gpt2 --optimizers sgd   # one part, one optimizer
    bash scripts/paper_scale_check.sh --parts sd_custom_diffusion mix_of_show   # Stable Diffusion 1.5 size
    bash scripts/paper_scale_check.sh --list

Parts:

* ``hub_data``: the hub data paths (E2E from the parquet export of ``e2e_nlg``, GLUE SST-2 from ``nyu-mll/glue``'s
  parquet layout) read from local folders laid out like the hub, built from the shared data; checked equal to the
  local files.
* ``gpt2``: ``GPT-2/train.py`` with the paper configuration (``conf/config.yaml`` defaults: batch 8, max length
  512, LoRA r 4 on q and v of ``c_attn``, beam 10) on GPT-2 medium's architecture with random weights
  (``model=gpt2_medium_random``), 3 optimizer steps with each optimizer, then beam decoding of 2 test MRs and
  the official metrics. The shared data has no E2E train split, so the training data is a hub-layout parquet
  folder (``data.root=null data.hub_path=<folder>``, the paper scripts' code path) holding the E2E dev set as
  train (minus 2 held-out MRs), 16 pairs of the held-out MRs as validation and the official test set.
  Records go to ``<workdir>/results``, never to ``results/``.
* ``gpt2_seq512``: ``GPT-2/runtime.py`` at the full sequence length 512 (``--seq512-batch`` sequences, random
  tokens, scaled AdamW, r 4): time and peak memory of one step. (E2E dev pairs are 66 tokens median, 134 at most;
  ``train.py`` pads a batch to its longest pair, so the ``gpt2`` part's batches are 8 x that, not 8 x 512.)
* ``mistral``: ``Mistral-7B/train.py``'s classifier + LoRA (r 16 on q, k, v, o, gate) on the real Mistral-7B
  configuration, built on the meta device (``train.empty_model``); the trainable-parameter count against the one
  computed from the shapes, ``core.build_optimizer(model, "scaled_adamw")`` pairing every factor, the 4-bit
  quantization config, and ``quantize=true`` stopping before loading where bitsandbytes cannot run.
* ``sd_custom_diffusion`` and ``mix_of_show``: ``Object_Generation/train.py`` (custom diffusion: LoRA r 4 on the
  UNet attention and the CLIP text encoder, new tokens ``<s1><s2>``, batch 1) and ``Mix-of-Show/train.py`` (EDLoRA:
  the same LoRA placement, 2 x 16 layer-wise tokens, batch 2), each with its full-scale defaults on Stable Diffusion
  1.5's architecture with random weights (``preset=sd15_random``: UNet, VAE and text encoder built from the
  configuration files in ``harness/diffusion/configs/stable-diffusion-v1-5``, nothing downloaded), overriding
  only the model and the step counts: one training step (``train.steps=1``) and one denoising step of the
  experiment's sampler plus the VAE decode of one image (``sample.seeds=[0] sample.steps=1``) at 512 x 512
  (``--sd-resolution``). The recorded trainable-parameter count and the LoRA pairs of the optimizer are checked
  against the ones computed from the configuration files alone (rank x (in + out) of every targeted layer, plus
  the token embedding); time and peak memory are measured, and a resolution whose measured memory model
  (``SD_MEMORY_GB``) exceeds the available memory is refused before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "GPT-2"), str(REPO / "Mistral-7B")]

OPTIMIZERS = ("sgd", "scaled_gd", "adamw", "scaled_adamw")

# Mistral-7B-v0.1's config.json (the values that fix the parameter shapes).
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False}

# Peak resident memory of one GPT-2-medium training step at sequence length 512 on CPU (float32, dropout on),
# measured with this check: about 2 GB for the model plus 3.6 GB per sequence.
SEQ512_GB_BASE, SEQ512_GB_PER_SEQUENCE = 2.0, 3.6


class CheckFailed(RuntimeError):
    """A paper-scale check found a result other than the expected one."""


def _env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false"}
    if threads:  # torch's CPU threads in the child processes (read at start-up)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _run(cmd: list[str], log: Path, threads: int | None = None) -> float:
    """Run ``cmd``, its output into ``log``; return the wall time. A failure shows the end of the log."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise CheckFailed(f"{' '.join(cmd[:3])} ... exited with {proc.returncode} (log {log}):\n{tail}")
    return time.perf_counter() - start


def _run_measured(argv: list[str], log: Path, threads: int | None = None) -> tuple[float, float]:
    """Run the script ``argv[0]`` (a path relative to the repository) with its arguments in a fresh process that
    reports its own peak resident memory at the end; return ``(wall time in s, peak memory in GB)``."""
    code = ("import resource, runpy, sys; sys.argv = " + repr(argv) + "; sys.path.insert(0, "
            + repr(str((REPO / argv[0]).parent)) + "); runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    wall = _run([sys.executable, "-c", code], log, threads)
    return wall, int(log.read_text().rsplit("peak_rss_kb", 1)[1].split()[0]) / 1e6


def build_e2e_hub_folder(data_root: Path, folder: Path, holdout_mrs: int = 2, validation_pairs: int = 16) -> Path:
    """The ``gpt2`` part's training data as a hub-layout parquet folder (``<folder>/<split>/0000.parquet``):
    dev pairs as train except the last ``holdout_mrs`` MRs, ``validation_pairs`` pairs of those as validation,
    the official test set with all references."""
    import e2e_data

    dev = e2e_data.read_pairs(data_root / "e2e" / "devset.csv")
    held = set(e2e_data.group_by_mr(dev)[0][-holdout_mrs:])
    splits = {"train": [p for p in dev if p[0] not in held],
              "validation": [p for p in dev if p[0] in held][:validation_pairs],
              "test": e2e_data.read_pairs(data_root / "e2e" / "testset_w_refs.csv")}
    return e2e_data.write_hub_layout(folder, splits)


def part_hub_data(args: argparse.Namespace) -> list[str]:
    """E2E and GLUE SST-2 through the hub loaders, from hub-layout folders built from the shared data."""
    import e2e_data
    import e2e_metrics
    import glue_data
    from omegaconf import OmegaConf

    e2e = args.data_root / "e2e"
    local = {"train": e2e_data.read_pairs(e2e / "valid.txt"), "validation": e2e_data.read_pairs(e2e / "devset.csv"),
             "test": e2e_data.read_pairs(e2e / "testset_w_refs.csv")}
    folder = e2e_data.write_hub_layout(args.workdir / "hub_e2e_nlg" / "default", local)
    cfg = OmegaConf.create({"root": None, "hub_path": str(folder), "train": None, "validation": None, "test": None,
                            "holdout_mrs": 0, "train_examples": None, "validation_examples": None})
    splits = e2e_data.load_splits(cfg)
    if splits != local:
        raise CheckFailed("E2E pairs read through data.hub_path differ from the local files")
    grouped = e2e_data.group_by_mr(splits["test"])
    if grouped != e2e_metrics.read_references(e2e / "testset_w_refs.csv"):
        raise CheckFailed("E2E test references grouped from the hub layout differ from the scorer's grouping")
    sst2 = glue_data.load_glue("sst2", root=args.data_root)
    glue_data.write_hub_layout(args.workdir / "hub_glue", "sst2", {
        s: {"sentence": sst2[s]["text1"], "label": sst2[s]["label"], "idx": list(range(len(sst2[s])))}
        for s in sst2})
    hub = glue_data.load_glue("sst2", hub_path=str(args.workdir / "hub_glue"))
    for s in sst2:
        if hub[s]["text1"] != sst2[s]["text1"] or hub[s]["label"] != sst2[s]["label"]:
            raise CheckFailed(f"SST-2 {s} read through the hub layout differs from the local TSV")
    return [f"E2E hub layout: {', '.join(f'{s} {len(v)} pairs' for s, v in splits.items())}; "
            f"{len(grouped[0])} test MRs grouped as the scorer groups them",
            f"GLUE SST-2 hub layout: {', '.join(f'{s} {len(d)}' for s, d in hub.items())} sentences, labels equal"]


def expected_gpt2_trainable(config_file: Path, r: int, n_layer: int | None = None) -> int:
    """Merged q, v LoRA on c_attn: per layer 2 blocks of r x (n_embd + n_embd)."""
    config = json.loads(config_file.read_text())
    return (n_layer or config["n_layer"]) * 2 * r * (config["n_embd"] + config["n_embd"])


def part_gpt2(args: argparse.Namespace) -> Iterator[str]:
    """GPT-2/train.py at the paper configuration with each optimizer (see the module docstring)."""
    hub = build_e2e_hub_folder(args.data_root, args.workdir / "gpt2_e2e_hub" / "default")
    results = args.workdir / "results"
    config_file = args.data_root / "gpt2-tokenizer" / "gpt2-medium-config.json"
    for name in args.optimizers:
        run_name = f"paper_scale_{name}"
        cmd = [sys.executable, str(REPO / "GPT-2" / "train.py"), f"optim={name}", "model=gpt2_medium_random",
               "data.root=null", f"data.hub_path={hub}", "train.max_steps=3", "data.test_mrs=2",
               f"results_dir={results}", f"run_name={run_name}", "tags.preset=paper_scale_check",
               f"hydra.run.dir={args.workdir / 'hydra' / name}", *args.gpt2_override]
        wall = _run(cmd, args.workdir / f"gpt2_{name}.log", args.threads)
        rec = json.loads((results / "gpt2_e2e" / f"{run_name}.json").read_text())
        final = rec["final_metrics"]
        layers = (rec["config"]["model"]["config"] or {}).get("n_layer")  # set by an override (quick checks)
        expected = expected_gpt2_trainable(config_file, int(rec["config"]["lora"]["r"]), layers)
        if final["trainable_params"] != expected:
            raise CheckFailed(f"gpt2 {name}: {final['trainable_params']:,} trainable parameters, expected {expected:,}")
        if final["steps"] != 3 or "BLEU" not in final or final.get("test_mrs") != 2:
            raise CheckFailed(f"gpt2 {name}: expected 3 steps, 2 decoded and scored test MRs; got {final}")
        steps = ", ".join(f"{s['time_s']:.1f}" for s in rec["steps"])
        yield (f"{name}: {final['trainable_params']:,} trainable; steps {steps} s (median "
               f"{rec['step_time_s']:.1f} s, batch {rec['config']['train']['batch_size']}); beam-"
               f"{rec['config']['decode']['num_beams']} decoding of 2 MRs {final['decode_time_s']:.1f} s; "
               f"scoring {final['score_time_s']:.1f} s; BLEU {final['BLEU']:.4f}; process {wall:.0f} s")


def part_gpt2_seq512(args: argparse.Namespace) -> list[str]:
    """One GPT-2-medium training step at sequence length 512 through GPT-2/runtime.py: time and peak memory."""
    batch = args.seq512_batch
    need = SEQ512_GB_BASE + SEQ512_GB_PER_SEQUENCE * batch
    available = _available_gb()
    if available is not None and need > available:
        raise CheckFailed(f"gpt2_seq512: a step at {batch} x 512 tokens needs about {need:.0f} GB on CPU, "
                          f"{available:.0f} GB are available; use a smaller --seq512-batch")
    results = args.workdir / "results_seq512"
    argv = ["GPT-2/runtime.py", "--batch", str(batch), "--seq", "512", "--steps", "1", "--warmup", "1",
            "--ranks", "4", "--optimizers", "scaled_adamw", "--results-dir", str(results)]
    wall, peak = _run_measured(argv, args.workdir / "gpt2_seq512.log", args.threads)
    (path,) = (results / "gpt2_runtime").glob("*.json")
    rec = json.loads(path.read_text())
    return [f"scaled_adamw r=4, {batch} x 512 tokens: step {rec['step_time_s']:.1f} s after one warm-up step "
            f"(optimizer {rec['final_metrics']['opt_time_s'] * 1e3:.1f} ms), peak memory {peak:.1f} GB; "
            f"process {wall:.0f} s"]


def _available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        return None
    return None


def mistral_expected_trainable(config: dict, r: int, targets: list[str], num_labels: int) -> int:
    """LoRA r x (in + out) for every target projection of every layer, plus the classifier head (no bias)."""
    d, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"q_proj": (d, config["num_attention_heads"] * config["head_dim"]), "k_proj": (d, kv),
              "v_proj": (d, kv), "o_proj": (config["num_attention_heads"] * config["head_dim"], d),
              "gate_proj": (d, config["intermediate_size"]), "up_proj": (d, config["intermediate_size"]),
              "down_proj": (config["intermediate_size"], d)}
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return config["num_hidden_layers"] * per_layer + d * num_labels


def _mistral_train():
    spec = importlib.util.spec_from_file_location("mistral_train", REPO / "Mistral-7B" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_mistral(args: argparse.Namespace) -> list[str]:
    """Mistral-7B's classifier + the paper's LoRA on the meta device; the optimizer; the 4-bit config."""
    import core
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import MistralConfig

    train = _mistral_train()
    lines = []
    with initialize_config_dir(config_dir=str(REPO / "Mistral-7B" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=rte", "optim=scaled_adamw"])
    model = train.empty_model(cfg, 2, MistralConfig(**MISTRAL_7B))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = mistral_expected_trainable(MISTRAL_7B, int(cfg.lora.r), list(cfg.lora.target_modules), 2)
    if trainable != expected:
        raise CheckFailed(f"mistral: {trainable:,} trainable parameters, expected {expected:,} from the shapes")
    optimizer = core.build_optimizer(model, **OmegaConf.to_container(cfg.optim, resolve=True))
    pairs = core.find_lora_pairs(model)
    paired = {id(t) for p in pairs for t in (p.A, p.B)}
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    if len(paired) != len(lora) or len(pairs) != MISTRAL_7B["num_hidden_layers"] * len(cfg.lora.target_modules):
        raise CheckFailed(f"mistral: {len(pairs)} LoRA pairs over {len(lora)} factors")
    in_optimizer = sum(len(g["params"]) for g in optimizer.param_groups)
    if in_optimizer != sum(1 for p in model.parameters() if p.requires_grad):
        raise CheckFailed("mistral: the optimizer does not hold every trainable parameter")
    lines.append(f"Mistral-7B classifier on the meta device: {total / 1e9:.2f}B parameters, {trainable:,} trainable "
                 f"(= {expected:,} from the shapes: LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target_modules)} of "
                 f"{MISTRAL_7B['num_hidden_layers']} layers + the 4096 x 2 head); scaled_adamw pairs all "
                 f"{len(pairs)} (A, B)")
    if importlib.util.find_spec("bitsandbytes") is not None:
        q = train.nf4_config()
        lines.append(f"4-bit config: load_in_4bit={q.load_in_4bit}, {q.bnb_4bit_quant_type}, compute "
                     f"{q.bnb_4bit_compute_dtype}, double quant {q.bnb_4bit_use_double_quant}")
    try:
        train.check_quantize(cfg)
        lines.append("quantize=true can run here (bitsandbytes and a CUDA GPU)")
    except (ImportError, RuntimeError) as err:
        lines.append(f"quantize=true stops before loading anything: {err}")
    return lines


# --- Stable Diffusion 1.5: Object_Generation/ (custom diffusion) and Mix-of-Show/ (EDLoRA) ------------------------

SD15_CONFIGS = REPO / "harness" / "diffusion" / "configs" / "stable-diffusion-v1-5"

# The two diffusion parts: experiment folder and record folder; the overrides of their one-step runs (the model
# source, the step counts; everything else is the experiment's full-scale default).
DIFFUSION_PARTS = {"sd_custom_diffusion": ("Object_Generation", "object_generation"),
                   "mix_of_show": ("Mix-of-Show", "mix_of_show")}
DIFFUSION_OVERRIDES = ["preset=sd15_random", "train.steps=1", "sample.seeds=[0]", "sample.steps=1"]

# Peak resident memory of one training step plus one sampling step on SD-1.5's architecture (float32, CPU, the
# paper's batch: 1 for custom diffusion, 2 for Mix-of-Show), measured with this check at 256 and 512 px:
# (GB for the models, optimizer and text encodings, GB per training image at 512 x 512, growing with the pixels).
# Custom diffusion: 6.1 GB at 256, 8.3 GB at 512; Mix-of-Show (16 layer-wise text encodings per prompt): 8.6, 11.7.
SD_MEMORY_GB = {"sd_custom_diffusion": (5.4, 2.9), "mix_of_show": (7.6, 2.1)}


def sd_step_memory_gb(part: str, batch: int, resolution: int) -> float:
    """The measured memory model above: peak GB of ``part``'s training and sampling step at batch x resolution²."""
    base, per_image = SD_MEMORY_GB[part]
    return base + per_image * batch * (resolution / 512) ** 2


def unet_transformer_widths(config: dict) -> list[int]:
    """The channel width of each transformer (one self- and one cross-attention) of a ``UNet2DConditionModel``
    configuration, in the order down, mid, up blocks: ``layers_per_block`` per cross-attention down block, one in
    the mid block, ``layers_per_block + 1`` per cross-attention up block (the up blocks run the channels in
    reverse). Only the SD-1.x layout is covered; anything else is a ``CheckFailed``."""
    channels, per_block = list(config["block_out_channels"]), config["layers_per_block"]
    unsupported = {k: config[k] for k in ("transformer_layers_per_block", "mid_block_type", "only_cross_attention",
                                          "attention_type", "encoder_hid_dim") if config.get(k) not in (
        None, 1, False, "default", "UNetMidBlock2DCrossAttn")}
    if unsupported or not isinstance(per_block, int):
        raise CheckFailed(f"the UNet shape formula covers the SD-1.x layout only, not {unsupported or per_block}")
    widths = []
    for width, kind in zip(channels, config["down_block_types"]):
        widths += [width] * per_block if kind.startswith("CrossAttn") else []
    widths.append(channels[-1])
    for width, kind in zip(reversed(channels), config["up_block_types"]):
        widths += [width] * (per_block + 1) if kind.startswith("CrossAttn") else []
    return widths


def unet_lora_shapes(config: dict, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every UNet layer that LoRA on ``targets`` wraps, from the configuration alone: per
    transformer of width d, self-attention to_q/to_k/to_v/to_out.0 d -> d; cross-attention to_q, to_out.0 d -> d
    and to_k, to_v cross_attention_dim -> d; proj_in, proj_out d -> d (1x1 convs or linear)."""
    cross = config["cross_attention_dim"]
    formulas = {"to_q": lambda d: [(d, d), (d, d)], "to_k": lambda d: [(d, d), (cross, d)],
                "to_v": lambda d: [(d, d), (cross, d)], "to_out.0": lambda d: [(d, d), (d, d)],
                "proj_in": lambda d: [(d, d)], "proj_out": lambda d: [(d, d)]}
    unknown = sorted(set(targets) - set(formulas))
    if unknown:
        raise CheckFailed(f"no shape formula for the UNet LoRA targets {unknown}; known: {sorted(formulas)}")
    return [shape for d in unet_transformer_widths(config) for t in targets for shape in formulas[t](d)]


def text_lora_shapes(config: dict, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every CLIP text-encoder layer that LoRA on ``targets`` wraps: q/k/v/out_proj hidden -> hidden,
    fc1 hidden -> intermediate, fc2 intermediate -> hidden, in each of the ``num_hidden_layers`` layers."""
    h, inner = config["hidden_size"], config["intermediate_size"]
    formulas = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h), "fc1": (h, inner),
                "fc2": (inner, h)}
    unknown = sorted(set(targets) - set(formulas))
    if unknown:
        raise CheckFailed(f"no shape formula for the text-encoder LoRA targets {unknown}; known: {sorted(formulas)}")
    return [formulas[t] for _ in range(config["num_hidden_layers"]) for t in targets]


def expected_diffusion_trainable(cfg, configs: Path = SD15_CONFIGS) -> dict:
    """What a diffusion run on ``configs``' architecture should train, from the configuration files and the
    experiment config ``cfg`` alone (never from the built model): ``lora_layers`` (the targeted layers),
    ``lora_pairs`` (the pairs the optimizer preconditions: all of them for a scaled optimizer, none for sgd/adamw),
    ``trainable_params`` = rank x (in + out) of each layer plus, when new tokens train, the whole input embedding
    ((vocab_size + new tokens) x hidden; Mix-of-Show: one new token per concept token and cross-attention layer),
    and the ``new_tokens``."""
    unet = json.loads((configs / "unet" / "config.json").read_text())
    text = json.loads((configs / "text_encoder" / "config.json").read_text())
    shapes = (unet_lora_shapes(unet, list(cfg.lora.unet_targets))
              + text_lora_shapes(text, list(cfg.lora.text_targets)))
    if "edlora" in cfg:  # Mix-of-Show: layer-wise tokens, one per cross-attention layer
        new_tokens = len(cfg.data.concept_tokens) * len(unet_transformer_widths(unet))
        train_embedding = bool(cfg.edlora.train_embeddings)
    else:
        new_tokens = len(cfg.data.new_tokens)
        train_embedding = new_tokens > 0
    embedding = (text["vocab_size"] + new_tokens) * text["hidden_size"] if train_embedding else 0
    lora = sum(int(cfg.lora.rank) * (n_in + n_out) for n_in, n_out in shapes)
    return {"lora_layers": len(shapes), "lora_pairs": len(shapes) if cfg.optim.name.startswith("scaled_") else 0,
            "trainable_params": lora + embedding, "lora_params": lora, "embedding_params": embedding,
            "new_tokens": new_tokens}


def diffusion_cfg(folder: str, overrides: list[str]):
    """The experiment's own Hydra config with ``overrides``."""
    from hydra import compose, initialize_config_dir

    import harness  # noqa: F401  (the ${repo_root:} and ${data_root:} resolvers)

    with initialize_config_dir(config_dir=str(REPO / folder / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _diffusion_part(part: str, args: argparse.Namespace) -> list[str]:
    """One training step and one sampling step of ``folder/train.py`` on the architecture of ``args.sd_configs``
    (SD-1.5's by default), then the checks."""
    folder, experiment = DIFFUSION_PARTS[part]
    resolution, configs = args.sd_resolution, Path(args.sd_configs).resolve()
    overrides = [*DIFFUSION_OVERRIDES, f"model.pretrained={configs}", f"data.resolution={resolution}",
                 *args.sd_override]
    cfg = diffusion_cfg(folder, overrides)
    batch = int(cfg.train.batch_size)
    if configs == SD15_CONFIGS.resolve():  # the memory model was measured on SD-1.5
        need, available = sd_step_memory_gb(part, batch, resolution), _available_gb()
        if available is not None and need > available:
            raise CheckFailed(f"{part}: a step at batch {batch} x {resolution} x {resolution} needs about "
                              f"{need:.1f} GB on CPU, {available:.1f} GB are available; use a smaller --sd-resolution")
        model = "SD-1.5 architecture"
    else:
        model = f"architecture of {configs} (no measured memory model: not checked before running)"
    expected = expected_diffusion_trainable(cfg, configs)
    results = args.workdir / f"results_{part}"
    if results.exists():
        raise CheckFailed(f"{part}: {results} exists already; give a new --workdir")
    argv = [f"{folder}/train.py", *overrides, f"results_dir={results}",
            f"hydra.run.dir={args.workdir / 'hydra' / part}"]
    wall, peak = _run_measured(argv, args.workdir / f"{part}.log", args.threads)
    (path,) = (results / experiment).glob("*.json")  # the run's record (its default name)
    rec = json.loads(path.read_text())
    final = rec["final_metrics"]
    for key in ("trainable_params", "lora_pairs"):
        if final[key] != expected[key]:
            raise CheckFailed(f"{part}: {final[key]:,} {key}, expected {expected[key]:,} from the configuration")
    if rec["status"] != "done" or final["steps_done"] != 1 or final["num_images"] != 1:
        raise CheckFailed(f"{part}: expected a finished run of 1 step and 1 image; got {rec['status']}, {final}")
    step = rec["steps"][0]
    return [f"{model} (random weights), {resolution} x {resolution}, batch {batch}, "
            f"{cfg.optim.name}: {final['trainable_params']:,} trainable (= {expected['trainable_params']:,} from the "
            f"configuration: LoRA r {cfg.lora.rank} on {expected['lora_layers']} layers {expected['lora_params']:,} + "
            f"token embedding with {expected['new_tokens']} new rows {expected['embedding_params']:,}); "
            + (f"the optimizer pairs all {final['lora_pairs']} (A, B)" if expected["lora_pairs"] else
               f"{cfg.optim.name} preconditions no pair (0 pairs, as expected)"),
            f"training step {step['time_s']:.1f} s (optimizer {step['opt_time_s'] * 1e3:.0f} ms); one "
            f"{cfg.sample.sampler} denoising step + VAE decode {final['sample_time_s']:.1f} s; loss "
            f"{final['final_loss']:.4f}; peak memory {peak:.1f} GB; process {wall:.0f} s"]


def part_sd_custom_diffusion(args: argparse.Namespace) -> list[str]:
    """Object_Generation/train.py on Stable Diffusion 1.5's architecture: one training step, one sampling step."""
    return _diffusion_part("sd_custom_diffusion", args)


def part_mix_of_show(args: argparse.Namespace) -> list[str]:
    """Mix-of-Show/train.py (EDLoRA) on SD-1.5's architecture: one training step, one sampling step."""
    return _diffusion_part("mix_of_show", args)


PARTS = {"hub_data": part_hub_data, "gpt2": part_gpt2, "gpt2_seq512": part_gpt2_seq512, "mistral": part_mistral,
         "sd_custom_diffusion": part_sd_custom_diffusion, "mix_of_show": part_mix_of_show}


def main(argv: list[str] | None = None) -> dict[str, float]:
    import harness

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help=f"some of {list(PARTS)} (default: all)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), help="optimizers of the gpt2 part")
    parser.add_argument("--seq512-batch", type=int, default=2, help="sequences of the gpt2_seq512 step (paper: 8)")
    parser.add_argument("--gpt2-override", nargs="*", default=[],
                        help="extra Hydra overrides for GPT-2/train.py (e.g. 'model.config={n_layer: 1}')")
    parser.add_argument("--sd-resolution", type=int, default=512,
                        help="image size of the diffusion parts' steps (paper: 512)")
    parser.add_argument("--sd-configs", type=Path, default=SD15_CONFIGS,
                        help="folder of the diffusion model's config files (default: Stable Diffusion 1.5's)")
    parser.add_argument("--sd-override", nargs="*", default=[],
                        help="extra Hydra overrides for the diffusion train.py (e.g. 'optim=adamw')")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the GPT-2 and diffusion processes (OMP_NUM_THREADS; default: "
                             "torch's choice)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--list", action="store_true", help="list the parts and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in PARTS.items():
            print(f"{name:20} {fn.__doc__.splitlines()[0]}")
        return {}
    unknown = sorted(set(args.parts) - set(PARTS)) + sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown part(s) or optimizer(s) {unknown}; parts: {list(PARTS)}, optimizers: {OPTIMIZERS}")
    if args.sd_resolution < 64 or args.sd_resolution % 64:
        parser.error(f"--sd-resolution must be a positive multiple of 64 (VAE 8x, UNet 8x), got {args.sd_resolution}")
    args.data_root = harness.default_data_root()
    if not args.data_root.is_dir():
        parser.error(f"shared data folder {args.data_root} not found (set RPLORA_DATA)")
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="paper_scale_check_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"paper-scale check: {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads), "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; scratch {args.workdir}", flush=True)
    times = {}
    for name in args.parts:
        print(f"== {name}: {PARTS[name].__doc__.splitlines()[0]}", flush=True)
        start = time.perf_counter()
        for line in PARTS[name](args):
            print(f"   {line}", flush=True)
        times[name] = time.perf_counter() - start
        print(f"   {name} took {times[name]:.0f} s", flush=True)
    print("summary: " + ", ".join(f"{n} {t:.0f} s" for n, t in times.items()))
    return times


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as err:
        sys.exit(f"paper-scale check FAILED: {err}")
