"""Caption metrics: tokenizer, corpus BLEU-1..4 (hand-computed and against nltk) and CIDEr-D."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from trimodal.evaluation.caption_metrics import cider_d, corpus_bleu, tokenize

# ----------------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man's dog, running.", ["a", "man", "'s", "dog", "running"]),
        ("Don't STOP; it won't!", ["do", "n't", "stop", "it", "wo", "n't"]),
        ('He said "hi" (loudly)?', ["he", "said", "hi", "loudly"]),
        ("3.5 kg, 1,000 people...", ["3.5", "kg", "1,000", "people"]),
        ("a black-and-white photo -- of a dog - ok", ["a", "black-and-white", "photo", "of", "a", "dog", "ok"]),
        ("the dogs' \u2018toys\u2019 it\u2019s", ["the", "dogs", "toys", "it", "'s"]),
        ("  \t\n ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


# --------------------------------------------------------------------------------------- BLEU


def _bleu_list(scores: dict[str, float]) -> list[float]:
    return [scores[f"BLEU-{k}"] for k in range(1, 5)]


@pytest.mark.parametrize("coco_epsilon", [True, False])
def test_bleu_identical_is_one(coco_epsilon: bool) -> None:
    caps = {"a": "A man rides a horse on the beach.", "b": "Two dogs play with a red ball."}
    refs = {k: [v, "something else entirely here"] for k, v in caps.items()}
    scores = corpus_bleu(caps, refs, coco_epsilon=coco_epsilon)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    # coco-caption's epsilons: p = (c + 1e-15) / (c + 1e-9) and BP at c == r are 1 - O(1e-9).
    assert _bleu_list(scores) == pytest.approx([1.0] * 4, abs=1e-9)
    if not coco_epsilon:
        assert _bleu_list(scores) == [1.0] * 4


def test_bleu_hand_computed_corpus() -> None:
    # Image 1: hyp "a cat sat on the mat" (c=6), ref "a cat sat on the red mat" (r=7)
    #   1-grams 6/6; 2-grams: a cat, cat sat, sat on, on the match, "the mat" does not -> 4/5
    #   3-grams: a cat sat, cat sat on, sat on the match, "on the mat" does not -> 3/4
    #   4-grams: a cat sat on, cat sat on the match, "sat on the mat" does not -> 2/3
    # Image 2: hyp "the dog runs fast" (c=4), refs "a dog runs" (3), "the dog runs very fast today" (6)
    #   closest ref length to 4 is 3 (|3-4|=1 < |6-4|=2)
    #   1-grams: the, dog, runs, fast all occur in some ref -> 4/4
    #   2-grams: the dog, dog runs match; "runs fast" does not -> 2/3
    #   3-grams: "the dog runs" matches; "dog runs fast" does not -> 1/2;  4-grams: 0/1
    # Corpus sums: p1 = 10/10, p2 = 6/8, p3 = 4/6, p4 = 2/4; c = 6 + 4 = 10, r = 7 + 3 = 10 -> BP = 1
    #   BLEU-1 = 1
    #   BLEU-2 = (1 * 3/4) ** (1/2)               = 0.8660254
    #   BLEU-3 = (1 * 3/4 * 2/3) ** (1/3) = 0.5 ** (1/3) = 0.7937005
    #   BLEU-4 = (1/2 * 1/2) ** (1/4)     = 2 ** -0.5    = 0.7071068
    hyps = {1: "a cat sat on the mat", 2: "the dog runs fast"}
    refs = {1: ["a cat sat on the red mat"], 2: ["a dog runs", "the dog runs very fast today"]}
    expected = [1.0, math.sqrt(3 / 4), 0.5 ** (1 / 3), 2**-0.5]
    assert _bleu_list(corpus_bleu(hyps, refs, coco_epsilon=False)) == pytest.approx(expected, rel=1e-12)
    assert _bleu_list(corpus_bleu(hyps, refs)) == pytest.approx(expected, abs=1e-9)


def test_bleu_brevity_penalty() -> None:
    # Image 1 alone: c=6 < r=7 -> BP = exp(1 - 7/6) = exp(-1/6) = 0.8464817; precisions as above:
    #   BLEU-1 = BP, BLEU-2 = BP * (4/5) ** (1/2), BLEU-3 = BP * (3/5) ** (1/3), BLEU-4 = BP * (2/5) ** (1/4)
    scores = corpus_bleu({0: "a cat sat on the mat"}, {0: ["a cat sat on the red mat"]}, coco_epsilon=False)
    bp = math.exp(-1 / 6)
    assert _bleu_list(scores) == pytest.approx([bp, bp * 0.8**0.5, bp * 0.6 ** (1 / 3), bp * 0.4**0.25], rel=1e-12)


def test_bleu_closest_reference_length() -> None:
    # hyp length 4; refs of length 5 and 9 -> closest is 5: BP = exp(1 - 5/4), all n-grams match.
    refs = {0: ["w x y z q", "w x y z q r s t u"]}
    scores = corpus_bleu({0: "w x y z"}, refs, coco_epsilon=False)
    assert _bleu_list(scores) == pytest.approx([math.exp(1 - 5 / 4)] * 4, rel=1e-12)
    # hyp length 6 between refs of 5 and 7: a tie, coco-caption and nltk take the shorter -> BP = 1
    refs = {0: ["w x y z q", "w x y z q r s"]}
    assert corpus_bleu({0: "w x y z q r"}, refs, coco_epsilon=False)["BLEU-1"] == 1.0


def test_bleu_papineni_clipping_and_coco_epsilon() -> None:
    # Papineni et al. 2002: "the" x7 against two references; "the" is clipped to its max ref count 2.
    hyps = {0: "the the the the the the the"}
    refs = {0: ["the cat is on the mat", "there is a cat on the mat"]}
    exact = corpus_bleu(hyps, refs, coco_epsilon=False)
    # p1 = 2/7, c = 7 = closest r -> BP = 1; no bigram matches -> BLEU-2..4 = 0
    assert _bleu_list(exact) == pytest.approx([2 / 7, 0.0, 0.0, 0.0], abs=1e-15)
    # coco-caption keeps a 1e-15 numerator: BLEU-2 = sqrt(2/7 * 1e-15/6), tiny but non-zero
    coco = corpus_bleu(hyps, refs)
    assert coco["BLEU-1"] == pytest.approx(2 / 7, rel=1e-9)
    assert coco["BLEU-2"] == pytest.approx(math.sqrt(2 / 7 * 1e-15 / 6), rel=1e-6)


@pytest.mark.parametrize("coco_epsilon", [True, False])
def test_bleu_empty_hypothesis(coco_epsilon: bool) -> None:
    refs = {0: ["a dog runs"], 1: ["a cat sleeps on a sofa"]}
    assert _bleu_list(corpus_bleu({0: "", 1: "..."}, refs, coco_epsilon=coco_epsilon)) == [0.0] * 4
    # one empty hypothesis among others scores, without crashing
    mixed = corpus_bleu({0: "", 1: "a cat sleeps on a sofa"}, refs, coco_epsilon=coco_epsilon)
    assert 0.0 < mixed["BLEU-4"] < 1.0


def test_bleu_validates_layout() -> None:
    with pytest.raises(ValueError):
        corpus_bleu({0: "a"}, {1: ["a"]})
    with pytest.raises(ValueError):
        corpus_bleu({0: "a"}, {0: []})
    with pytest.raises(ValueError):
        corpus_bleu({0: "a"}, {0: "a"})  # a bare string instead of a list of references


def _random_corpus(rng: random.Random) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Random references; each hypothesis is a noisy copy of one of them (>= 4 tokens)."""
    vocab = "a the man dog cat red on sits with grass field ball".split()
    hyps, refs = {}, {}
    for key in range(rng.randint(3, 15)):
        refs[key] = [" ".join(rng.choices(vocab, k=rng.randint(3, 14))) for _ in range(rng.randint(1, 5))]
        tokens = [w if rng.random() < 0.7 else rng.choice(vocab) for w in rng.choice(refs[key]).split()]
        tokens = tokens[: rng.randint(1, len(tokens))] + rng.choices(vocab, k=rng.randint(0, 3))
        tokens += rng.choices(vocab, k=max(0, 4 - len(tokens)))
        hyps[key] = " ".join(tokens)
    return hyps, refs


