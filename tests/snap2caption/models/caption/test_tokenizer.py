"""CaptionTokenizer: training, exact round trips, the decoder input layout, save/load, GPT-2's scheme."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from snap2caption.models.caption.tokenizer import CaptionTokenizer

CAPTIONS = [
    "a red circle in the top left corner",
    "two blue squares next to a green triangle",
    "a small yellow star above a large purple hexagon",
    "three orange crosses on a grey background",
    "a green triangle to the right of a red circle",
]


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=320, min_frequency=1)


def test_special_ids_and_merges(tok: CaptionTokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < len(tok) <= 320  # bytes + specials + some merges
    ids = tok.encode("a red circle")
    assert len(ids) < len("a red circle")  # merges learnt from the corpus are used
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)


@pytest.mark.parametrize(
    "text", [*CAPTIONS, "a caption with unseen words: zebra, quokka!", "café, naïve, 東京 and 😀", "x"]
)
def test_round_trip_is_exact(tok: CaptionTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_decode_drops_specials(tok: CaptionTokenizer) -> None:
    ids = tok.encode("a red circle")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "a red circle"


def test_batch_encode_layout(tok: CaptionTokenizer) -> None:
    short, long = "a red circle", "two blue squares next to a green triangle"
    input_ids, mask = tok.batch_encode([short, long], max_tokens=64)
    n_short, n_long = len(tok.encode(short)), len(tok.encode(long))
    assert input_ids.shape == mask.shape == (2, n_long + 2)
    assert input_ids[:, 0].tolist() == [tok.bos_id, tok.bos_id]
    assert input_ids[0, n_short + 1] == tok.eos_id and input_ids[1, -1] == tok.eos_id
    assert mask[0].tolist() == [1] * (n_short + 2) + [0] * (n_long - n_short)
    assert (input_ids[0, n_short + 2 :] == tok.pad_id).all()
    assert tok.decode(input_ids[0]) == short

    truncated, mask = tok.batch_encode([long], max_tokens=3)
    assert truncated.shape == (1, 5) and mask.all()
    assert truncated[0, -1] == tok.eos_id  # still terminated


def test_save_load_identical(tok: CaptionTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "t")
    assert path.name == "tokenizer.json"
    again = CaptionTokenizer.load(tmp_path / "t")
    assert again.describe() == tok.describe()
    for text in CAPTIONS:
        assert again.encode(text) == tok.encode(text)


def test_vocab_too_small_refused() -> None:
    with pytest.raises(ValueError, match="byte symbols"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=100)


def test_gpt2_scheme_from_local_vocab_and_merges(tmp_path: Path) -> None:
    # A GPT-2-style folder: vocab.json + merges.txt with the single <|endoftext|> special token.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        CAPTIONS,
        trainers.BpeTrainer(
            vocab_size=300,
            min_frequency=1,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    raw.model.save(str(tmp_path))
    tok = CaptionTokenizer.from_pretrained(tmp_path)
    assert tok.pad_id == tok.bos_id == tok.eos_id == raw.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode(CAPTIONS[1])) == CAPTIONS[1]
    _, mask = tok.batch_encode(["a red circle", CAPTIONS[1]], max_tokens=64)
    assert mask[0].sum() < mask[1].sum()  # padding is told apart by the mask, not by id


def test_unrecognised_specials_refused() -> None:
    raw = Tokenizer(models.BPE())
    raw.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=50, special_tokens=["[CLS]"]))
    with pytest.raises(ValueError, match="special tokens"):
        CaptionTokenizer(raw)


def test_missing_local_folder_contents(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"tokenizer\.json"):
        CaptionTokenizer.from_pretrained(tmp_path)
