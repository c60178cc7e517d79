"""Decoding, without torch: settings, the caption record, beam-search bookkeeping and the NumPy loop.

Two loops decode captions, on purpose:

- :meth:`snap2caption.models.caption.model.CaptionModel.generate` (torch tensors on the model's device):
  training evaluation, the torch runtime, and the GPU path, where logits must stay on the device;
- :func:`generate_numpy` here: the ONNX Runtime runtime (``snap2caption.models.caption.ort``), which then
  needs neither torch nor transformers in the process (about 700 MB less resident memory per service).

Both implement the same algorithm with the same settings (:class:`DecodingConfig`): the array arithmetic of
each step is theirs (torch or NumPy), everything else is here once: which candidates continue a beam, which
end it, when an image is done and which hypothesis wins (:class:`BeamBook`), which tokens may not come
next (:func:`mask_logits`) and how a decoded row becomes a :class:`Caption` (:func:`make_caption`).
``tests/snap2caption/models/caption/test_ort.py`` holds the two loops to the same captions and confidences.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

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
        limit_repeats: Learn at training which token pairs the captions repeat (``repeatable_bigrams``);
            once learned, a pair may occur twice in one caption only if it is one of them. Where the
            targets never repeat a pair (the synthetic benchmark names each (colour, shape) once: "two red
            circles", never "a red circle, a red circle"), a decoder that lost count cannot loop back to an
            object it already named and has to pick its next likeliest token instead.
        repeatable_bigrams: The token pairs some training caption holds twice or more (``[[first,
            second], ...]``), written by training when ``limit_repeats`` is on and kept in the artifact;
            None (nothing learned, e.g. an untrained model or an older artifact) limits nothing.
        views: Views of an unsure image captioned, the image itself first, then mirrored left-right,
            top-bottom, both (:mod:`~snap2caption.models.caption.views`); 1 = the image alone. Applied by
            the runtimes and the evaluation around the decode loop (:meth:`CaptionModel.generate` decodes one
            view).
        views_below: A caption's other views are made when its raw confidence (geometric-mean token
            probability) is below this; 1.0 makes them for (almost) every image.
    """

    max_new_tokens: int = 24
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 1
    limit_repeats: bool = False
    repeatable_bigrams: list[list[int]] | None = None
    views: int = 1
    views_below: float = 1.0


# Most views of :attr:`DecodingConfig.views`: the image and its three mirrors.
MAX_VIEWS = 4


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
    if any(len(pair) != 2 or min(pair) < 0 for pair in s.repeatable_bigrams or []):
        problems.append("decoding.repeatable_bigrams must hold [first, second] pairs of token ids")
    if not 1 <= s.views <= MAX_VIEWS:
        problems.append(f"decoding.views must be in [1, {MAX_VIEWS}], got {s.views}")
    if not 0 < s.views_below <= 1:
        problems.append(f"decoding.views_below must be in (0, 1], got {s.views_below}")
    return problems


def repeated_bigrams(targets: Iterable[list[int]]) -> list[list[int]]:
    """The token pairs that occur twice or more in at least one of ``targets`` (token id lists), sorted."""
    pairs: set[tuple[int, int]] = set()
    for ids in targets:
        seen: set[tuple[int, int]] = set()
        for pair in itertools.pairwise(ids):
            if pair in seen:
                pairs.add(pair)
            seen.add(pair)
    return [list(pair) for pair in sorted(pairs)]


def banned_repeat_tokens(rows: list[list[int]], repeatable: set[tuple[int, int]]) -> list[list[int]]:
    """For each row of generated tokens, the tokens that would make a pair it already holds occur again,
    unless that pair is ``repeatable``: the repeated bigrams of :func:`banned_ngram_tokens`, less those."""
    return [
        [b for b in banned if (tokens[-1], b) not in repeatable]
        for tokens, banned in zip(rows, banned_ngram_tokens(rows, 2), strict=True)
    ]


