"""Security rules that the code must keep (secure defaults): no unpickling of files we load.

1. A source scan (with `ast`, so multi-line and aliased calls count): no `torch.load` without `weights_only=True`
   and no other unpickler (pickle / dill / joblib / pandas.read_pickle / numpy.load(allow_pickle=True)) in the
   shipped code.
2. A pickle planted where a safetensors file is expected is refused without being unpickled, by every loader of
   ours that reads weights: the run's projector, the training checkpoint, the CLIP vision tower, the language
   model, the LoRA adapter and Whisper. The planted payload creates a marker file when unpickled; the marker must
   never appear. A control test proves the payload does create it when unpickled.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("platform", "jobs", "serve_app", "bench", "scripts")

# ---------------------------------------------------------------------------------------------------------------
# 1. Source scan
# ---------------------------------------------------------------------------------------------------------------

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
UNPICKLERS = {f"{mod}.{fn}" for mod in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
              for fn in ("load", "loads", "Unpickler")} | {"joblib.load", "pandas.read_pickle"}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import statement in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(func: ast.expr, names: dict[str, str]) -> str | None:
    """`a.b.c` of a call's function, with the leading name resolved through the imports."""
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(names.get(func.id, func.id))
    return ".".join(reversed(parts))


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: call' for every call that may unpickle."""
    tree = ast.parse(source, filename)
    names = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func, names)
        bad = ((dotted in TORCH_LOADS and not _keyword_is(node, "weights_only", True))
               or dotted in UNPICKLERS
               or (dotted == "numpy.load" and not _keyword_is(node, "allow_pickle", False)
                   and any(k.arg == "allow_pickle" for k in node.keywords)))
        if bad:
            found.append(f"{filename}:{node.lineno}: {dotted}")
    return found


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_the_scanner_catches_what_grep_would_miss():
    src = '''
import torch as T
from torch import load as tload
import pickle, numpy as np
T.load(
    "x.pt",
    map_location="cpu",
)
tload("y.pt", weights_only=False)
torch_ok = T.load("z.pt", weights_only=True)
pickle.loads(b"")
np.load("a.npy", allow_pickle=True)
np.load("b.npy")
'''
    found = unsafe_loads(src)
    assert [f.split(": ")[1] for f in found] == ["torch.load", "torch.load", "pickle.loads", "numpy.load"]
    assert [int(f.split(":")[1]) for f in found] == [5, 9, 11, 12]


def test_no_unpickling_calls_in_the_code():
    files = _python_files()
    assert len(files) > 20, "the scan found too few files: wrong root?"
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "calls that may unpickle (use safetensors, or torch.load(..., weights_only=True)):\n" + \
        "\n".join(found)


# ---------------------------------------------------------------------------------------------------------------
# 2. Planted pickles
# ---------------------------------------------------------------------------------------------------------------


class _Canary:
    """Unpickling this calls `Path(marker).touch()`: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


FORMATS = ("pickle", "torch.save")


def _plant(path: Path, marker: Path, fmt: str) -> None:
    """Write a payload that touches `marker` when unpickled: a bare pickle or a torch.save zip archive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(_Canary(marker), protocol=4))
    else:
        torch.save(_Canary(marker), path)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "UNPICKLED"
    yield path
    assert not path.exists(), "a planted pickle was unpickled"


@pytest.mark.parametrize("fmt", FORMATS)
def test_control_the_payload_is_live(tmp_path, fmt):
    """The canary does run when unpickled, and torch.load(weights_only=True) refuses it."""
    marker, payload = tmp_path / "UNPICKLED", tmp_path / "payload"
    _plant(payload, marker, fmt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(payload, weights_only=True)
    assert not marker.exists()
    if fmt == "pickle":
        pickle.loads(payload.read_bytes())
    else:
        torch.load(payload, weights_only=False)  # the control, on our own payload
    assert marker.exists()


@pytest.fixture(scope="module")
def cfg():
    from trimodal.config import load_config

    return load_config("test")


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_projector_refuses_a_pickle(tmp_path, marker, cfg, fmt):
    from trimodal.runs import load_projector, read_run

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "run.json").write_text(json.dumps({"stage": 1}))
    _plant(final / "projector.safetensors", marker, fmt)
    with pytest.raises(Exception):
        load_projector(read_run(tmp_path / "run"), vision_dim=8, lm_hidden=16)


