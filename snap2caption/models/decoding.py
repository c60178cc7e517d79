"""Decoding, without torch: settings, the caption record, and the greedy / beam loop over NumPy logits.

Two loops decode captions, on purpose:

- :meth:`snap2caption.models.caption.CaptionModel.generate` (torch tensors on the model's device): training
  evaluation, the torch serving backend, and the GPU path, where logits must stay on the device;
- :func:`generate_numpy` here: the ONNX Runtime serving backend (``snap2caption.models.caption_ort``), which
  then needs neither torch nor transformers in the process (about 700 MB less resident memory per service).

Both implement the same algorithm with the same settings (:class:`DecodingConfig`) and share the pure-Python
pieces below; ``tests/snap2caption/models/test_decoding.py`` holds them to the same captions and confidences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DecodingConfig:
    """Decoding defaults; :meth:`CaptionModel.generate` can override each per call.

    Attributes:
        max_new_tokens: Most tokens generated, EOS included.
        num_beams: 1 = greedy; more = beam search.
        length_penalty: Beam score = sum of log-probs / length ** length_penalty (> 0 favours longer).
        repetition_penalty: > 1 discourages tokens already generated (CTRL-style: positive logits divided,
            negative multiplied). 1 disables it.
        no_repeat_ngram_size: Forbid repeating any n-gram of this size; 0 disables it.
        min_new_tokens: EOS is forbidden before this many tokens.
    """

    max_new_tokens: int = 24
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 1


def decoding_problems(s: DecodingConfig) -> list[str]:
    problems = []
    if s.max_new_tokens < 1 or s.num_beams < 1:
        problems.append("decoding.max_new_tokens and decoding.num_beams must be >= 1")
    if s.repetition_penalty <= 0:
        problems.append(f"decoding.repetition_penalty must be > 0, got {s.repetition_penalty}")
    if s.no_repeat_ngram_size < 0:
        problems.append(f"decoding.no_repeat_ngram_size must be >= 0, got {s.no_repeat_ngram_size}")
    if not 0 <= s.min_new_tokens <= s.max_new_tokens:
        problems.append(f"decoding.min_new_tokens must be in [0, max_new_tokens], got {s.min_new_tokens}")
    return problems


@dataclass
class Caption:
    """One decoded caption.

    Attributes:
        text: The caption.
        token_ids: Its token ids, without BOS/EOS.
        confidence: Mean log-probability per generated token (EOS included when generated), under the
            model's own distribution before any repetition/length control: in (-inf, 0], higher is surer;
            ``math.exp(confidence)`` is the geometric-mean token probability.
        n_tokens: ``len(token_ids)``.
    """

    text: str
    token_ids: list[int]
    confidence: float
    n_tokens: int


def until_eos(ids: list[int], eos: int) -> list[int]:
    """Tokens before the first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids


