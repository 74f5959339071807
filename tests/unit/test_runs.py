"""Several runs' LoRA adapters over one base LM (`RunAdapters`): a batch that mixes base rows and rows of two runs
gives every row exactly the greedy ids of its own model decoded alone, and the adapters are a bounded LRU that
never evicts what the batch in hand needs. A run's LM is loaded in serving's dtype and attention kernel, with its
adapter merged or apart."""

import dataclasses
from pathlib import Path

import pytest
import torch

from trimodal.inference.generation import decode_steps
from trimodal.inference.requests import RunBundle, SamplingParams
from trimodal.models.chat import Turn
import trimodal.runs
from trimodal.runs import BASE_ADAPTER, RunAdapters, inference_dtype, load_text_generator, read_run

QUESTIONS = ["hello", "What color is the square?", "a b c", "count the shapes"]


def run_bundle(final: Path, name: str) -> RunBundle:
    return RunBundle(name, str(final), str(final / "adapter"), (final / "run.json").stat().st_mtime_ns)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_run):
    root = tmp_path_factory.mktemp("runs")
    return [run_bundle(make_run(root, name, seed), name) for name, seed in (("one", 1), ("two", 2), ("three", 3))]


def _generator(cfg, max_loaded: int = 4):
    generator = load_text_generator(cfg, read_run(None))
    return generator, RunAdapters(generator, max_loaded)


def _greedy_ids(generator, adapters: RunAdapters, questions: list[str], runs: list) -> list[list[int]]:
    """Each row's greedy token ids (24 new tokens at most) from one decoding batch."""
    embeds = [generator.embed(_prompt(generator, q)) for q in questions]
    names = adapters.names(runs)
    params = [SamplingParams(max_tokens=24)] * len(questions)
    ids: list[list[int]] = [[] for _ in questions]
    for step in decode_steps(generator.lm, embeds, params, generator.eos_ids, None, names):
        for row, token in step.tokens:
            ids[row].append(token)
    return ids


def _prompt(generator, question: str):
    from trimodal.inference.engine import tokenize_prompt

    return tokenize_prompt(generator, [Turn("user", question)], None)


def test_a_mixed_batch_gives_each_row_exactly_its_own_models_greedy_ids(test_cfg, runs):
    one, two, _ = runs
    generator, adapters = _generator(test_cfg)
    plain = [_greedy_ids(generator, adapters, [q], [None])[0] for q in QUESTIONS]  # no adapter ever loaded
    order = [None, one, two, one]  # base row first: a base row given an adapter would differ
    alone = [_greedy_ids(generator, adapters, [q], [run])[0] for q, run in zip(QUESTIONS, order)]
    mixed = _greedy_ids(generator, adapters, QUESTIONS, order)
    assert mixed == alone
    assert alone[0] == plain[0]  # base rows through the peft model are the plain LM's
    assert [alone[1], alone[2]] != [plain[1], plain[2]] and alone[1] != _greedy_ids(
        generator, adapters, [QUESTIONS[1]], [two])[0]  # the control: each run answers differently


def test_adapters_are_a_bounded_lru_that_keeps_what_the_batch_needs(test_cfg, runs):
    one, two, three = runs
    generator, adapters = _generator(test_cfg, max_loaded=2)
    assert adapters.names([None]) is None  # nothing loaded: the plain LM, no adapter_names
    first = adapters.names([one, None])
    assert first[1] == BASE_ADAPTER and len(adapters.loaded) == 1
    adapters.names([two])
    adapters.names([one])  # one is now the most recently used
    adapters.names([three])  # evicts two, the least recently used
    assert [adapters.key(r) in adapters.loaded for r in runs] == [True, False, True] and adapters.evictions == 1
    names = adapters.names([one, two, three])  # a batch needing three keeps all three while it runs
    assert len(set(names)) == 3 and len(adapters.loaded) == 3
    assert set(generator.lm.peft_config) == set(adapters.loaded.values())  # evicted adapters are deleted
    adapters.names([three])
    assert len(adapters.loaded) == 2 and set(generator.lm.peft_config) == set(adapters.loaded.values())


def test_a_run_finished_again_in_place_is_loaded_afresh(test_cfg, runs, tmp_path, make_run):
    import os

    final = make_run(tmp_path, "again", 5)
    before = run_bundle(final, "again")
    os.utime(final / "run.json", ns=(before.version + 10**9, before.version + 10**9))
    after = run_bundle(final, "again")
    generator, adapters = _generator(test_cfg)
    assert adapters.names([before]) != adapters.names([after]) and adapters.loads == 2


