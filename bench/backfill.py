"""Backfill benchmark: the Ray Data backfill against the same images sent one by one to ``/v1/analyze``.

What it does, in one run on one machine, on the ``production`` models of one registry:

1. Writes ``--images`` synthetic-scene JPEGs to a folder.
2. Baseline: starts ``snap2caption serve captioner``, ``detector`` and ``gateway`` as their own processes
   on free loopback ports and sends every image to the gateway's ``/v1/analyze`` (all four features), one
   request at a time, waiting for each answer (what a script without the backfill would do), after a
   warm-up; then stops them.
3. Backfill: ``run_backfill`` on the same folder (local Ray, all four features), into a fresh folder.
4. Prints both rates and their ratio. The backfill's rate is given over its whole run (Ray's start
   excluded, actor start and model loading included) and once its first batch came back. Writes them with
   the machine, load average, versions and arguments to a JSON result
   (``bench/results/backfill-<UTC time>.json``, or ``--out``).

Example::

    .venv/bin/python bench/backfill.py --tracking-uri sqlite:///var/mlflow/mlflow.db --images 200
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_json import BenchRecord, add_out_argument
from serving import free_port, synth_images


def gateway_rate(images: list[bytes], workdir: Path, warmup: int) -> tuple[float, dict[str, int]]:
    """Images/s of ``/v1/analyze`` one request at a time, and the failed answers and missing features by
    reason."""
    from snap2caption.launcher import ServiceSpec, start_services, stop_services

    ports = {name: free_port() for name in ("captioner", "detector", "gateway")}
    specs = [
        ServiceSpec("captioner", ports["captioner"]),
        ServiceSpec("detector", ports["detector"]),
        ServiceSpec(
            "gateway",
            ports["gateway"],
            env=(
                ("SNAP2CAPTION_GATEWAY_CAPTIONER_URL", f"http://127.0.0.1:{ports['captioner']}"),
                ("SNAP2CAPTION_GATEWAY_DETECTOR_URL", f"http://127.0.0.1:{ports['detector']}"),
                ("SNAP2CAPTION_GATEWAY_DATABASE_URL", f"sqlite:///{workdir / 'gateway.db'}"),
                ("SNAP2CAPTION_GATEWAY_RATE_LIMIT_PER_S", "100000"),
            ),
        ),
    ]
    running = start_services(specs, workdir / "logs")
    try:
        url = next(svc.spec.url for svc in running if svc.spec.name == "gateway")
        with httpx.Client(base_url=url, timeout=60) as client:
            post = {"headers": {"content-type": "image/jpeg"}}
            for data in images[:warmup]:
                client.post("/v1/analyze", content=data, **post)
            failures: Counter[str] = Counter()
            start = time.perf_counter()
            for data in images:
                answer = client.post("/v1/analyze", content=data, **post)
                body = answer.json()
                if answer.status_code != 200:
                    failures[f"{answer.status_code} {body.get('error', {}).get('code')}"] += 1
                for error in body.get("errors") or []:  # a feature the answer lacks, and why
                    failures[f"{error.get('feature')}: {error.get('code')}"] += 1
            seconds = time.perf_counter() - start
    finally:
        stop_services(running)
    return len(images) / seconds, dict(failures)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its figures and write its JSON result.

    Returns:
        The figures written (``gateway``, ``backfill``, ``ratio``).
    """
    record = BenchRecord("backfill")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", default=None, help="Registry [$MLFLOW_TRACKING_URI, else var/].")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="Gateway requests before timing.")
    parser.add_argument("--batch-size", type=int, default=16)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from snap2caption.backfill import BackfillConfig, run_backfill
    from snap2caption.backfill.stages import ModelOptions
    from snap2caption.registry import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    os.environ.update({"MLFLOW_TRACKING_URI": uri, "SNAP2CAPTION_LOG_LEVEL": "WARNING"})
    workdir = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    os.environ["SNAP2CAPTION_HOME"] = str(workdir / "home")
    try:
        images, _ = synth_images(workdir / "synth", args.images)
        folder = workdir / "synth" / "images"

        rate, failed = gateway_rate(images, workdir, args.warmup)
        print(f"gateway /v1/analyze, one at a time: {rate:.2f} images/s (failures: {failed or 'none'})",
              flush=True)  # fmt: skip

        config = BackfillConfig(
            folder, workdir / "out", options=ModelOptions(tracking_uri=uri), batch_size=args.batch_size,
            progress=False,
        )  # fmt: skip
        summary = run_backfill(config)
        print(f"backfill (Ray Data, local): {summary.done} done, {summary.quarantined} quarantined, "
              f"{summary.images_per_s:.2f} images/s over {summary.seconds:.1f} s, "
              f"{summary.steady_images_per_s:.2f} images/s after the first batch")  # fmt: skip
        print(f"models: {summary.models}")
        print(f"ratio backfill / gateway: {summary.images_per_s / rate:.2f}x whole run, "
              f"{summary.steady_images_per_s / rate:.2f}x after the first batch")  # fmt: skip
        figures = {
            "gateway": {"images_per_s": rate, "failed": failed, "images": len(images)},
            "backfill": {
                "done": summary.done,
                "quarantined": summary.quarantined,
                "seconds": summary.seconds,
                "images_per_s": summary.images_per_s,
                "steady_images_per_s": summary.steady_images_per_s,
                "models": summary.models,
            },
            "ratio": {
                "whole_run": summary.images_per_s / rate,
                "after_first_batch": summary.steady_images_per_s / rate,
            },
        }
        record.write(figures, config={**vars(args), "tracking_uri": uri}, out=args.out)
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