def _training_checkpoint(directory: Path, cfg):
    """A real checkpoint of a small projector (one Adam step taken), and fresh objects to restore it into."""
    from trimodal.models.projector import build_projector
    from trimodal.training.checkpoint import TrainState, save_training_state

    def fresh():
        model = SimpleNamespace(projector=build_projector(8, 16), lm=torch.nn.Identity())
        opt = torch.optim.Adam(model.projector.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return model, opt, sched

    model, opt, sched = fresh()
    model.projector(torch.randn(2, 3, 8)).sum().backward()
    opt.step()
    sched.step()
    save_training_state(directory, model, opt, sched, TrainState(step=1), cfg)
    return fresh()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("planted", ["projector.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_training_checkpoint_refuses_a_pickle(tmp_path, marker, cfg, planted, fmt):
    from trimodal.training.checkpoint import load_training_state

    ckpt = tmp_path / "checkpoint_000001"
    model, opt, sched = _training_checkpoint(ckpt, cfg)
    load_training_state(ckpt, model, opt, sched)  # the untouched checkpoint loads
    _plant(ckpt / planted, marker, fmt)
    with pytest.raises(Exception):
        load_training_state(ckpt, model, opt, sched)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory, cfg) -> Path:
    from trimodal.models.vision import random_vision_tower

    path = tmp_path_factory.mktemp("tower")
    random_vision_tower(cfg.model.vision).model.save_pretrained(path, safe_serialization=True)
    return path


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_vision_tower_refuses_a_pickle(tmp_path, marker, cfg, tower_dir, weights, fmt):
    from trimodal.models.vision import load_vision_tower

    load_vision_tower(cfg.model.vision, tower_dir)  # the genuine directory loads
    planted = _copy_without_weights(tower_dir, tmp_path / "tower")
    _plant(planted / weights, marker, fmt)
    with pytest.raises(Exception):
        load_vision_tower(cfg.model.vision, planted)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, cfg) -> Path:
    from trimodal.models.language import build_random_lm, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("lm")
    tokenizer = build_tiny_tokenizer()
    build_random_lm(cfg.model.language_model.random_shape, len(tokenizer)).save_pretrained(
        path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _lm_config(cfg, path: Path):
    from trimodal.config import ModelSource

    return dataclasses.replace(cfg.model.language_model, source=ModelSource(kind="path", name=str(path)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_language_model_refuses_a_pickle(tmp_path, marker, cfg, lm_dir, weights, fmt):
    from trimodal.models.language import load_language_model

    load_language_model(_lm_config(cfg, lm_dir))  # the genuine directory loads
    planted = _copy_without_weights(lm_dir, tmp_path / "lm")
    _plant(planted / weights, marker, fmt)
    with pytest.raises(Exception):
        load_language_model(_lm_config(cfg, planted))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, cfg, lm_dir) -> tuple[Path, object]:
    """A finished run whose final/ holds a genuine LoRA adapter for the LM in `lm_dir`."""
    from peft import LoraConfig, get_peft_model

    from trimodal.models.language import load_language_model

    run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 language_model=_lm_config(cfg, lm_dir)))
    lm, _ = load_language_model(run_cfg.model.language_model)
    final = tmp_path_factory.mktemp("adapter_run") / "final"
    get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        final / "adapter")
    (final / "run.json").write_text(json.dumps({"stage": 2}))
    return final, run_cfg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_lora_adapter_refuses_a_pickle(tmp_path, marker, adapter_run, weights, fmt):
    from trimodal.runs import load_lm_for_run, read_run

    final, run_cfg = adapter_run
    load_lm_for_run(run_cfg, read_run(final))  # the genuine adapter loads
    planted = tmp_path / "final"
    shutil.copytree(final, planted, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    _plant(planted / "adapter" / weights, marker, fmt)
    with pytest.raises(Exception):
        load_lm_for_run(run_cfg, read_run(planted))


@pytest.mark.parametrize("fmt", FORMATS)
def test_whisper_refuses_a_pickle(tmp_path, marker, fmt):
    from trimodal.models.speech import build_random_whisper, load_whisper_from_dir

    directory = tmp_path / "whisper"
    directory.mkdir()
    (directory / "dims.json").write_text(json.dumps(dataclasses.asdict(build_random_whisper().dims)))
    _plant(directory / "model.safetensors", marker, fmt)
    with pytest.raises(Exception):
        load_whisper_from_dir(directory)
