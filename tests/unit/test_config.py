from pathlib import Path

import pytest
import yaml

from trimodal.config import ConfigError, config_from_dict, load_config, preset_names, save_config


def test_every_shipped_preset_parses_and_validates():
    names = preset_names()
    assert {"phi2", "cpu", "test"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_phi2_preset_is_the_seed_recipe():
    cfg = load_config("phi2")
    assert cfg.model.language_model.source.name == "microsoft/phi-2"
    assert cfg.model.language_model.image_end_token_id == 23893
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert cfg.quant.quant_type == "nf4" and cfg.stage1.batch_size == 2 and cfg.stage2.batch_size == 4
    assert cfg.stage1.accelerator_type == "A100-40G"


def test_bad_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.language_model\.dtype: 'fp8' is not one of float32, bfloat16"):
        load_config("cpu", ["model.language_model.dtype=fp8"])
    with pytest.raises(ConfigError, match=r"model\.vision\.source\.kind: 'ftp' is not one of hub, path"):
        load_config("test", {"model.vision.source.kind": "ftp"})
    with pytest.raises(ConfigError, match=r"stage1\.steps: 0 is out of range"):
        load_config("test", ["stage1.steps=0"])
    with pytest.raises(ConfigError, match=r"attn_implementation: 'flash' is not one of sdpa, eager"):
        load_config("cpu", ["model.language_model.attn_implementation=flash"])
    with pytest.raises(ConfigError, match=r"model\.vision\.stage0_pool: 'max' is not one of cls, mean"):
        load_config("cpu", ["model.vision.stage0_pool=max"])
    with pytest.raises(ConfigError, match=r"model\.vision\.stage0_attn: 'flash' is not one of sdpa, eager"):
        load_config("cpu", ["model.vision.stage0_attn=flash"])


def test_wrong_type_and_unknown_field():
    with pytest.raises(ConfigError, match=r"stage2\.batch_size: expected a whole number"):
        load_config("test", ["stage2.batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"stage2\.bogus: unknown field \(allowed: steps, batch_size"):
        load_config("test", ["stage2.bogus=1"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config("test", ["model.vision.fallback_to_random=maybe"])


def test_a_float_written_without_a_dot_is_a_number():
    cfg = load_config("cpu", ["stage2.lr=2e-3", "stage2.lora_lr=2e-4"])  # YAML 1.1 reads both as strings
    assert (cfg.stage2.lr, cfg.stage2.lora_lr) == (2e-3, 2e-4)
    with pytest.raises(ConfigError, match=r"stage2\.lora_lr: expected a number, got 'fast'"):
        load_config("cpu", ["stage2.lora_lr=fast"])
    with pytest.raises(ConfigError, match=r"stage2\.lr: expected a finite number"):
        load_config("cpu", ["stage2.lr=inf"])
    with pytest.raises(ConfigError, match=r"stage2\.batch_size: expected a number, got '8e0'"):
        load_config("cpu", ["stage2.batch_size=8e0"])


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="'nope' is not one of cpu, phi2, test"):
        load_config("nope")


def test_overrides_and_load_by_path_round_trip(tmp_path: Path):
    cfg = load_config("cpu", ["stage1.steps=7", "serving.port=9001"])
    assert cfg.stage1.steps == 7 and cfg.serving.port == 9001
    path = tmp_path / "mine.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import trimodal.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name != "ConfigError"]:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert documented, f"{cls.name}.{node.target.id} has no one-line docstring"


def test_engine_per_preset_and_overridable():
    assert load_config("phi2").serving.engine == "vllm"
    assert load_config("phi2").serving.vllm.dtype == "bfloat16"
    assert load_config("cpu").serving.engine == "builtin"
    assert load_config("test").serving.engine == "builtin"
    cfg = load_config("cpu", ["serving.engine=vllm", "serving.vllm.dtype=bfloat16", "serving.vllm.max_loras=3"])
    assert (cfg.serving.engine, cfg.serving.vllm.dtype, cfg.serving.vllm.max_loras) == ("vllm", "bfloat16", 3)


def test_bad_engine_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"serving\.dtype: 'int8' is not one of auto, float32, bfloat16, float16"):
        load_config("cpu", ["serving.dtype=int8"])
    with pytest.raises(ConfigError, match=r"serving\.attn_implementation: 'flash' is not one of sdpa, eager"):
        load_config("cpu", ["serving.attn_implementation=flash"])
    with pytest.raises(ConfigError, match=r"serving\.engine: 'sglang' is not one of builtin, vllm"):
        load_config("cpu", ["serving.engine=sglang"])
    with pytest.raises(ConfigError, match=r"serving\.vllm\.max_loras: 1 is out of range"):
        load_config("cpu", ["serving.vllm.max_loras=1"])
    with pytest.raises(ConfigError, match=r"serving\.vllm\.lora_target_modules: embeddings cannot take LoRA"):
        load_config("cpu", {"serving.vllm.lora_target_modules": ["qkv_proj", "embed_tokens"]})


def test_a_yaml_mistake_is_one_line_naming_the_file_line_and_column(tmp_path):
    from trimodal.config import ConfigError

    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel:\n  vision: {image_size: 224\ndata: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"preset: {path}:4:") and "not valid YAML" in message
    with pytest.raises(ConfigError) as err:
        load_config("test", ["serving.port=[1"])
    assert "\n" not in str(err.value) and str(err.value).startswith("override 'serving.port=[1':1:")


@pytest.mark.parametrize("window", [0, -1])
def test_length_window_must_be_positive(window):
    with pytest.raises(ConfigError, match="length_window"):
        load_config("cpu", [f"stage2.length_window={window}"])