@pytest.mark.parametrize("seed", range(8))
def test_bleu_matches_nltk(seed: int) -> None:
    import nltk.translate.bleu_score as nltk_bleu
    # Definitions coincide when every hypothesis has >= 4 tokens (nltk counts a denominator of 1
    # for k-grams of a shorter hypothesis); both use the closest reference length, shorter on ties.
    hyps, refs = _random_corpus(random.Random(seed))
    keys = list(hyps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when some order has no match
        expected = nltk_bleu.corpus_bleu(
            [[r.split() for r in refs[k]] for k in keys],
            [hyps[k].split() for k in keys],
            weights=[(1.0 / n,) * n for n in range(1, 5)],
        )
    assert min(expected) > 0.05  # every order has matches, so no smoothing is involved
    assert _bleu_list(corpus_bleu(hyps, refs, coco_epsilon=False)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert _bleu_list(corpus_bleu(hyps, refs)) == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------ CIDEr-D


def test_cider_hand_computed() -> None:
    # N = 3 images. df counts the images whose reference set contains an n-gram:
    #   "a": 3 -> idf log3 - log3 = 0;  "bird": 2 -> idf K = log(3/2) = 0.4054651
    #   "cat", "dog", "red", every bigram and the trigram "a red bird": 1 -> idf M = log 3 = 1.0986123
    #   n-grams in no reference ("the", "cat cat", "the bird", ...): df 0 -> log(max(1, 0)) = 0 -> idf M
    # Length penalty for |len_h - len_r| = 1: g = exp(-1 / (2 * 6^2)) = exp(-1/72) = 0.9862071
    #
    # A: hyp "a cat cat" (3 tokens)
    #   vs "a cat" (2):  1-grams h = {a: 0, cat: 2M}, r = {a: 0, cat: M}; |h| = 2M, |r| = M
    #                    sim1 = min(2M, M) * M / (2M * M) = 1/2              (clipping of "cat")
    #                    2-grams h = {a cat: M, cat cat: M}, r = {a cat: M}; sim2 = M*M / (sqrt2 M * M) = 1/sqrt2
    #                    3-, 4-grams: the reference has none -> 0;  times g (delta = 1)
    #   vs "a dog" (2):  only "a" (weight 0) is shared -> 0
    #   score = 10 * g * (1/2 + 1/sqrt2) / 4 orders / 2 refs = 1.4880716
    # B: hyp "the bird", ref "a bird" (equal length, no penalty)
    #   1-grams h = {the: M, bird: K}, r = {a: 0, bird: K}; sim1 = K*K / (sqrt(M^2 + K^2) * K)
    #          = 0.4054651 / 1.1710469 = 0.3462415; 2-grams: "the bird" vs "a bird" -> 0
    #   score = 10 * 0.3462415 / 4 = 0.8656039
    # C: hyp "red bird" (2), ref "a red bird" (3)
    #   1-grams h = {red: M, bird: K}, r = {a: 0, red: M, bird: K} -> identical directions: sim1 = 1
    #   2-grams h = {red bird: M}, r = {a red: M, red bird: M}: sim2 = M*M / (M * sqrt2 M) = 1/sqrt2
    #   3-grams: the hypothesis has none -> 0; times g (delta = -1)
    #   score = 10 * g * (1 + 1/sqrt2) / 4 = 4.2089021
    # corpus = (1.4880716 + 0.8656039 + 4.2089021) / 3 = 2.1875259
    hyps = {"A": "a cat cat", "B": "the bird", "C": "red bird"}
    refs = {"A": ["a cat", "a dog"], "B": ["a bird"], "C": ["a red bird"]}
    m, k, g = math.log(3), math.log(1.5), math.exp(-1 / 72)
    expected = {
        "A": 10 * g * (0.5 + 2**-0.5) / 4 / 2,
        "B": 10 * (k / math.hypot(m, k)) / 4,
        "C": 10 * g * (1 + 2**-0.5) / 4,
    }
    score, per_key = cider_d(hyps, refs)
    assert per_key == pytest.approx(expected, rel=1e-12)
    assert per_key == pytest.approx({"A": 1.4880716, "B": 0.8656039, "C": 4.2089021}, abs=1e-7)
    assert score == pytest.approx(sum(expected.values()) / 3, rel=1e-12)


_VARIED_REFS = {
    0: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean."],
    1: ["Two dogs playing with a frisbee in the park.", "A pair of dogs chase a frisbee on the grass."],
    2: ["A plate of food with broccoli and rice.", "Rice and vegetables served on a white plate."],
    3: ["A red double decker bus driving down a street.", "A big red bus on a city street."],
    4: ["A cat sleeping on a laptop keyboard.", "A small cat lies on top of a computer."],
}


def test_cider_identical_beats_unrelated() -> None:
    identical = {k: v[0] for k, v in _VARIED_REFS.items()}
    shuffled = {k: _VARIED_REFS[(k + 1) % 5][0] for k in _VARIED_REFS}  # another image's caption
    unrelated = {k: "an old clock tower under cloudy skies" for k in _VARIED_REFS}
    best, per_best = cider_d(identical, _VARIED_REFS)
    mid, _ = cider_d(shuffled, _VARIED_REFS)
    worst, per_worst = cider_d(unrelated, _VARIED_REFS)
    assert best > 1.0 > mid >= worst >= 0.0
    assert worst == pytest.approx(0.0, abs=1e-12)
    assert all(per_best[k] > per_worst[k] for k in _VARIED_REFS)


def test_cider_is_order_invariant() -> None:
    hyps = {k: v[1].upper() for k, v in _VARIED_REFS.items()}
    hyps[2] = "a plate with rice"
    score, per_key = cider_d(hyps, _VARIED_REFS)
    order = [3, 0, 4, 2, 1]
    score2, per_key2 = cider_d({k: hyps[k] for k in order}, {k: _VARIED_REFS[k] for k in reversed(order)})
    assert score2 == score
    assert per_key2 == per_key


def test_cider_length_penalty() -> None:
    refs = {0: ["a dog runs on the grass"], 1: ["a cat sits on a sofa"], 2: ["a man eats a pizza"]}
    hyps = {0: "a dog runs on the grass", 1: "a cat sits on a sofa", 2: "a man eats a pizza"}
    _, exact = cider_d(hyps, refs)
    # Repeating the caption keeps exactly the same set of n-grams but doubles the length.
    longer = {**hyps, 0: "a dog runs on the grass a dog runs on the grass"}
    _, penalised = cider_d(longer, refs)
    _, unpenalised = cider_d(longer, refs, sigma=1e12)
    assert penalised[0] < unpenalised[0] <= exact[0]
    # 6 tokens longer: the Gaussian factor is exactly exp(-6^2 / (2 * 6^2)) = exp(-1/2)
    assert penalised[0] / unpenalised[0] == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert penalised[1] == exact[1]  # other images are unaffected: df depends on references only


def test_cider_edge_cases() -> None:
    # a single image has N = 1, so every idf is log 1 - log 1 = 0 (as in coco-caption)
    assert cider_d({0: "a dog"}, {0: ["a dog"]}) == (0.0, {0: 0.0})
    score, per_key = cider_d({0: "", 1: "a cat"}, {0: ["a dog"], 1: ["a cat"]})
    assert per_key[0] == 0.0 and per_key[1] > 0.0 and score == per_key[1] / 2
    with pytest.raises(ValueError):
        cider_d({0: "a"}, {0: ["a"]}, sigma=0.0)
