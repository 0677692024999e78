"""The layering: ``core`` is the method alone (torch and the standard library), usable without any model library;
``harness`` sits above it and registers the config resolvers once."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import REPO_ROOT

CORE = REPO_ROOT / "core"
EXPERIMENT_FOLDERS = ("GPT-2", "Mistral-7B", "Mix-of-Show", "Object_Generation", "main_figures", "benchmarks")
MODEL_LIBRARIES = ("transformers", "peft", "diffusers", "hydra", "omegaconf", "accelerate")


def experiment_module_names() -> set[str]:
    """Top-level names an experiment's code is imported by: its folder's modules and the folder itself."""
    names = {folder.replace("-", "_") for folder in EXPERIMENT_FOLDERS} | set(EXPERIMENT_FOLDERS)
    return names | {p.stem for folder in EXPERIMENT_FOLDERS for p in (REPO_ROOT / folder).glob("*.py")}


def foreign_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every import in ``source`` (at any depth, inside functions too) of something other than torch, the standard
    library or ``core`` itself, as ``"<file>:<line>: <module>"``."""
    allowed = set(sys.stdlib_module_names) | {"torch", "core", "__future__"}
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside core
                continue
            modules = [node.module]
        else:
            continue
        found += [f"{filename}:{node.lineno}: {m}" for m in modules if m.split(".")[0] not in allowed]
    return found


def test_the_import_checker_sees_imports_at_any_depth():
    source = textwrap.dedent(
        """
        import math, torch.nn
        from . import pairing
        from core.pairing import find_lora_pairs
        def build():
            import harness
            from transformers import AutoModel
            class Inner:
                def f(self):
                    from e2e_data import load_splits
        """
    )
    assert [f.split(": ")[1] for f in foreign_imports(source)] == ["harness", "transformers", "e2e_data"]


def test_core_imports_only_torch_and_the_standard_library():
    files = sorted(CORE.glob("*.py"))
    assert CORE / "__init__.py" in files and len(files) >= 5
    found = [f for path in files for f in foreign_imports(path.read_text(encoding="utf-8"), path.name)]
    assert not found, "core must import only torch and the standard library:\n" + "\n".join(found)
    clashes = experiment_module_names() & set(sys.stdlib_module_names)
    assert not clashes, f"experiment modules named like standard-library modules hide core imports: {clashes}"


