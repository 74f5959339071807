"""Parquet rows -> training batches: encoding, padding, and batches cut by length."""

import numpy as np

from trimodal.models.chat import IMAGE_TOKEN_ID
from trimodal.training.collate import Collator, length_batches

CAPTIONS = ["a red circle", "a blue square and a green triangle on a light background", "a big yellow circle",
            "an orange triangle", "a simple drawing of a purple square and a red circle on a plain background",
            "a green square", "a blue circle and a yellow square", "a red triangle on a light background"]


def _rows(n: int = len(CAPTIONS), patches: int = 3, dim: int = 4) -> dict:
    embedding = np.empty(n, dtype=object)
    for i in range(n):
        embedding[i] = np.full((patches, dim), float(i), dtype=np.float32)
    return {"caption": np.array(CAPTIONS[:n], dtype=object), "embedding": embedding}


def _collator(tok) -> Collator:
    return Collator(tok, num_patches=3, image_end_id=3, max_length=64, caption_prompt="Describe the image.")


def test_a_collated_batch_pads_to_its_longest_row_and_keeps_each_rows_image(tiny_lm):
    _, tok = tiny_lm
    examples = _collator(tok).encode(_rows())
    batch = _collator(tok).collate(examples)
    lengths = [len(e.encoded.input_ids) for e in examples]
    assert batch.input_ids.shape == (len(CAPTIONS), max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert (batch.input_ids == IMAGE_TOKEN_ID).sum().item() == 3 * len(CAPTIONS)
    assert batch.image_features[:, 0, 0].tolist() == [float(i) for i in range(len(CAPTIONS))]  # row order kept


def test_length_batches_cut_sorted_rows_drop_the_rest_and_shuffle_batch_order(tiny_lm):
    _, tok = tiny_lm
    examples = _collator(tok).encode(_rows())
    lengths = {id(e): len(e.encoded.input_ids) for e in examples}
    batches = length_batches(examples, 3, np.random.default_rng(0))
    assert [len(b) for b in batches] == [3, 3]  # 8 rows: two batches, the two longest rows dropped
    kept = sorted(lengths[id(e)] for b in batches for e in b)
    assert kept == sorted(lengths.values())[:6]
    spans = sorted((min(lengths[id(e)] for e in b), max(lengths[id(e)] for e in b)) for b in batches)
    assert spans[0][1] <= spans[1][0]  # each batch is a run of the sorted lengths
    orders = {tuple(id(b[0]) for b in length_batches(examples, 2, np.random.default_rng(seed))) for seed in range(8)}
    assert len(orders) > 1  # the batches' order depends on the generator


def test_sorting_by_length_pads_less_than_batches_as_drawn(tiny_lm):
    _, tok = tiny_lm
    collator = _collator(tok)
    examples = collator.encode(_rows())
    drawn = sum(collator.collate(examples[i:i + 2]).input_ids.numel() for i in range(0, 8, 2))
    cut = sum(collator.collate(b).input_ids.numel() for b in length_batches(examples, 2, np.random.default_rng(0)))
    real = sum(len(e.encoded.input_ids) for e in examples)
    assert real <= cut < drawn


def test_too_few_rows_give_no_batch(tiny_lm):
    _, tok = tiny_lm
    assert length_batches(_collator(tok).encode(_rows(2)), 3, np.random.default_rng(0)) == []

