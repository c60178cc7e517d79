"""The caption model, defined once: image encoder -> mapping network -> P prefix embeddings -> GPT-2 decoder.

Training, export, serving and tests all import this module (CONVENTIONS.md, 2). It holds:

- :class:`CaptionModel`: the network, its LM loss over caption tokens, optional LoRA adapters (peft);
- the decoding loop (greedy and beam search, KV cache, length and repetition controls), written here rather
  than borrowed from Hugging Face ``generate`` so that serving can swap the per-step function
  (:meth:`CaptionModel.step`) for a static-shape one; its beam bookkeeping is
  :class:`~snap2caption.models.caption.decoding.BeamBook`, shared with the NumPy loop;
- the builders of a fresh model and its tokenizer for training.

Its config is :class:`~snap2caption.models.caption.config.CaptionConfig`.

Sequence layout seen by the decoder: ``[prefix_1 .. prefix_P, <bos>, w_1 .. w_n, <eos>, <pad> ..]``. Only the
caption tokens ``w_1 .. <eos>`` are predicted; prefix, BOS and padding positions carry no loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from snap2caption.config import ConfigError
from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.backbones import adaptive_pool, build_encoder
from snap2caption.models.caption.config import CaptionConfig, MappingConfig
from snap2caption.models.caption.decoding import (
    BeamBook,
    Caption,
    Decoded,
    DecodingConfig,
    SpecialTokens,
    decoding_problems,
    make_caption,
    mask_logits,
    until_eos,
)
from snap2caption.models.caption.tokenizer import CaptionTokenizer

# ============================================================================================ mapping


def _prefix_grid(prefix_len: int) -> tuple[int, int]:
    """(gh, gw), gh * gw = P, gh the largest divisor <= sqrt(P): 49 -> (7, 7), 4 -> (2, 2), 10 -> (2, 5)."""
    gh = max(d for d in range(1, math.isqrt(prefix_len) + 1) if prefix_len % d == 0)
    return gh, prefix_len // gh


class MlpMapping(nn.Module):
    """Grid cells -> prefix tokens: pool the grid to P cells, then a 2-layer MLP per cell; the tokens come
    in raster order (``order="rows"``) or column by column, the leftmost first (``"columns"``)."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        prefix_len: int,
        hidden: int,
        dropout: float,
        coords: int = 0,
        order: str = "rows",
    ) -> None:
        super().__init__()
        self.grid = _prefix_grid(prefix_len)
        self.coords: Tensor
        self.register_buffer("coords", cell_coordinates(self.grid, coords), persistent=False)  # (P, K)
        self.by_columns = order == "columns"
        self.columns: Tensor
        self.register_buffer("columns", column_major(self.grid), persistent=False)  # (P,)
        self.net = nn.Sequential(
            nn.Linear(in_channels + self.coords.shape[1], hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) grid -> (B, P, D) prefix embeddings."""
        features = adaptive_pool(features, self.grid)  # (B, C, gh, gw)
        cells = features.flatten(2).transpose(1, 2)  # (B, P, C), row-major cells
        if self.coords.shape[1]:
            where = self.coords.to(cells.dtype).expand(cells.shape[0], -1, -1)  # (B, P, K)
            cells = torch.cat([cells, where], dim=2)  # (B, P, C + K)
        if self.by_columns:
            cells = cells[:, self.columns]  # (B, P, C + K), column by column
        return cast(Tensor, self.net(cells))  # (B, P, D)


def column_major(grid: tuple[int, int]) -> Tensor:
    """(P,) the row-major index of each cell taken column by column, the leftmost column first, each
    from the top: (2, 3) -> [0, 3, 1, 4, 2, 5]."""
    gh, gw = grid
    return torch.arange(gh * gw).reshape(gh, gw).t().reshape(-1)


def cell_coordinates(grid: tuple[int, int], bands: int) -> Tensor:
    """(P, 2 + 4 * bands) centre of each row-major cell: (x, y) in [-1, 1], then sin and cos of
    (x, y) * pi * 2**k for k < bands; (P, 0) when ``bands`` is 0."""
    gh, gw = grid
    if not bands:
        return torch.zeros(gh * gw, 0)
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh * 2 - 1  # (gh,)
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw * 2 - 1  # (gw,)
    xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (P, 2) row-major
    scaled = torch.cat([xy * math.pi * 2**k for k in range(bands)], dim=1)  # (P, 2 * bands)
    return torch.cat([xy, scaled.sin(), scaled.cos()], dim=1)


class TransformerMapping(nn.Module):
    """ClipCap-style transformer mapper over grid tokens plus P learned queries."""

    def __init__(self, in_channels: int, width: int, prefix_len: int, cfg: MappingConfig) -> None:
        super().__init__()
        self.grid = (cfg.grid, cfg.grid)
        self.proj = nn.Linear(in_channels, width)
        self.pos = nn.Parameter(torch.randn(cfg.grid * cfg.grid, width) * 0.02)  # (G, D) grid positions
        self.queries = nn.Parameter(torch.randn(prefix_len, width) * 0.02)  # (P, D)
        layer = nn.TransformerEncoderLayer(
            width,
            cfg.num_heads,
            cfg.hidden,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) grid -> (B, P, D) prefix embeddings."""
        features = adaptive_pool(features, self.grid)  # (B, C, g, g)
        tokens = self.proj(features.flatten(2).transpose(1, 2)) + self.pos  # (B, G, D)
        queries = self.queries.expand(features.shape[0], -1, -1)  # (B, P, D)
        out = self.blocks(torch.cat([tokens, queries], dim=1))  # (B, G + P, D)
        return cast(Tensor, self.norm(out[:, -queries.shape[1] :]))  # (B, P, D)


# ============================================================================================== model


@dataclass
class CaptionOutput:
    """Result of :meth:`CaptionModel.forward`.

    Attributes:
        loss: Mean cross-entropy over caption tokens (None without ``input_ids`` targets to score).
        logits: (B, T, V) logits at the caption positions; ``logits[:, i]`` predicts ``input_ids[:, i + 1]``.
        attention_loss: With ``attention_targets``: :func:`attention_loss` of the supervised head (not
            added to ``loss``; the trainer weighs it).
    """

    loss: Tensor | None
    logits: Tensor
    attention_loss: Tensor | None = None


def attention_loss(attention: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy between (B, T, P) target distributions over the prefix and the (B, T, P)
    attention a head pays the prefix (renormalised over it), over the positions that have a target (a
    non-zero row); 0 when none has."""
    attention = attention.float()
    attention = attention / attention.sum(-1, keepdim=True).clamp_min(1e-6)
    supervised = targets.sum(-1) > 0  # (B, T)
    if not bool(supervised.any()):
        return attention.sum() * 0.0
    cross_entropy = -(targets * attention.clamp_min(1e-6).log()).sum(-1)  # (B, T)
    return cross_entropy[supervised].mean()


class CaptionModel(nn.Module):
    """Image encoder -> mapping network -> P prefix embeddings -> GPT-2 (optionally with LoRA).

    Args:
        config: The model config.
        tokenizer: The tokenizer; fixes the vocabulary size and the BOS/EOS/padding ids.
        load_pretrained: Load the pretrained encoder/decoder weights the config names. False builds the same
            architecture with random weights and never touches the network or the hub (artifact loading).
        apply_lora: Wrap the decoder with LoRA adapters; None follows ``config.lora.enabled``.

    Attributes:
        config: The resolved config: decoder sizes and vocabulary as actually built.
        tokenizer: The tokenizer.
        preprocess: PIL image -> (3, H, W) pixels, exactly as in training.
        encoder: The image encoder.
        mapping: The mapping network.
        decoder: ``GPT2LMHeadModel``, or a peft ``PeftModel`` around it while LoRA is active.
    """

    decoder: Any  # GPT2LMHeadModel, or peft's PeftModel around it while LoRA is active

    def __init__(
        self,
        config: CaptionConfig,
        tokenizer: CaptionTokenizer,
        *,
        load_pretrained: bool = True,
        apply_lora: bool | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = build_encoder(
            config.encoder.name,
            pretrained=config.encoder.pretrained if load_pretrained else False,
            trainable=config.encoder.trainable,
            colour_cells=config.encoder.colour_cells,
            detail_stride=config.encoder.detail_stride,
        )
        # What the weights were trained with; artifact loading restores the saved one.
        self.preprocess: Preprocess = self.encoder.preprocess
        decoder = _build_decoder(config, tokenizer, load_pretrained)
        g = decoder.config
        self.config = dataclasses.replace(
            config,
            decoder=dataclasses.replace(
                config.decoder,
                n_layer=g.n_layer,
                n_embd=g.n_embd,
                n_head=g.n_head,
                n_positions=g.n_positions,
                vocab_size=g.vocab_size,
            ),
        )
        width = g.n_embd
        if config.mapping.type == "mlp":
            self.mapping: nn.Module = MlpMapping(
                self.encoder.out_channels,
                width,
                config.prefix_len,
                config.mapping.hidden,
                config.mapping.dropout,
                config.mapping.coords,
                config.mapping.order,
            )
        else:
            self.mapping = TransformerMapping(
                self.encoder.out_channels, width, config.prefix_len, config.mapping
            )
        self.decoder = decoder
        if config.lora.enabled if apply_lora is None else apply_lora:
            self.add_lora()

    # ------------------------------------------------------------------------------------ parts

    @property
    def prefix_len(self) -> int:
        return self.config.prefix_len

    @property
    def lora_active(self) -> bool:
        """True while the decoder is wrapped with (unmerged) LoRA adapters."""
        return isinstance(self.decoder, PeftModel)

    @property
    def base_decoder(self) -> GPT2LMHeadModel:
        """The ``GPT2LMHeadModel`` itself (inside the peft wrapper when LoRA is active)."""
        return cast(GPT2LMHeadModel, self.decoder.get_base_model() if self.lora_active else self.decoder)

    def add_lora(self) -> None:
        """Wrap the decoder with LoRA adapters per ``config.lora``; the base decoder's weights freeze."""
        if self.lora_active:
            raise RuntimeError("LoRA adapters are already attached")
        lo = self.config.lora
        peft_config = LoraConfig(
            r=lo.r,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            target_modules=list(lo.target_modules),
            fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
            bias="none",
        )
        self.decoder = get_peft_model(self.decoder, peft_config)

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights (peft ``merge_and_unload``); a no-op without LoRA.

        The merged decoder is a plain ``GPT2LMHeadModel`` with the same outputs and no adapter overhead.
        """
        if self.lora_active:
            self.decoder = self.decoder.merge_and_unload()

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D) decoder input embeddings."""
        return cast(Tensor, self.base_decoder.get_input_embeddings()(input_ids))

    def encode(self, pixels: Tensor | None = None, *, features: Tensor | None = None) -> Tensor:
        """Image -> prefix embeddings.

        Args:
            pixels: (B, 3, H, W) preprocessed images.
            features: (B, C, h, w) encoder grid features computed earlier (e.g. cached for training with a
                frozen encoder), instead of ``pixels``.

        Returns:
            (B, P, D) prefix embeddings.
        """
        if (pixels is None) == (features is None):
            raise ValueError("pass exactly one of pixels or features")
        if features is None:
            features = self.encoder(pixels)  # (B, C, h, w)
        return cast(Tensor, self.mapping(features))  # (B, P, D)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        pixels: Tensor | None = None,
        features: Tensor | None = None,
        attention_targets: Tensor | None = None,
        attention_layer: int = 1,
    ) -> CaptionOutput:
        """Teacher-forced pass and LM loss over the caption tokens.

        Args:
            input_ids: (B, T) ``<bos> tokens <eos> <pad>..`` as :meth:`CaptionTokenizer.batch_encode` builds.
            attention_mask: (B, T), 1 on real tokens, 0 on padding; all ones when omitted.
            labels: (B, T) targets aligned with ``input_ids`` (shifted inside, like Hugging Face), -100 where
                ignored; default ``input_ids`` with padding set to -100. BOS (position 0) and the prefix are
                never targets.
            pixels: (B, 3, H, W) preprocessed images, or
            features: (B, C, h, w) precomputed encoder features.
            attention_targets: (B, T, P) where caption position ``t`` (which predicts token ``t + 1``) should
                look among the P prefix cells, row-major over the prefix grid (all zeros: anywhere); the
                pass then also scores head 0 of decoder layer ``attention_layer`` against them
                (``attention_loss``). It runs the decoder's eager attention, which returns the weights.

        Returns:
            The loss (mean over target tokens), the (B, T, V) caption-position logits and, with
            ``attention_targets``, the attention loss.
        """
        prefix = self.encode(pixels, features=features)  # (B, P, D)
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = torch.cat([prefix, self.embed_tokens(input_ids)], dim=1)  # (B, P + T, D)
        mask = torch.cat(
            [attention_mask.new_ones(batch, prefix.shape[1]), attention_mask], dim=1
        )  # (B, P + T)
        # The LM head runs over the caption positions only: the prefix positions' logits are never used.
        with self._eager_attention(attention_targets is not None):
            out = self.decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                use_cache=False,
                logits_to_keep=input_ids.shape[1],
                output_attentions=attention_targets is not None,
            )
        logits = out.logits  # (B, T, V)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # positions 0..T-2 predict tokens 1..T-1
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        supervised = None
        if attention_targets is not None:
            p = prefix.shape[1]
            head = out.attentions[attention_layer][:, 0, p:, :p]  # (B, T, P) caption positions -> prefix
            if isinstance(self.mapping, MlpMapping) and self.mapping.by_columns:
                attention_targets = attention_targets[:, :, self.mapping.columns]  # as the prefix is laid out
            supervised = attention_loss(head, attention_targets.to(head.device))
        return CaptionOutput(loss=loss, logits=logits, attention_loss=supervised)

    @contextlib.contextmanager
    def _eager_attention(self, eager: bool) -> Iterator[None]:
        """Run the decoder's eager attention inside (the only one that returns its weights)."""
        config = self.decoder.config
        before = config._attn_implementation
        if eager:
            config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = before

    # ---------------------------------------------------------------------------------- decoding

    def step(
        self, inputs_embeds: Tensor, cache: Any | None = None, *, use_cache: bool = True
    ) -> tuple[Tensor, Any | None]:
        """One decoder call, the unit a serving engine replaces with a static-shape version.

        Args:
            inputs_embeds: (N, S, D) embeddings of the positions not yet in ``cache`` (with ``use_cache``),
                or of the whole sequence so far (without).
            cache: The KV cache returned by the previous step (None on the first).
            use_cache: Keep and return a KV cache.

        Returns:
            (N, V) float32 logits for the next token, and the updated cache (None without ``use_cache``).
        """
        out = self.decoder(inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache, logits_to_keep=1)
        return out.logits[:, -1].float(), (out.cache if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor | None = None,
        *,
        features: Tensor | None = None,
        prefix: Tensor | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        min_new_tokens: int | None = None,
        use_cache: bool = True,
    ) -> list[Caption]:
        """Caption a batch of images, greedily or with beam search.

        Arguments left as None take ``config.decoding``'s values (see :class:`DecodingConfig`). Call
        ``model.eval()`` first, as with any inference (dropout would make decoding random).

        Args:
            pixels: (B, 3, H, W) preprocessed images, or
            features: (B, C, h, w) precomputed encoder features, or
            prefix: (B, P, D) prefix embeddings :meth:`encode` computed (the torch runtime keeps them for
                the domain check).
            max_new_tokens: Most tokens generated, EOS included.
            num_beams: 1 = greedy, more = beam search (the best beam is returned).
            length_penalty: Beam score exponent on the length.
            repetition_penalty: > 1 discourages already generated tokens.
            no_repeat_ngram_size: Forbid repeated n-grams of this size (0 = off).
            min_new_tokens: EOS is forbidden before this many tokens.
            use_cache: Reuse keys/values of earlier positions (same tokens, much faster); False recomputes
                the whole sequence each step.

        Returns:
            One :class:`Caption` per image, in order.
        """
        given: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "length_penalty": length_penalty,
            "repetition_penalty": repetition_penalty,
            "no_repeat_ngram_size": no_repeat_ngram_size,
            "min_new_tokens": min_new_tokens,
        }
        settings = dataclasses.replace(
            self.config.decoding, **{k: v for k, v in given.items() if v is not None}
        )
        problems = decoding_problems(settings)
        if problems:
            raise ValueError("; ".join(problems))
        needed = self.prefix_len + 1 + settings.max_new_tokens
        if needed > self.config.decoder.n_positions:
            raise ValueError(
                f"prefix + BOS + max_new_tokens = {needed} exceeds decoder.n_positions "
                f"({self.config.decoder.n_positions})"
            )
        if prefix is None:
            prefix = self.encode(pixels, features=features)  # (B, P, D)
        elif pixels is not None or features is not None:
            raise ValueError("pass exactly one of pixels, features or prefix")
        bos = torch.full((prefix.shape[0], 1), self.tokenizer.bos_id, dtype=torch.long, device=prefix.device)
        prompt = torch.cat([prefix, self.embed_tokens(bos)], dim=1)  # (B, P + 1, D)
        if settings.num_beams == 1:
            results = self._greedy(prompt, settings, use_cache)
        else:
            results = self._beam_search(prompt, settings, use_cache)
        special = self._special_tokens()
        return [make_caption(ids, s, n, special, self.tokenizer.decode) for ids, s, n in results]

    def _special_tokens(self) -> SpecialTokens:
        tok = self.tokenizer
        return SpecialTokens(tok.bos_id, tok.eos_id, tok.pad_id)

    def _process_logits(self, logits: Tensor, generated: Tensor, settings: DecodingConfig) -> Tensor:
        """Repetition penalty, then :func:`mask_logits`, on (N, V) logits (a copy)."""
        logits = logits.clone()
        if settings.repetition_penalty != 1.0 and generated.shape[1]:
            seen = logits.gather(1, generated)  # (N, t)
            seen = torch.where(
                seen > 0, seen / settings.repetition_penalty, seen * settings.repetition_penalty
            )
            logits.scatter_(1, generated, seen)
        mask_logits(logits, generated, self._special_tokens(), settings)
        return logits

    def _advance(
        self, token_ids: Tensor, cache: Any | None, sequence: Tensor, use_cache: bool
    ) -> tuple[Tensor, Any | None, Tensor]:
        """Feed (N,) new tokens; returns (N, V) next logits, cache, and the (N, S, D) sequence so far."""
        new = self.embed_tokens(token_ids[:, None])  # (N, 1, D)
        if use_cache:
            logits, cache = self.step(new, cache)
            return logits, cache, sequence
        sequence = torch.cat([sequence, new], dim=1)  # (N, S + 1, D)
        logits, _ = self.step(sequence, None, use_cache=False)
        return logits, None, sequence

    def _greedy(self, prompt: Tensor, settings: DecodingConfig, use_cache: bool) -> Decoded:
        """Batched greedy decoding.

        Every row's prompt has the same length (P prefix embeddings + BOS), so rows stay aligned with no
        attention mask or left padding; a row that emitted EOS is fed padding from then on, and since
        attention never crosses rows, that padding cannot change the other rows' tokens.
        """
        batch, device = prompt.shape[0], prompt.device
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        logits, cache = self.step(prompt, None, use_cache=use_cache)  # (B, V)
        sequence = prompt
        generated = torch.empty((batch, 0), dtype=torch.long, device=device)  # (B, t)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        logprob_sum = torch.zeros(batch, device=device)  # raw log-probs of the chosen tokens
        n_scored = torch.zeros(batch, dtype=torch.long, device=device)
        for t in range(settings.max_new_tokens):
            raw = torch.log_softmax(logits, dim=-1)  # (B, V) the model's own distribution
            nxt = self._process_logits(logits, generated, settings).argmax(dim=-1)  # (B,)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            live = ~finished
            logprob_sum += torch.where(live, raw.gather(1, nxt[:, None])[:, 0], 0.0)
            n_scored += live.long()
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            finished |= nxt == eos
            if bool(finished.all()) or t + 1 == settings.max_new_tokens:  # no step for a token never chosen
                break
            logits, cache, sequence = self._advance(nxt, cache, sequence, use_cache)
        return [
            (until_eos(row, eos), float(s), int(n))
            for row, s, n in zip(generated.tolist(), logprob_sum.tolist(), n_scored.tolist(), strict=True)
        ]

    def _beam_search(self, prompt: Tensor, settings: DecodingConfig, use_cache: bool) -> Decoded:
        """Batched beam search (K beams per image); each image stops on its own (see :class:`BeamBook`)."""
        batch, k, device = prompt.shape[0], settings.num_beams, prompt.device
        logits, cache = self.step(prompt, None, use_cache=use_cache)  # (B, V)
        expand = torch.arange(batch, device=device).repeat_interleave(k)  # (B*K,) each image K times
        logits, sequence = logits[expand], prompt[expand]
        if cache is not None:
            cache.reorder_cache(expand)
        vocab = logits.shape[-1]
        # Only the first copy of each image is live at the start, so the K beams begin distinct.
        beam_scores = torch.full((batch, k), -math.inf, device=device)
        beam_scores[:, 0] = 0.0
        beam_scores = beam_scores.view(-1)  # (B*K,)
        raw_sums = torch.zeros(batch * k, device=device)  # raw log-prob sums, for the confidence
        generated = torch.empty((batch * k, 0), dtype=torch.long, device=device)  # (B*K, t)
        book = BeamBook(batch, self._special_tokens(), settings)
        for step in range(settings.max_new_tokens):
            raw = torch.log_softmax(logits, dim=-1)  # (B*K, V)
            processed = torch.log_softmax(self._process_logits(logits, generated, settings), dim=-1)
            candidates = (beam_scores[:, None] + processed).view(batch, k * vocab)  # (B, K*V)
            top_scores, top_index = candidates.topk(2 * k, dim=1)  # (B, 2K): enough to find K without EOS
            top_raw = (raw_sums[:, None] + raw).view(batch, k * vocab).gather(1, top_index)  # (B, 2K)
            src_rows = (top_index // vocab + torch.arange(batch, device=device)[:, None] * k).tolist()
            beams = book.step(
                step + 1,
                generated,
                src_rows,
                (top_index % vocab).tolist(),
                top_scores.tolist(),
                top_raw.tolist(),
            )
            if book.all_done:
                break
            rows_l, tokens_l, scores_l, raws_l = zip(*beams, strict=True)
            rows = torch.tensor(rows_l, dtype=torch.long, device=device)  # (B*K,) source beam of each
            new_tokens = torch.tensor(tokens_l, dtype=torch.long, device=device)  # (B*K,)
            generated = torch.cat([generated[rows], new_tokens[:, None]], dim=1)
            beam_scores = torch.tensor(scores_l, device=device)
            raw_sums = torch.tensor(raws_l, device=device)
            if cache is not None:
                cache.reorder_cache(rows)
            else:
                sequence = sequence[rows]
            if step + 1 < settings.max_new_tokens:
                logits, cache, sequence = self._advance(new_tokens, cache, sequence, use_cache)
        return book.best(generated, beam_scores.tolist(), raw_sums.tolist())


# ============================================================================================ builders


def _build_decoder(
    config: CaptionConfig, tokenizer: CaptionTokenizer, load_pretrained: bool
) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: ``from_pretrained`` when configured (and allowed), else from the config's sizes."""
    d = config.decoder
    specials: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    dropout: dict[str, Any] = {"resid_pdrop": d.dropout, "embd_pdrop": d.dropout, "attn_pdrop": d.dropout}
    if d.pretrained is not None and load_pretrained:
        try:
            model = GPT2LMHeadModel.from_pretrained(d.pretrained, **dropout, **specials)
        except OSError as exc:
            raise OSError(
                f"could not load GPT-2 weights from {d.pretrained!r} (not a local folder, and the hub is "
                "unreachable or has no such model); set decoder.pretrained=null to train from scratch"
            ) from exc
    else:
        vocab_size = d.vocab_size or tokenizer.vocab_size
        gpt2_config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=d.n_positions,
            n_embd=d.n_embd,
            n_layer=d.n_layer,
            n_head=d.n_head,
            activation_function=d.activation,
            **dropout,
            **specials,
        )
        model = GPT2LMHeadModel(gpt2_config)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but the decoder only {model.config.vocab_size}: "
            "a pretrained decoder needs its own tokenizer"
        )
    return model


def build_tokenizer(config: CaptionConfig, captions: Iterable[str] | None = None) -> CaptionTokenizer:
    """The tokenizer a config asks for.

    Args:
        config: The model config.
        captions: Training captions; required when a byte-level BPE is to be trained (no pretrained
            tokenizer or decoder configured).

    Returns:
        GPT-2's tokenizer from ``tokenizer.pretrained`` (or, when unset, ``decoder.pretrained``), or a BPE
        trained on ``captions``.

    Raises:
        ValueError: A BPE must be trained but no captions were given.
    """
    source = config.tokenizer.pretrained or config.decoder.pretrained
    if source is not None:
        return CaptionTokenizer.from_pretrained(source)
    if captions is None:
        raise ValueError("no pretrained tokenizer configured: pass the training captions to train one")
    return CaptionTokenizer.train(captions, config.tokenizer.vocab_size, config.tokenizer.min_frequency)


def build_caption_model(
    config: CaptionConfig, captions: Iterable[str] | None = None
) -> tuple[CaptionModel, CaptionTokenizer]:
    """Tokenizer and model for a fresh training run (pretrained parts loaded as configured)."""
    tokenizer = build_tokenizer(config, captions)
    return CaptionModel(config, tokenizer), tokenizer
