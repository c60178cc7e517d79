"""CPU latency of the detector and the tagger: PyTorch vs ONNX Runtime (float32, and int8 where exported).

Measures what a service call costs per image, end to end in-process: preprocessing (letterbox / resize +
crop), the network, post-processing (NMS / tags). Batch 1 and 8 by default, a fixed intra-op thread count
for both runtimes, warm-up first, median of the timed repeats. Prints ms per image and the ratio of each
runtime to PyTorch measured in the same run, and writes them with the machine, load average, versions and
arguments to a JSON result (``bench/results/models-<UTC time>.json``, or ``--out``).

    python bench/models.py --detector DIR --tagger DIR [--data data/processed] [--threads 2] [--repeats 20]

DIR is an artifact folder (``snap2caption export detector|tagger`` output, or a registry download).

Threads default to 1: on the shared 2-core machines this project runs on, torch with 2 intra-op threads
was measured 10-30x slower than with 1 whenever another process held a core (OpenMP workers spin at every
barrier), which would make any ratio against PyTorch meaningless. Pass ``--threads 2`` on idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_json import BenchRecord, add_out_argument


def _images_from(data: Path | None, count: int) -> list[Image.Image]:
    if data is not None and (data / "images" / "test").is_dir():
        files = sorted((data / "images" / "test").glob("*.jpg"))[:count]
        return [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(count)]


def _photos(count: int) -> list[Image.Image]:
    from training.tagger.photos import PHOTOS, extra_images

    images = [p.image() for p in PHOTOS] + extra_images()
    return (images * (count // len(images) + 1))[:count]


def _ms_per_image(fn: Callable[[Sequence[Image.Image]], object], images: list[Image.Image], batch: int,
                  repeats: int) -> float:  # fmt: skip
    chunk = images[:batch]
    for _ in range(3):
        fn(chunk)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(chunk)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch


def _report(model: str, rows: dict[str, dict[int, float]], batches: Sequence[int]) -> dict[str, Any]:
    """Print one model's table; return it as figures: ms per image and the ratio to PyTorch, by batch."""
    base = rows["pytorch"]
    print(f"\n{model}")
    print(f"{'runtime':<12}" + "".join(f"{f'batch {b} ms/img':>18}{'vs torch':>10}" for b in batches))
    for runtime, values in rows.items():
        cells = "".join(f"{values[b]:>18.2f}{base[b] / values[b]:>9.2f}x" for b in batches)
        print(f"{runtime:<12}{cells}")
    return {
        "model": model,
        "ms_per_image": {runtime: {str(b): values[b] for b in batches} for runtime, values in rows.items()},
        "vs_pytorch": {
            runtime: {str(b): base[b] / values[b] for b in batches} for runtime, values in rows.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and write its JSON result.

    Returns:
        The figures written: per model asked for (``detector``, ``tagger``), ms per image by runtime and
        batch, and the ratios to PyTorch.
    """
    record = BenchRecord("models")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detector", type=Path, help="Detector artifact folder.")
    parser.add_argument("--tagger", type=Path, help="Tagger artifact folder.")
    parser.add_argument(
        "--data", type=Path, default=Path("data/processed"), help="ETL output (detector images)."
    )
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads for torch and ORT.")
    parser.add_argument("--batches", default="1,8", help="Comma-separated batch sizes.")
    parser.add_argument("--repeats", type=int, default=20)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} (torch intra-op and ORT intra_op_num_threads), repeats={args.repeats}, "
          f"median; per image, preprocessing + network + post-processing")  # fmt: skip
    figures: dict[str, Any] = {}

    if args.detector:
        from snap2caption.models import detector
        from snap2caption.models.detector.config import INT8_ONNX_FILE

        images = _images_from(args.data, max(batches))
        runtimes = {
            "pytorch": detector.load(args.detector, "torch"),
            "ort-fp32": detector.load(args.detector, "onnx", threads=args.threads),
        }
        if (args.detector / INT8_ONNX_FILE).is_file():
            runtimes["ort-int8"] = detector.load(args.detector, "onnx", int8=True, threads=args.threads)
        rows = {
            name: {b: _ms_per_image(lambda x, d=det: d.detect(x), images, b, args.repeats) for b in batches}
            for name, det in runtimes.items()
        }
        figures["detector"] = _report(
            f"detector ({runtimes['pytorch'].config.model}, {runtimes['pytorch'].imgsz} px)", rows, batches
        )

    if args.tagger:
        from snap2caption.models import tagger
        from snap2caption.models.tagger.config import INT8_ONNX_FILE as TAGGER_INT8

        photos = _photos(max(batches))
        taggers: dict[str, Callable[[Sequence[Image.Image]], object]] = {
            "pytorch": tagger.load(args.tagger, "torch").tag,
            "ort-fp32": tagger.load(args.tagger, "onnx", threads=args.threads).tag,
        }
        if (args.tagger / TAGGER_INT8).is_file():
            taggers["ort-int8"] = tagger.load(args.tagger, "onnx", int8=True, threads=args.threads).tag
        rows = {
            name: {b: _ms_per_image(fn, photos, b, args.repeats) for b in batches}
            for name, fn in taggers.items()
        }
        figures["tagger"] = _report("tagger (EfficientNet-Lite0, 224 px)", rows, batches)
    record.write(figures, config=vars(args), out=args.out)
    return figures


if __name__ == "__main__":
    main()
