"""A caption artifact on ONNX Runtime alone: no torch, no transformers in the process.

The ``onnx`` and ``onnx-int8`` caption runtimes. It reads what :func:`~snap2caption.models.caption.export.
export_onnx` put in the artifact (``onnx/encoder.onnx``, ``onnx/decoder.onnx``, optionally the int8 decoder
``onnx/decoder.int8.onnx``), the tokenizer, ``config.json`` (preprocessing, sizes, decoding defaults) and one
tensor of ``model.safetensors``, the token embeddings, read with NumPy. Decoding is
:func:`snap2caption.models.caption.decoding.generate_numpy`, the NumPy twin of ``CaptionModel.generate``.

Why: ``import torch`` + transformers cost about 700 MB of resident memory per process (measured: 46 MB for
onnxruntime, +480 MB torch, +240 MB transformers), more than the model itself; the starter services must fit
in 2 GiB together.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.caption.calibration import calibrate, read_calibration
from snap2caption.models.caption.decoding import (
    Caption,
    DecodingConfig,
    SpecialTokens,
    decoding_problems,
    generate_numpy,
    make_caption,
)
from snap2caption.models.caption.domain import read_domain, with_domain
from snap2caption.models.caption.files import (
    DECODER_FILE,
    DECODER_INT8_FILE,
    ENCODER_FILE,
    ONNX_FORMAT,
    WEIGHTS_FILE,
    image_max_side,
    read_artifact_info,
)
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.models.caption.views import caption_views, flip_pixels

if TYPE_CHECKING:
    import onnxruntime

    from snap2caption.models.providers import OrtProviders

_WTE_SUFFIX = "transformer.wte.weight"

# (L, N, H, T, D/H) keys and values
Cache = tuple[np.ndarray, np.ndarray]


class OrtCaptioner:
    """A :class:`~snap2caption.models.caption.runtimes.Captioner` on ONNX Runtime: encoder + decoder
    sessions, token embeddings, tokenizer and decoding defaults of one artifact.

    Args:
        folder: A caption artifact folder with an ONNX export (verify it first: ``verify_manifest``).
        threads: Intra-op threads per session.
        int8: Use the dynamically quantized decoder (``snap2caption export caption --int8``).
        providers: ONNX Runtime execution providers of both sessions (default:
            ``SNAP2CAPTION_ORT_PROVIDERS``, ``auto``; the decoder never on TensorRT); :attr:`providers`
            says what each session got.

    Raises:
        ArtifactError: No readable ``config.json`` of a caption artifact, a broken ``domain.json``, or
            a malformed ``calibration.json``.
        ValueError: No ONNX export (or no int8 decoder when asked), or files that do not match
            ``config.json``.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """

    def __init__(
        self,
        folder: str | Path,
        threads: int = 1,
        int8: bool = False,
        providers: OrtProviders | None = None,
    ) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        info = read_artifact_info(folder)
        model = info["model"]
        self.runtime = "onnx-int8" if int8 else "onnx"
        self.image_max_side = image_max_side(info)
        self.calibration = read_calibration(folder)
        self.tokenizer = CaptionTokenizer.load(folder)
        if self.tokenizer.describe() != info["tokenizer"]:
            raise ValueError(f"{folder}: tokenizer {self.tokenizer.describe()} does not match config.json")
        self.preprocess = Preprocess.from_dict(info["preprocess"])
        self.decoding = DecodingConfig(**model["decoding"])
        self.prefix_len = int(model["prefix_len"])
        self.n_positions = int(model["decoder"]["n_positions"])
        with safe_open(str(folder / WEIGHTS_FILE), framework="np") as weights:
            (key,) = [k for k in weights.keys() if k.endswith(_WTE_SUFFIX)]  # noqa: SIM118 (not a dict)
            self.wte = np.ascontiguousarray(weights.get_tensor(key), dtype=np.float32)  # (V, D)
        self.sizes = {
            "prefix_len": self.prefix_len,
            "n_layer": int(model["decoder"]["n_layer"]),
            "n_head": int(model["decoder"]["n_head"]),
            "n_embd": int(self.wte.shape[1]),
            "vocab_size": int(self.wte.shape[0]),
            "crop": self.preprocess.crop,
        }
        self.encoder, self.decoder = open_sessions(
            folder, self.sizes, threads=threads, int8=int8, providers=providers
        )
        self.providers = {"encoder": self.encoder.get_providers(), "decoder": self.decoder.get_providers()}
        self.special = SpecialTokens(self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id)
        self.domain = read_domain(folder)

    @property
    def max_new_tokens_limit(self) -> int:
        """Most new tokens the decoder's positions allow after the prefix and BOS."""
        return self.n_positions - self.prefix_len - 1

    def generate(
        self, pixels: np.ndarray, *, max_new_tokens: int | None = None, num_beams: int | None = None
    ) -> list[Caption]:
        """Caption (B, 3, H, W) float32 preprocessed images; arguments left None take the model's defaults.

        Raises:
            ValueError: Settings out of range, or longer than the decoder's positions allow.
        """
        given: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        settings = dataclasses.replace(self.decoding, **{k: v for k, v in given.items() if v is not None})
        problems = decoding_problems(settings)
        if settings.max_new_tokens > self.max_new_tokens_limit:
            problems.append(f"max_new_tokens must be <= {self.max_new_tokens_limit} for this model")
        if problems:
            raise ValueError("; ".join(problems))
        captions, prefix = self._decode(pixels, settings)

        def decode_view(view: int, rows: list[int]) -> list[Caption]:
            return self._decode(flip_pixels(pixels[rows], view), settings)[0]

        captions = caption_views(captions, decode_view, settings.views, settings.views_below)
        return with_domain(calibrate(captions, self.calibration), prefix, self.domain)

    def _decode(self, pixels: np.ndarray, settings: DecodingConfig) -> tuple[list[Caption], np.ndarray]:
        """One view: the uncalibrated captions, and the (B, P, D) prefix."""
        (prefix,) = self.encoder.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})  # (B, P, D)
        bos = np.broadcast_to(self.wte[self.special.bos], (prefix.shape[0], 1, prefix.shape[2]))
        prompt = np.concatenate([prefix, bos], axis=1)  # (B, P + 1, D)
        results = generate_numpy(prompt, self, self.special, settings)
        return [make_caption(ids, s, n, self.special, self.tokenizer.decode) for ids, s, n in results], prefix

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(N,) token ids -> (N, 1, D) embeddings."""
        return self.wte[ids][:, None, :]

    def reorder(self, cache: Cache, rows: np.ndarray) -> Cache:
        """Pick (and repeat) batch rows of the cache: axis 1 of (L, N, H, T, D/H)."""
        return np.ascontiguousarray(cache[0][:, rows]), np.ascontiguousarray(cache[1][:, rows])

    def step(self, embeds: np.ndarray, cache: Cache | None) -> tuple[np.ndarray, Cache]:
        """One decoder call: (N, S, D) new positions (+ the past) -> (N, V) last logits, the grown cache."""
        if cache is None:
            s = self.sizes
            shape = (s["n_layer"], embeds.shape[0], s["n_head"], 0, s["n_embd"] // s["n_head"])
            empty = np.zeros(shape, np.float32)
            cache = (empty, empty)
        logits, keys, values = self.decoder.run(
            None,
            {
                "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                "past_keys": cache[0],
                "past_values": cache[1],
            },
        )
        return logits, (keys, values)


def open_sessions(
    folder: Path,
    sizes: dict[str, int],
    *,
    threads: int = 1,
    int8: bool = False,
    providers: OrtProviders | None = None,
) -> tuple[onnxruntime.InferenceSession, onnxruntime.InferenceSession]:
    """The encoder and decoder sessions of an artifact's ONNX export, checked against the model's sizes.

    Raises:
        ValueError: A file is missing (``int8``: the int8 decoder), or an export of another model.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """
    from snap2caption.models.onnx_io import decoder_session_options, ort_session, session_metadata

    decoder_file = DECODER_INT8_FILE if int8 else DECODER_FILE
    for name in (ENCODER_FILE, decoder_file):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name} (snap2caption export caption{' --int8' * int8})")
    from snap2caption.models.providers import OrtProviders

    providers = providers or OrtProviders.from_env()
    encoder = ort_session(folder / ENCODER_FILE, threads=threads, providers=providers)
    # Never TensorRT: the KV cache's length changes at every step (snap2caption.models.providers).
    decoder_providers = dataclasses.replace(providers, tensorrt=False)
    decoder = ort_session(
        folder / decoder_file, options=decoder_session_options(threads), providers=decoder_providers
    )
    for session, part in ((encoder, "encoder"), (decoder, "decoder")):
        metadata = session_metadata(session)
        found = {k: json.loads(metadata[k]) for k in sizes if k in metadata}
        expected = metadata.get("snap2caption.format") == ONNX_FORMAT and metadata.get("part") == part
        if not expected or found != sizes:
            raise ValueError(
                f"{folder}: ONNX {part} does not fit config.json: {found} does not match {sizes}"
            )
    return encoder, decoder
