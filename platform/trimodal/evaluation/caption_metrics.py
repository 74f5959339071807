"""Dependency-free caption metrics: a COCO-style tokenizer, corpus BLEU-1..4 and CIDEr-D.

These follow the definitions used by the coco-caption toolkit (``pycocoevalcap``), which is
too heavy to install here (it bundles Java jars for the PTB tokenizer, METEOR and SPICE).

Inputs use the coco-caption layout: ``hypotheses`` maps an image key to one generated
caption, ``references`` maps the same keys to a list of ground-truth captions. Captions are
raw strings; each function tokenizes them with :func:`tokenize` unless another
``tokenizer`` is given (pass ``str.split`` for text that is already tokenized).

References:
    Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine Translation", ACL 2002.
    Vedantam, Zitnick, Parikh, "CIDEr: Consensus-based Image Description Evaluation", CVPR 2015.
    Chen et al., "Microsoft COCO Captions: Data Collection and Evaluation Server", arXiv:1504.00325.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["tokenize", "corpus_bleu", "cider_d"]

K = TypeVar("K", bound=Hashable)
Tokenizer = Callable[[str], list[str]]
NGram = tuple[str, ...]

_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
_CURLY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_CLITIC_RE = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_DROP_RE = re.compile(r"[!?;:\"`()\[\]{}]")
_DOT_COMMA_RE = re.compile(r"(?<!\d)[.,]|[.,](?!\d)")  # keeps "3.5" and "1,000"


def tokenize(text: str) -> list[str]:
    """Lowercase and split a caption, dropping punctuation as coco-caption's PTB step does.

    coco-caption runs the Stanford PTBTokenizer (``-lowerCase``) and then deletes the
    punctuation tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. This is a
    regex approximation of that pipeline: lowercase; split off the clitics ``n't 's 're 've
    'll 'd 'm`` as their own tokens ("don't" -> "do n't", "man's" -> "man 's"); drop
    ``! ? ; : " ` ( ) [ ] { }``; drop ``.`` and ``,`` unless between digits ("3.5", "1,000"
    stay); split on whitespace; strip leading/trailing ``'`` and ``-`` from other tokens
    (intra-word hyphens and apostrophes stay: "black-and-white", "o'clock").

    Known differences from PTBTokenizer: abbreviations lose their period (PTB keeps "mr.",
    "u.s."); symbols such as ``$ % # & / +`` are not split from adjacent words (PTB gives
    "$ 5", "50 %"); no PTB special cases like "cannot" -> "can not" or "gonna" -> "gon na";
    only curly quotes are normalised (no other Unicode handling). For ordinary captions
    these rarely differ.
    """
    text = _CLITIC_RE.sub(r" \1", text.lower().translate(_CURLY))
    text = _DOT_COMMA_RE.sub(" ", _DROP_RE.sub(" ", text))
    tokens = (t if t in _CLITICS else t.strip("'-") for t in text.split())
    return [t for t in tokens if t]


def _ngrams(tokens: Sequence[str], k: int) -> Counter[NGram]:
    """Counts of the contiguous k-grams of ``tokens``."""
    return Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))


def _ngrams_upto(tokens: Sequence[str], n: int) -> Counter[NGram]:
    """Counts of all k-grams of ``tokens`` for k = 1..n, in one Counter."""
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        counts.update(_ngrams(tokens, k))
    return counts


def _paired(
    hypotheses: Mapping[K, str], references: Mapping[K, Sequence[str]], tokenizer: Tokenizer
) -> dict[K, tuple[list[str], list[list[str]]]]:
    """Tokenize and pair each key's hypothesis with its references, validating the layout."""
    if set(hypotheses) != set(references):
        raise ValueError("hypotheses and references must have exactly the same keys")
    if not references:
        raise ValueError("cannot score an empty corpus")
    pairs: dict[K, tuple[list[str], list[list[str]]]] = {}
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
        pairs[key] = (tokenizer(hypotheses[key]), [tokenizer(r) for r in refs])
    return pairs


# --------------------------------------------------------------------------------------- BLEU


def _closest_ref_length(hyp_len: int, refs: Sequence[Sequence[str]]) -> int:
    """coco-caption's ``"closest"`` reference length; ties go to the shorter reference."""
    return min((len(r) for r in refs), key=lambda length: (abs(length - hyp_len), length))


def _clipped_matches(hyp: Sequence[str], refs: Sequence[Sequence[str]], k: int) -> tuple[int, int]:
    """(clipped k-gram matches, k-grams in hyp): each count capped at its max over the refs."""
    counts = _ngrams(hyp, k)
    max_ref: Counter[NGram] = Counter()
    for ref in refs:
        max_ref |= _ngrams(ref, k)  # Counter union keeps the per-n-gram maximum
    return sum(min(c, max_ref[g]) for g, c in counts.items()), sum(counts.values())


def _brevity_penalty(hyp_len: int, ref_len: int, tiny: float, small: float) -> float:
    """exp(1 - r/c) when the corpus hypothesis length c is below the reference length r, else 1."""
    if hyp_len == 0:
        return 0.0
    if ref_len + small == 0:
        return 1.0
    ratio = (hyp_len + tiny) / (ref_len + small)
    return math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0