@dataclass
class Caption:
    """One decoded caption.

    Attributes:
        text: The caption.
        token_ids: Its token ids, without BOS/EOS.
        confidence: Mean log-probability per generated token (EOS included when generated), under the
            model's own distribution before any repetition/length control: in (-inf, 0], higher is surer;
            ``math.exp(confidence)`` is the geometric-mean token probability. For an image captioned over
            mirrored views (``views``), the log of the views' mean probability for this caption
            (:func:`~snap2caption.models.caption.views.combine`).
        n_tokens: ``len(token_ids)``.
        in_domain: Whether the image is inside the model's training domain (its artifact's domain model,
            :mod:`snap2caption.models.domain`); ``None`` when the artifact has none.
        domain_score: The domain model's conformal p-value in ``(0, 1]``; ``None`` without one.
        calibrated: The probability that the caption is right, from the artifact's ``calibration.json``
            (:mod:`~snap2caption.models.caption.calibration`, applied by the runtimes); None for a model
            without one.
    """

    text: str
    token_ids: list[int]
    confidence: float
    n_tokens: int
    in_domain: bool | None = None
    domain_score: float | None = None
    calibrated: float | None = None

    @property
    def raw_probability(self) -> float:
        """The geometric-mean token probability, ``exp(confidence)``, in [0, 1]."""
        return math.exp(self.confidence)

    @property
    def probability(self) -> float:
        """What is served as the caption's confidence: :attr:`calibrated`, else :attr:`raw_probability`."""
        return self.raw_probability if self.calibrated is None else self.calibrated


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


# ========================================================================== beam-search bookkeeping

# (source row, token, score, raw log-prob sum) of one beam after a step
Beam = tuple[int, int, float, float]
# (length-penalised score, token ids ending in EOS, raw log-prob sum, length) of an ended hypothesis
Hypothesis = tuple[float, list[int], float, int]
# Per image: (token ids up to EOS, sum of raw log-probs of the scored tokens, number scored)
Decoded = list[tuple[list[int], float, int]]


class Rows(Protocol):
    """(N, t) generated tokens: a torch tensor or a NumPy array (both index rows and list them)."""

    shape: Any

    def __getitem__(self, row: int) -> Any: ...

    def tolist(self) -> Any: ...


def mask_logits(logits: Any, generated: Rows, special: SpecialTokens, settings: DecodingConfig) -> None:
    """Forbid, in place, what may not come next in (N, V) logits, a torch tensor or a NumPy array.

    BOS and padding are never generated (they are never training targets either); neither is a token that
    would repeat an n-gram (``no_repeat_ngram_size``) or a pair the training captions never repeat
    (``limit_repeats``), nor EOS before ``min_new_tokens``. Both loops call this after their own repetition
    penalty.
    """
    never = sorted({special.bos, special.pad} - {special.eos})  # GPT-2's one special token is also EOS
    logits[:, never] = -math.inf
    n_done = int(generated.shape[1])
    n = settings.no_repeat_ngram_size
    if n and n_done + 1 >= n:
        for row, banned in enumerate(banned_ngram_tokens(generated.tolist(), n)):
            if banned:
                logits[row, banned] = -math.inf
    if settings.limit_repeats and settings.repeatable_bigrams is not None and n_done >= 2:
        repeatable = {(a, b) for a, b in settings.repeatable_bigrams}
        for row, banned in enumerate(banned_repeat_tokens(generated.tolist(), repeatable)):
            if banned:
                logits[row, banned] = -math.inf
    if n_done < settings.min_new_tokens:
        logits[:, special.eos] = -math.inf


