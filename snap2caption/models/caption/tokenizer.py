"""The caption tokenizer: byte-level BPE (Hugging Face ``tokenizers``), trained on the corpus or GPT-2's own.

Two special-token schemes are recognised, from the tokens the vocabulary holds:

- trained here: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the 256 byte symbols and the merges;
- GPT-2's tokenizer: ``<|endoftext|>`` is BOS, EOS and padding at once (padding positions are masked by the
  attention mask, never by id, so sharing the id is safe).

A caption is fed to the decoder as ``<bos> tokens... <eos>`` after the image prefix; :meth:`batch_encode`
builds that layout. The pre-tokenizer adds no leading space and :meth:`decode` strips the ends, so
``decode(encode(text)) == text`` for any text without surrounding whitespace: normalised captions round-trip
exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # torch only for batch_encode (training): the ONNX serving path runs without it
    import torch

TOKENIZER_FILE = "tokenizer.json"

# (pad, bos, eos) token strings of each recognised scheme, tried in order.
_SCHEMES: tuple[tuple[str, str, str], ...] = (
    ("<pad>", "<bos>", "<eos>"),
    ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
)
_TRAINED_SPECIALS = ["<pad>", "<bos>", "<eos>"]


class CaptionTokenizer:
    """A byte-level BPE tokenizer with BOS/EOS/padding ids, shared by training, export and serving.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` whose vocabulary holds one of the recognised special-token
            schemes (see the module docstring).

    Raises:
        ValueError: The vocabulary holds neither special-token scheme.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        for pad, bos, eos in _SCHEMES:
            pad_id, bos_id, eos_id = (tokenizer.token_to_id(tok) for tok in (pad, bos, eos))
            if pad_id is not None and bos_id is not None and eos_id is not None:
                self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
                self.special_tokens = (pad, bos, eos)
                return
        raise ValueError(
            "tokenizer has no recognised special tokens: expected <pad>/<bos>/<eos> (trained here) "
            "or <|endoftext|> (GPT-2)"
        )

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, min_frequency: int = 2) -> CaptionTokenizer:
        """Train a byte-level BPE on captions.

        Args:
            captions: Training captions, already normalised.
            vocab_size: Upper bound on the vocabulary (specials + 256 bytes + merges); training stops
                earlier when no pair is frequent enough, which a small templated corpus reaches quickly.
            min_frequency: A pair must occur this often to be merged.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: ``vocab_size`` cannot hold the specials and the byte alphabet.
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(_TRAINED_SPECIALS):
            raise ValueError(
                f"vocab_size {vocab_size} is below the {len(alphabet) + len(_TRAINED_SPECIALS)} "
                "byte symbols and special tokens"
            )
        tok = _byte_level(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=_TRAINED_SPECIALS,
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike[str]) -> CaptionTokenizer:
        """Load GPT-2's tokenizer (or any compatible byte-level BPE) from a local folder or a hub id.

        A local folder may hold ``tokenizer.json`` or GPT-2's ``vocab.json`` + ``merges.txt``. Anything else
        is taken as a hub id and fetched over the network, which only happens when a config names one.

        Args:
            name_or_dir: A local folder, or a hub id such as ``"gpt2-medium"``.

        Returns:
            The tokenizer.

        Raises:
            OSError: Not a usable local folder, and the hub could not provide it.
        """
        path = Path(name_or_dir)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                return cls(Tokenizer.from_file(str(path / TOKENIZER_FILE)))
            vocab, merges = path / "vocab.json", path / "merges.txt"
            if vocab.is_file() and merges.is_file():
                return cls(_byte_level(Tokenizer(models.BPE.from_file(str(vocab), str(merges)))))
            raise OSError(f"{path} holds neither {TOKENIZER_FILE} nor vocab.json + merges.txt")
        try:
            return cls(Tokenizer.from_pretrained(str(name_or_dir)))
        except Exception as exc:  # the hub client raises several types; one clear error here
            raise OSError(
                f"could not load tokenizer {str(name_or_dir)!r}: not a local folder and the hub is "
                "unreachable or has no such repository (offline, leave the tokenizer and decoder "
                "`pretrained` unset to train one on the captions)"
            ) from exc

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CaptionTokenizer:
        """Load a tokenizer written by :meth:`save` (``<directory>/tokenizer.json``)."""
        return cls(Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE)))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    # ------------------------------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; special tokens are dropped."""
        as_list = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor or an array, or ints
        return str(self.tokenizer.decode(as_list, skip_special_tokens=True)).strip()

    def batch_encode(self, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions as decoder inputs: ``<bos> tokens <eos>``, right-padded.

        Args:
            captions: Captions to encode.
            max_tokens: Caption tokens kept per caption (BOS and EOS come on top); longer captions are
                truncated and still end with EOS.

        Returns:
            ``(input_ids, attention_mask)``, both ``(B, T)`` int64 with ``T = longest + 2``; the mask is 1 on
            BOS, caption tokens and EOS and 0 on padding.
        """
        import torch

        rows = [[self.bos_id, *self.encode(c)[:max_tokens], self.eos_id] for c in captions]
        width = max((len(r) for r in rows), default=2)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def describe(self) -> dict[str, int]:
        """Ids that a saved model depends on; stored with an artifact and checked on load."""
        return {
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    def __repr__(self) -> str:
        return f"CaptionTokenizer({json.dumps(self.describe())})"


def _byte_level(tok: Tokenizer) -> Tokenizer:
    """Give ``tok`` GPT-2's byte-level pre-tokenizer and decoder (no added leading space)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