def banned_ngram_tokens(rows: list[list[int]], n: int) -> list[list[int]]:
    """For each row of generated tokens, the tokens that would repeat an n-gram already in it."""
    banned = []
    for tokens in rows:
        context = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
        banned.append(
            [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == context]
        )
    return banned


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer ids the loop needs."""

    bos: int
    eos: int
    pad: int


def make_caption(
    ids: list[int],
    logprob_sum: float,
    n_scored: int,
    special: SpecialTokens,
    decode: Callable[[list[int]], str],
) -> Caption:
    """The :class:`Caption` of a decoded row: EOS and padding dropped, confidence = mean raw log-prob."""
    tokens = [t for t in ids if t not in (special.eos, special.pad)]
    return Caption(
        text=decode(tokens),
        token_ids=tokens,
        confidence=logprob_sum / max(n_scored, 1),
        n_tokens=len(tokens),
    )


# ================================================================================ the NumPy loop

# (N, S, D) embeddings of new positions, the cache from the previous call (None first) -> (N, V) logits, cache
StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
# (N,) token ids -> (N, 1, D) embeddings
EmbedFn = Callable[[np.ndarray], np.ndarray]
# (cache, rows) -> the cache with its batch rows picked / repeated by ``rows``
ReorderFn = Callable[[Any, np.ndarray], Any]


def generate_numpy(
    prompt: np.ndarray,
    step: StepFn,
    embed: EmbedFn,
    reorder: ReorderFn,
    special: SpecialTokens,
    settings: DecodingConfig,
) -> list[tuple[list[int], float, int]]:
    """Greedy (``num_beams == 1``) or beam search decoding over NumPy logits.

    Args:
        prompt: (B, P + 1, D) float32 prefix embeddings followed by BOS's.
        step: One decoder call with the KV cache.
        embed: Token embedding lookup.
        reorder: Picks cache rows (beam search only).
        special: BOS / EOS / padding ids.
        settings: Decoding settings (already validated).

    Returns:
        Per image: (token ids up to EOS, sum of raw log-probs of the scored tokens, number scored), as the
        torch loop returns them.
    """
    if settings.num_beams == 1:
        return _greedy(prompt, step, embed, special, settings)
    return _beam_search(prompt, step, embed, reorder, special, settings)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) float32 logits; -inf entries stay -inf."""
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def process_logits(
    logits: np.ndarray, generated: np.ndarray, special: SpecialTokens, settings: DecodingConfig
) -> np.ndarray:
    """Repetition penalty, n-gram blocking and minimum length on (N, V) logits (a copy); as the torch loop.

    BOS and padding are never generated.
    """
    logits = logits.copy()
    never = sorted({special.bos, special.pad} - {special.eos})
    logits[:, never] = -math.inf
    n_done = generated.shape[1]
    if settings.repetition_penalty != 1.0 and n_done:
        rows = np.arange(logits.shape[0])[:, None]
        seen = logits[rows, generated]  # (N, t)
        penalised = np.where(
            seen > 0, seen / settings.repetition_penalty, seen * settings.repetition_penalty
        ).astype(np.float32)
        logits[rows, generated] = penalised
    n = settings.no_repeat_ngram_size
    if n and n_done + 1 >= n:
        for row, banned in enumerate(banned_ngram_tokens(generated.tolist(), n)):
            if banned:
                logits[row, banned] = -math.inf
    if n_done < settings.min_new_tokens:
        logits[:, special.eos] = -math.inf
    return logits


def _greedy(
    prompt: np.ndarray, step: StepFn, embed: EmbedFn, special: SpecialTokens, settings: DecodingConfig
) -> list[tuple[list[int], float, int]]:
    batch = prompt.shape[0]
    logits, cache = step(prompt, None)  # (B, V)
    generated = np.empty((batch, 0), np.int64)  # (B, t)
    finished = np.zeros(batch, bool)
    logprob_sum = np.zeros(batch, np.float32)
    n_scored = np.zeros(batch, np.int64)
    rows = np.arange(batch)
    for _ in range(settings.max_new_tokens):
        raw = log_softmax(logits)  # (B, V) the model's own distribution
        nxt = process_logits(logits, generated, special, settings).argmax(axis=-1)  # (B,)
        nxt = np.where(finished, special.pad, nxt)
        live = ~finished
        logprob_sum += np.where(live, raw[rows, nxt], 0.0).astype(np.float32)
        n_scored += live
        generated = np.concatenate([generated, nxt[:, None]], axis=1)
        finished |= nxt == special.eos
        if finished.all():
            break
        logits, cache = step(embed(nxt), cache)
    return [
        (until_eos(row, special.eos), float(s), int(n))
        for row, s, n in zip(generated.tolist(), logprob_sum.tolist(), n_scored.tolist(), strict=True)
    ]