class BeamBook:
    """The bookkeeping of batched beam search (K beams per image), shared by the torch and NumPy loops.

    Each step, the loop scores every (beam, token) candidate of an image and hands over its 2K best, best
    first (enough to find K that are not EOS); :meth:`step` picks the K best non-EOS candidates to continue,
    ends a hypothesis for each EOS among the K best, and marks an image done when it has K ended hypotheses
    and no running beam can beat the worst of them at the current length. Candidates are ranked by the sum
    of processed log-probs; an ended hypothesis is scored ``sum / length ** length_penalty``. Rows are laid
    out image by image: image ``b`` owns rows ``b*K .. b*K + K - 1``.

    Args:
        batch: B, images.
        special: EOS ends a hypothesis; padding feeds the rows of images that are done.
        settings: ``num_beams`` (K) and ``length_penalty``.
    """

    def __init__(self, batch: int, special: SpecialTokens, settings: DecodingConfig) -> None:
        self.batch, self.k = batch, settings.num_beams
        self.eos, self.pad = special.eos, special.pad
        self.length_penalty = settings.length_penalty
        self.ended: list[list[Hypothesis]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    @property
    def all_done(self) -> bool:
        """Whether every image is done (the loop stops)."""
        return all(self.done)

    def step(
        self,
        length: int,
        generated: Rows,
        src_rows: list[list[int]],
        tokens: list[list[int]],
        scores: list[list[float]],
        raw_sums: list[list[float]],
    ) -> list[Beam]:
        """Pick the beams that continue after a step.

        Args:
            length: Tokens per hypothesis after this step (1 on the first).
            generated: (B*K, length - 1) tokens before this step.
            src_rows: (B, 2K) the beam row each candidate extends, best candidate first.
            tokens: (B, 2K) each candidate's token.
            scores: (B, 2K) each candidate's sum of processed log-probs.
            raw_sums: (B, 2K) each candidate's sum of raw log-probs (the confidence).

        Returns:
            B*K beams, image by image; a done image's rows stay in place, fed padding, and are ignored.
        """
        k, eos, penalty = self.k, self.eos, length**self.length_penalty
        beams: list[Beam] = []
        for b in range(self.batch):
            if self.done[b]:
                beams += [(b * k + j, self.pad, 0.0, 0.0) for j in range(k)]
                continue
            chosen: list[Beam] = []
            candidates = zip(src_rows[b], tokens[b], scores[b], raw_sums[b], strict=True)
            for rank, (row, token, score, raw_sum) in enumerate(candidates):
                if token != eos:
                    chosen.append((row, token, score, raw_sum))
                    if len(chosen) == k:
                        break
                elif rank < k:
                    ids = [*generated[row].tolist(), eos]
                    self.ended[b].append((score / penalty, ids, raw_sum, length))
            beams += chosen
            self.ended[b] = sorted(self.ended[b], key=lambda h: h[0], reverse=True)[:k]
            self.done[b] = len(self.ended[b]) == k and self.ended[b][-1][0] >= chosen[0][2] / penalty
        return beams

    def best(self, generated: Rows, final_scores: list[float], final_raw: list[float]) -> Decoded:
        """The best hypothesis of each image once the loop stops.

        An image still running at the length limit lets its running beams compete as they are.

        Args:
            generated: (B*K, n) tokens of the running beams.
            final_scores: (B*K,) their sums of processed log-probs.
            final_raw: (B*K,) their sums of raw log-probs.
        """
        k, n_steps = self.k, int(generated.shape[1])
        results: Decoded = []
        for b in range(self.batch):
            hyps = self.ended[b]
            if not self.done[b]:
                hyps += [
                    (
                        final_scores[j] / n_steps**self.length_penalty,
                        generated[j].tolist(),
                        final_raw[j],
                        n_steps,
                    )
                    for j in range(b * k, (b + 1) * k)
                    if math.isfinite(final_scores[j])
                ]
            _, ids, raw_sum, n = max(hyps, key=lambda h: h[0])
            results.append((until_eos(ids, self.eos), raw_sum, n))
        return results


# ================================================================================ the NumPy loop


class StepDecoder(Protocol):
    """The calls the NumPy loop makes into the network (ONNX Runtime's, in ``.ort``)."""

    def step(self, embeds: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """(N, S, D) embeddings of new positions, the cache of the previous call (None first) ->
        (N, V) logits of the last position, the cache."""
        ...

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(N,) token ids -> (N, 1, D) embeddings."""
        ...

    def reorder(self, cache: Any, rows: np.ndarray) -> Any:
        """The cache with its batch rows picked (and repeated) by ``rows`` (beam search)."""
        ...


def generate_numpy(
    prompt: np.ndarray, decoder: StepDecoder, special: SpecialTokens, settings: DecodingConfig
) -> Decoded:
    """Greedy (``num_beams == 1``) or beam search decoding over NumPy logits.

    Args:
        prompt: (B, P + 1, D) float32 prefix embeddings followed by BOS's.
        decoder: The network's decoder step, token embeddings and cache reordering.
        special: BOS / EOS / padding ids.
        settings: Decoding settings (already validated).

    Returns:
        Per image: (token ids up to EOS, sum of raw log-probs of the scored tokens, number scored), as the
        torch loop returns them.
    """
    if settings.num_beams == 1:
        return _greedy(prompt, decoder, special, settings)
    return _beam_search(prompt, decoder, special, settings)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) float32 logits; -inf entries stay -inf."""
    top = logits.max(axis=-1, keepdims=True)
    shifted = logits - np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def process_logits(
    logits: np.ndarray, generated: np.ndarray, special: SpecialTokens, settings: DecodingConfig
) -> np.ndarray:
    """Repetition penalty, then :func:`mask_logits`, on (N, V) logits (a copy); as the torch loop."""
    logits = logits.copy()
    if settings.repetition_penalty != 1.0 and generated.shape[1]:
        rows = np.arange(logits.shape[0])[:, None]
        seen = logits[rows, generated]  # (N, t)
        penalised = np.where(
            seen > 0, seen / settings.repetition_penalty, seen * settings.repetition_penalty
        ).astype(np.float32)
        logits[rows, generated] = penalised
    mask_logits(logits, generated, special, settings)
    return logits


def _greedy(
    prompt: np.ndarray, decoder: StepDecoder, special: SpecialTokens, settings: DecodingConfig
) -> Decoded:
    batch = prompt.shape[0]
    logits, cache = decoder.step(prompt, None)  # (B, V)
    generated = np.empty((batch, 0), np.int64)  # (B, t)
    finished = np.zeros(batch, bool)
    logprob_sum = np.zeros(batch, np.float32)
    n_scored = np.zeros(batch, np.int64)
    rows = np.arange(batch)
    for t in range(settings.max_new_tokens):
        raw = log_softmax(logits)  # (B, V) the model's own distribution
        nxt = process_logits(logits, generated, special, settings).argmax(axis=-1)  # (B,)
        nxt = np.where(finished, special.pad, nxt)
        live = ~finished
        logprob_sum += np.where(live, raw[rows, nxt], 0.0).astype(np.float32)
        n_scored += live
        generated = np.concatenate([generated, nxt[:, None]], axis=1)
        finished |= nxt == special.eos
        if finished.all() or t + 1 == settings.max_new_tokens:  # no step for a token never chosen
            break
        logits, cache = decoder.step(decoder.embed(nxt), cache)
    return [
        (until_eos(row, special.eos), float(s), int(n))
        for row, s, n in zip(generated.tolist(), logprob_sum.tolist(), n_scored.tolist(), strict=True)
    ]


def _beam_search(
    prompt: np.ndarray, decoder: StepDecoder, special: SpecialTokens, settings: DecodingConfig
) -> Decoded:
    """Batched beam search: ``CaptionModel._beam_search``'s algorithm on NumPy (see :class:`BeamBook`)."""
    batch, k = prompt.shape[0], settings.num_beams
    logits, cache = decoder.step(prompt, None)  # (B, V)
    expand = np.repeat(np.arange(batch), k)  # (B*K,) each image K times
    logits = logits[expand]
    cache = decoder.reorder(cache, expand)
    vocab = logits.shape[-1]
    # Only the first copy of each image is live at the start, so the K beams begin distinct.
    first = np.full((batch, k), -math.inf, np.float32)
    first[:, 0] = 0.0
    beam_scores = first.reshape(-1)  # (B*K,)
    raw_sums = np.zeros(batch * k, np.float32)
    generated = np.empty((batch * k, 0), np.int64)  # (B*K, t)
    book = BeamBook(batch, special, settings)
    for t in range(settings.max_new_tokens):
        raw = log_softmax(logits)  # (B*K, V)
        processed = log_softmax(process_logits(logits, generated, special, settings))
        candidates = (beam_scores[:, None] + processed).reshape(batch, k * vocab)  # (B, K*V)
        top_index = _top(candidates, 2 * k)  # (B, 2K) best first
        top_scores = np.take_along_axis(candidates, top_index, axis=1)
        top_raw = np.take_along_axis((raw_sums[:, None] + raw).reshape(batch, k * vocab), top_index, axis=1)
        src_rows = (top_index // vocab + np.arange(batch)[:, None] * k).tolist()
        beams = book.step(
            t + 1, generated, src_rows, (top_index % vocab).tolist(), top_scores.tolist(), top_raw.tolist()
        )
        if book.all_done:
            break
        rows_l, tokens_l, scores_l, raws_l = zip(*beams, strict=True)
        rows = np.asarray(rows_l, np.int64)
        new_tokens = np.asarray(tokens_l, np.int64)
        generated = np.concatenate([generated[rows], new_tokens[:, None]], axis=1)
        beam_scores = np.asarray(scores_l, np.float32)
        raw_sums = np.asarray(raws_l, np.float32)
        cache = decoder.reorder(cache, rows)
        if t + 1 < settings.max_new_tokens:
            logits, cache = decoder.step(decoder.embed(new_tokens), cache)
    return book.best(generated, beam_scores.tolist(), raw_sums.tolist())


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest entries of each row of (B, M) scores, largest first."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]  # (B, n) unordered
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