@pytest.mark.parametrize("saved, normalised, asked", [(0, True, 49), (49, True, 0), (49, True, 49), (49, False, 49)])
def test_a_runs_projector_keeps_the_position_layout_it_was_trained_with(tmp_path, saved, normalised, asked):
    """Whether a trained projector has position embeddings, and normalises the features before them, follows its
    file, not the serving preset; a fresh one follows what it is asked."""
    import torch
    from safetensors.torch import save_file

    from trimodal.models.projector import build_projector
    from trimodal.runs import RunInfo, load_projector

    trained = build_projector(8, 16, seed=1, positions=saved, feature_norm=normalised)
    if saved:
        with torch.no_grad():
            trained.position.normal_()
    save_file(trained.state_dict(), str(tmp_path / "projector.safetensors"))
    loaded, was_trained = load_projector(RunInfo(tmp_path, None, False), 8, 16, positions=asked)
    assert was_trained and loaded.positions == saved
    assert set(loaded.state_dict()) == set(trained.state_dict())
    x = torch.randn(1, 49, 8)
    assert torch.equal(loaded(x), trained(x))
    fresh, was_trained = load_projector(RunInfo(None, None, False), 8, 16, positions=asked)
    assert not was_trained and fresh.positions == asked


def test_a_projector_file_whose_positions_fill_no_square_grid_is_refused_as_not_fitting(tmp_path):
    """A file whose position embeddings cannot be a patch grid (50 rows) is a RunLoadError that names the file, as
    any other projector of the wrong shapes is, not a bare ValueError."""
    import torch
    from safetensors.torch import save_file

    from trimodal.models.projector import build_projector
    from trimodal.runs import RunInfo, RunLoadError, load_projector

    weights = build_projector(8, 16, seed=1, positions=49).state_dict()
    weights["position"] = torch.cat([weights["position"], weights["position"][:1]])  # [49, 8] -> [50, 8]
    save_file(weights, str(tmp_path / "projector.safetensors"))
    with pytest.raises(RunLoadError, match="projector.safetensors does not fit this model"):
        load_projector(RunInfo(tmp_path, None, False), 8, 16, positions=49)


def _serving(cfg, **changes):
    return dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, **changes))


def _last_logits(generator, question: str) -> torch.Tensor:
    embeds = generator.embed(_prompt(generator, question)).unsqueeze(0)  # [T, H] -> [1, T, H]
    with torch.no_grad():
        return generator.lm(inputs_embeds=embeds).logits[0, -1].float()


def test_a_merged_adapter_answers_like_the_adapter_kept_apart(test_cfg, runs):
    """Evaluation folds the adapter into the weights: no peft wrapper is left, and the logits are the unmerged
    model's (float32, so only rounding differs); the control: they are not the base model's."""
    cfg = _serving(test_cfg, dtype="float32")
    run = read_run(runs[0].directory)
    apart = load_text_generator(cfg, run)
    merged = load_text_generator(cfg, run, merge_adapter=True)
    assert hasattr(apart.lm, "peft_config") and not hasattr(merged.lm, "peft_config")
    base = load_text_generator(cfg, read_run(None))
    for question in QUESTIONS:
        torch.testing.assert_close(_last_logits(merged, question), _last_logits(apart, question), rtol=1e-4,
                                   atol=1e-4)
        assert not torch.allclose(_last_logits(base, question), _last_logits(apart, question), atol=1e-2)


@pytest.mark.parametrize("merge", [False, True])
def test_a_run_is_served_in_servings_dtype_and_attention_kernel_whatever_training_used(test_cfg, runs, merge):
    """serving.dtype and serving.attn_implementation decide the inference LM, adapter included; training's eager
    attention does not carry over, and the bfloat16 model answers."""
    lm_cfg = dataclasses.replace(test_cfg.model.language_model, attn_implementation="eager")
    cfg = dataclasses.replace(test_cfg, model=dataclasses.replace(test_cfg.model, language_model=lm_cfg))
    cfg = _serving(cfg, dtype="bfloat16", attn_implementation="sdpa")
    generator = load_text_generator(cfg, read_run(runs[1].directory), merge_adapter=merge)
    assert {p.dtype for p in generator.lm.parameters()} == {torch.bfloat16}
    assert generator.lm.config._attn_implementation == "sdpa"
    params = [SamplingParams(max_tokens=8)]
    steps = list(decode_steps(generator.lm, [generator.embed(_prompt(generator, QUESTIONS[1]))], params,
                              generator.eos_ids))
    assert steps and steps[0].tokens


@pytest.mark.parametrize("native", [False, True])
def test_auto_inference_dtype_is_bfloat16_only_where_the_device_runs_it_natively(test_cfg, monkeypatch, native):
    monkeypatch.setattr(trimodal.runs, "native_bf16", lambda device: native)
    assert inference_dtype(_serving(test_cfg, dtype="auto"), "cpu") == (torch.bfloat16 if native else torch.float32)
    assert inference_dtype(_serving(test_cfg, dtype="float32"), "cpu") == torch.float32
    lm_cfg = dataclasses.replace(test_cfg.model.language_model, dtype="float16")
    half = dataclasses.replace(test_cfg, model=dataclasses.replace(test_cfg.model, language_model=lm_cfg))
    assert inference_dtype(_serving(half, dtype="auto"), "cuda") == (torch.bfloat16 if native else torch.float16)