def _beam_search(
    prompt: np.ndarray,
    step: StepFn,
    embed: EmbedFn,
    reorder: ReorderFn,
    special: SpecialTokens,
    settings: DecodingConfig,
) -> list[tuple[list[int], float, int]]:
    """Batched beam search, step for step the algorithm of ``CaptionModel._beam_search``."""
    batch, k = prompt.shape[0], settings.num_beams
    eos, pad = special.eos, special.pad
    logits, cache = step(prompt, None)  # (B, V)
    expand = np.repeat(np.arange(batch), k)  # (B*K,) each image K times
    logits = logits[expand]
    cache = reorder(cache, expand)
    vocab = logits.shape[-1]
    # Only the first copy of each image is live at the start, so the K beams begin distinct.
    first = np.full((batch, k), -math.inf, np.float32)
    first[:, 0] = 0.0
    beam_scores = first.reshape(-1)  # (B*K,)
    raw_sums = np.zeros(batch * k, np.float32)
    generated = np.empty((batch * k, 0), np.int64)  # (B*K, t)
    ended: list[list[tuple[float, list[int], float, int]]] = [[] for _ in range(batch)]
    done = [False] * batch
    lp = settings.length_penalty
    for t in range(settings.max_new_tokens):
        length = t + 1
        raw = log_softmax(logits)  # (B*K, V)
        processed = log_softmax(process_logits(logits, generated, special, settings))
        candidates = (beam_scores[:, None] + processed).reshape(batch, k * vocab)  # (B, K*V)
        top_index = _top(candidates, 2 * k)  # (B, 2K) best first
        top_scores = np.take_along_axis(candidates, top_index, axis=1)
        top_raw = np.take_along_axis((raw_sums[:, None] + raw).reshape(batch, k * vocab), top_index, axis=1)
        src_rows = (top_index // vocab + np.arange(batch)[:, None] * k).tolist()
        top_tokens = (top_index % vocab).tolist()
        top_scores_l, top_raw_l = top_scores.tolist(), top_raw.tolist()
        beams: list[tuple[int, int, float, float]] = []
        for b in range(batch):
            if done[b]:
                beams += [(b * k + j, pad, 0.0, 0.0) for j in range(k)]
                continue
            chosen: list[tuple[int, int, float, float]] = []
            candidates_b = zip(src_rows[b], top_tokens[b], top_scores_l[b], top_raw_l[b], strict=True)
            for rank, (row, tok, score, raw_sum) in enumerate(candidates_b):
                if tok != eos:
                    chosen.append((row, tok, score, raw_sum))
                    if len(chosen) == k:
                        break
                elif rank < k:
                    ids = [*generated[row].tolist(), eos]
                    ended[b].append((score / length**lp, ids, raw_sum, length))
            beams += chosen
            ended[b] = sorted(ended[b], key=lambda h: h[0], reverse=True)[:k]
            best_running = chosen[0][2] / length**lp
            done[b] = len(ended[b]) == k and ended[b][-1][0] >= best_running
        if all(done):
            break
        rows_l, tokens_l, scores_l, raws_l = zip(*beams, strict=True)
        rows = np.asarray(rows_l, np.int64)
        new_tokens = np.asarray(tokens_l, np.int64)
        generated = np.concatenate([generated[rows], new_tokens[:, None]], axis=1)
        beam_scores = np.asarray(scores_l, np.float32)
        raw_sums = np.asarray(raws_l, np.float32)
        cache = reorder(cache, rows)
        if t + 1 < settings.max_new_tokens:
            logits, cache = step(embed(new_tokens), cache)
    results = []
    n_steps = generated.shape[1]
    final_scores: list[float] = beam_scores.tolist()
    final_raw: list[float] = raw_sums.tolist()
    for b in range(batch):
        hyps = ended[b]
        if not done[b]:
            hyps += [
                (final_scores[j] / n_steps**lp, generated[j].tolist(), final_raw[j], n_steps)
                for j in range(b * k, (b + 1) * k)
                if math.isfinite(final_scores[j])
            ]
        _, ids, raw_sum, n = max(hyps, key=lambda h: h[0])
        results.append((until_eos(ids, eos), raw_sum, n))
    return results


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest entries of each row of (B, M) scores, largest first."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]  # (B, n) unordered
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