def run_python(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that imports this checkout's packages."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


TRAIN_WITHOUT_MODEL_LIBRARIES = """
import sys

BLOCKED = {blocked!r}


class BlockModelLibraries:
    "An import finder that makes the model libraries unimportable."

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None


assert not BLOCKED & set(sys.modules), BLOCKED & set(sys.modules)
sys.meta_path.insert(0, BlockModelLibraries())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(f"{{name}} is still importable")

import torch
from torch import nn

import core

assert core.__file__.startswith({repo!r}), core.__file__
torch.manual_seed(0)
torch.set_num_threads(1)


class LoraLinear(nn.Module):
    "loralib's Linear: a frozen weight and the factors lora_A (r x n), lora_B (m x r) as parameters."

    def __init__(self, n, m, r):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n) / n**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, n) / n**0.5)
        self.lora_B = nn.Parameter(torch.randn(m, r) * 0.1)

    def forward(self, x):
        return x @ (self.weight + self.lora_B @ self.lora_A).T


class MergedLoraLinear(nn.Module):
    "loralib's MergedLinear: one fused (q, k, v) projection, LoRA blocks on the slices enable_lora marks."

    def __init__(self, n, r, enable_lora=(True, False, True)):
        super().__init__()
        self.n, self.r, self.enable_lora = n, r, list(enable_lora)
        k = sum(self.enable_lora)
        self.weight = nn.Parameter(torch.randn(3 * n, n) / n**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(k * r, n) / n**0.5)
        self.lora_B = nn.Parameter(torch.randn(k * n, r) * 0.1)

    def forward(self, x):
        blocks, i = [], 0
        for enabled in self.enable_lora:
            if enabled:
                a, b = self.lora_A[i * self.r:(i + 1) * self.r], self.lora_B[i * self.n:(i + 1) * self.n]
                blocks.append(b @ a)
                i += 1
            else:
                blocks.append(self.weight.new_zeros(self.n, self.n))
        return x @ (self.weight + torch.cat(blocks)).T


class LoralibModel(nn.Module):
    def __init__(self, n=8, r=2):
        super().__init__()
        self.fc = LoraLinear(n, n, r)
        self.attn = MergedLoraLinear(n, r)
        self.head = nn.Linear(3 * n, 1)  # trainable, not LoRA: the plain update

    def forward(self, x):
        return self.head(torch.tanh(self.attn(torch.tanh(self.fc(x)))))


class PeftNamedLinear(nn.Module):
    "PEFT's parameter names (<m>.lora_A.default.weight, <m>.lora_B.default.weight) in plain modules."

    def __init__(self, n, m, r):
        super().__init__()
        self.base_layer = nn.Linear(n, m).requires_grad_(False)
        self.lora_A = nn.ModuleDict({{"default": nn.Linear(n, r, bias=False)}})
        self.lora_B = nn.ModuleDict({{"default": nn.Linear(r, m, bias=False)}})
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftNamedModel(nn.Module):
    def __init__(self, n=8, r=2):
        super().__init__()
        self.q_proj = PeftNamedLinear(n, n, r)
        self.v_proj = PeftNamedLinear(n, 1, r)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


x = torch.randn(64, 8)
y = torch.sin(x.sum(dim=1, keepdim=True))
for make, pairs in ((LoralibModel, {{"fc": 1, "attn": 2}}), (PeftNamedModel, {{"q_proj[default]": 1,
                                                                              "v_proj[default]": 1}})):
    assert {{p.name: p.blocks for p in core.find_lora_pairs(make())}} == pairs
    for name, hparams in (("scaled_adamw", {{"lr": 1e-2, "reg": 1e-6}}), ("scaled_gd", {{"lr": 0.1, "reg": 1e-4}})):
        torch.manual_seed(1)
        model = make()
        optimizer = core.build_optimizer(model, name, **hparams)
        losses = []
        for _ in range(80):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], (make.__name__, name, losses[0], losses[-1])
        print(make.__name__, name, f"{{losses[0]:.4f}} -> {{losses[-1]:.4f}}")
assert not BLOCKED & set(sys.modules)
"""


def test_core_trains_loralib_and_peft_named_models_without_any_model_library(tmp_path):
    script = TRAIN_WITHOUT_MODEL_LIBRARIES.format(blocked=set(MODEL_LIBRARIES), repo=str(REPO_ROOT))
    done = run_python(script, tmp_path)
    assert len(done.stdout.splitlines()) == 4, done.stdout  # two models x two optimizers


def test_import_harness_registers_the_resolvers_once(tmp_path):
    script = f"""
    from omegaconf import OmegaConf

    names = ("repo_root", "data_root", "package_dir")
    assert not any(OmegaConf.has_resolver(n) for n in names)
    registered = []
    register = OmegaConf.register_new_resolver
    OmegaConf.register_new_resolver = lambda name, *args, **kw: (registered.append(name), register(name, *args, **kw))

    import harness
    import harness.resolvers

    harness.register_resolvers()
    harness.resolvers.register_resolvers()
    assert sorted(registered) == sorted(names), registered
    cfg = OmegaConf.create(
        {{"repo": "${{repo_root:}}", "data": "${{data_root:}}/e2e", "pkg": "${{package_dir:harness}}"}})
    assert cfg.repo == {str(REPO_ROOT)!r}, cfg.repo
    assert cfg.data == {str(tmp_path / "data")!r} + "/e2e", cfg.data
    assert cfg.pkg == {str(REPO_ROOT / "harness")!r}, cfg.pkg
    """
    run_python(script, tmp_path, RPLORA_DATA=str(tmp_path / "data"))


def test_a_foreign_resolver_of_the_same_name_is_an_error(tmp_path):
    script = """
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("data_root", lambda: "/somewhere/else")
    try:
        import harness
    except ValueError as err:
        assert "resolver 'data_root' is registered already, not by harness.resolvers" in str(err), err
    else:
        raise AssertionError("import harness kept a foreign data_root resolver")
    """
    run_python(script, tmp_path)


@pytest.mark.parametrize("module", ["harness", "harness.diffusion"])
def test_harness_imports_no_model_library_until_asked(module, tmp_path):
    """``import harness`` stays light (no transformers, PEFT, diffusers, accelerate); ``harness.diffusion`` is
    the part that needs them."""
    script = f"""
    import sys
    import {module}

    loaded = sorted(m for m in {("transformers", "peft", "diffusers", "accelerate")!r} if m in sys.modules)
    print(",".join(loaded))
    """
    loaded = run_python(script, tmp_path).stdout.strip()
    assert loaded == ("" if module == "harness" else "accelerate,diffusers,peft,transformers"), loaded