def corpus_bleu(
    hypotheses: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    n: int = 4,
    *,
    tokenizer: Tokenizer = tokenize,
    coco_epsilon: bool = True,
) -> dict[str, float]:
    """Corpus-level BLEU-1..n as computed by coco-caption's ``Bleu`` scorer.

    Clipped n-gram matches and hypothesis n-gram counts are summed over the corpus before
    dividing (not averaged per sentence). BLEU-k is the geometric mean of the precisions of
    orders 1..k times the brevity penalty ``exp(1 - r/c)`` (1 when c > r), where c is the
    total hypothesis length and r sums, per image, the reference length closest to the
    hypothesis length (coco-caption's ``option="closest"``; ties pick the shorter reference,
    as nltk's ``closest_ref_length`` does).

    ``coco_epsilon=True`` reproduces coco-caption's guards against division by zero: each
    precision is ``(matches + 1e-15) / (count + 1e-9)`` and the length ratio is
    ``(c + 1e-15) / (r + 1e-9)``. So a perfect match scores 1 - O(1e-9) rather than exactly 1,
    and an order with no match gives a tiny non-zero BLEU (about 1e-15 / count in its
    precision) instead of 0; otherwise the epsilons change scores by < 1e-9. With
    ``coco_epsilon=False`` this is the unsmoothed textbook BLEU, which equals nltk's
    ``corpus_bleu`` when every hypothesis has at least n tokens (nltk counts a k-gram
    denominator of 1 for hypotheses shorter than k). A corpus of empty hypotheses scores 0.

    Returns ``{"BLEU-1": ..., ..., "BLEU-n": ...}`` with scores in [0, 1].
    """
    pairs = _paired(hypotheses, references, tokenizer)
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, refs in pairs.values():
        hyp_len += len(hyp)
        ref_len += _closest_ref_length(len(hyp), refs)
        for k in range(1, n + 1):
            matched, total = _clipped_matches(hyp, refs, k)
            correct[k - 1] += matched
            guess[k - 1] += total
    tiny, small = (1e-15, 1e-9) if coco_epsilon else (0.0, 0.0)
    bp = _brevity_penalty(hyp_len, ref_len, tiny, small)
    scores: dict[str, float] = {}
    product = 1.0
    for k in range(1, n + 1):
        c, g = correct[k - 1], guess[k - 1]
        product *= (c + tiny) / (g + small) if g + small else 0.0
        scores[f"BLEU-{k}"] = bp * product ** (1.0 / k)
    return scores


# ------------------------------------------------------------------------------------ CIDEr-D


@dataclass(frozen=True)
class _TfIdf:
    """TF-IDF n-gram vector of one caption, split by order, with per-order L2 norms."""

    weights: list[dict[NGram, float]]  # weights[k - 1]: k-gram -> raw count * idf
    norms: list[float]
    length: int  # number of tokens


def _document_frequency(ref_sets: Sequence[list[list[str]]], n: int) -> Counter[NGram]:
    """For each n-gram, the number of images whose reference set contains it at least once."""
    df: Counter[NGram] = Counter()
    for refs in ref_sets:
        df.update(set().union(*(_ngrams_upto(r, n) for r in refs)))
    return df


def _tfidf(tokens: list[str], df: Counter[NGram], log_docs: float, n: int) -> _TfIdf:
    """Weights ``count(g) * (log(N) - log(max(1, df(g))))`` for all 1..n-grams of ``tokens``."""
    weights: list[dict[NGram, float]] = [{} for _ in range(n)]
    for gram, tf in _ngrams_upto(tokens, n).items():
        weights[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1, df[gram])))
    norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
    return _TfIdf(weights, norms, len(tokens))


def _cider_d_similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> float:
    """Mean over orders k of ``penalty * sum_g min(h_g, r_g) * r_g / (|h_k| |r_k|)``."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2.0 * sigma**2))
    total = 0.0
    for h, r, h_norm, r_norm in zip(hyp.weights, ref.weights, hyp.norms, ref.norms):
        if h_norm and r_norm:
            dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in h.items())
            total += penalty * dot / (h_norm * r_norm)
    return total / len(hyp.weights)


def cider_d(
    hypotheses: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    *,
    tokenizer: Tokenizer = tokenize,
) -> tuple[float, dict[K, float]]:
    """CIDEr-D (Vedantam, Zitnick, Parikh, CVPR 2015), as coco-caption computes it.

    coco-caption's ``Cider`` scorer (reported as "CIDEr" in COCO results) is this CIDEr-D.

    Each caption becomes TF-IDF vectors of its 1..n-grams: the term frequency is the raw
    count and ``idf(g) = log(N) - log(max(1, df(g)))``, where N is the number of images in the
    evaluated corpus and df(g) the number of images whose *reference set* contains g
    (hypotheses never affect df; an n-gram unseen in references gets idf log N). For
    hypothesis h and reference r, order k contributes
    ``sum_g min(h_g, r_g) * r_g / (|h_k| |r_k|)`` (the clipping of hypothesis weights by the
    reference, the "D" variant's guard against repetition; norms are of the unclipped
    vectors; 0 if either vector is empty), times the Gaussian length penalty
    ``exp(-(len_h - len_r)^2 / (2 sigma^2))``. An image's score is 10 x the mean over orders
    k = 1..n and over its references; the corpus score is the mean over images.

    Lengths are token counts. coco-caption uses bigram counts (tokens - 1), which gives the
    same differences whenever both captions are non-empty and n >= 2 (an empty caption scores
    0 either way); with n = 1 coco-caption effectively disables the penalty, this does not.
    Note that with a single image N = 1, so every idf is 0 and the score is 0.

    Returns ``(corpus_score, {key: image_score})``.
    """
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    pairs = _paired(hypotheses, references, tokenizer)
    df = _document_frequency([refs for _, refs in pairs.values()], n)
    log_docs = math.log(len(pairs))
    per_key: dict[K, float] = {}
    for key, (hyp, refs) in pairs.items():
        hyp_vec = _tfidf(hyp, df, log_docs, n)
        sims = [_cider_d_similarity(hyp_vec, _tfidf(r, df, log_docs, n), sigma) for r in refs]
        per_key[key] = 10.0 * math.fsum(sims) / len(refs)
    return math.fsum(per_key.values()) / len(per_key), per_key
