"""System benchmark: the starter services through real HTTP, each endpoint and the gateway's /v1/analyze.

What it does, in one run on one machine:

1. Starts ``snap2caption serve captioner``, ``detector``, ``gateway`` and ``etl`` as their own processes on
   free loopback ports, serving the ``production`` models of the registry under ``--home`` (what
   ``snap2caption up`` builds: ``var/`` by default), with their default settings (ONNX Runtime where the
   artifacts carry it).
2. Baseline, in this process: the same caption model through Hugging Face ``generate`` (PyTorch eager,
   greedy, one image at a time), as ``bench/serving.py`` measures it.
3. Closed-loop clients at each ``--concurrency`` on ``POST /v1/caption``, ``/v1/detect``, ``/v1/tags`` and
   the gateway's ``/v1/analyze`` (each client sends a synthetic-scene JPEG, waits, sends the next).
4. With ``--rate R``: open-loop Poisson arrivals at R images/s on ``/v1/analyze`` for ``--rate-s`` seconds
   (``serving.open_loop``: latency from each request's scheduled arrival), the way users meet the API.
5. Prints p50/p95/p99, throughput and errors per endpoint and level, the ratio of each captioner level to the
   baseline, and the peak RSS of every service (the idle ETL service too: the whole starter system) and their
   sum; writes them with the machine, load average,
   versions and arguments to a JSON result (``bench/results/system-<UTC time>.json``, or ``--out``).

The registry is ``$MLFLOW_TRACKING_URI`` when set, else the one under ``--home``.

The clients share the machine's cores with the services (on 2 cores the numbers are a floor). Example::

    .venv/bin/python bench/system.py --home var --concurrency 1,8,50 --duration-s 20
    .venv/bin/python bench/system.py --home var --endpoints analyze --concurrency 50 --rate 10 --rate-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_json import BenchRecord, add_out_argument
from serving import Level, baseline, closed_loop, free_port, open_loop, peak_rss_mb, synth_images

ENDPOINTS = {
    "captioner": ("captioner", "/v1/caption"),
    "detect": ("detector", "/v1/detect"),
    "tags": ("detector", "/v1/tags"),
    "analyze": ("gateway", "/v1/analyze"),
}


def no_feature_errors(body: dict[str, Any]) -> bool:
    """A 200 counts only when every feature answered (the gateway lists failed ones in ``errors``)."""
    return not body.get("errors")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table and write its JSON result.

    Returns:
        The figures written (``baseline``, ``levels``, ``peak_rss_mb``, ``captioner_ratios``, ...).
    """
    record = BenchRecord("system")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=Path("var"), help="SNAP2CAPTION_HOME with the registry.")
    parser.add_argument("--concurrency", default="1,8,50")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help=f"Subset of {list(ENDPOINTS)}.")
    parser.add_argument("--baseline-images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads per model service.")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="Closed-loop warm-up per endpoint.")
    parser.add_argument("--rate", type=float, help="Open-loop Poisson arrivals on /v1/analyze, images/s.")
    parser.add_argument("--rate-s", type=float, default=60.0, help="How long the open-loop arrivals last.")
    add_out_argument(parser)
    args = parser.parse_args(argv)

    from snap2caption.launcher import ServiceSpec, start_services, stop_services
    from snap2caption.registry import Registry

    home = args.home.resolve()
    env = {"SNAP2CAPTION_HOME": str(home), "SNAP2CAPTION_LOG_LEVEL": "WARNING"}
    os.environ.update(env)
    registry = Registry()
    captioner = registry.resolve("captioner", "production")
    workdir = Path(tempfile.mkdtemp(prefix="bench-system-"))
    try:
        images, _ = synth_images(workdir / "synth", 32)
        artifact, _ = registry.download("captioner", captioner.version, workdir / "captioner")
        import torch

        torch.set_num_threads(args.threads)
        tokens = 20
        base = baseline(artifact, images, args.baseline_images, tokens, exact=False)
        print(f"baseline (HF generate, eager, one at a time): p50 {base.p50_ms:.1f} ms, "
              f"{base.images_per_s:.2f} images/s", flush=True)  # fmt: skip

        ports = {name: free_port() for name in ("captioner", "detector", "gateway", "etl")}
        threads, cache = str(args.threads), str(home / "models")  # the model cache under --home, not cwd
        specs = [
            ServiceSpec(
                "captioner",
                ports["captioner"],
                env=(
                    ("SNAP2CAPTION_CAPTIONER_THREADS", threads),
                    ("SNAP2CAPTION_CAPTIONER_MODEL_CACHE_DIR", cache),
                ),
            ),
            ServiceSpec(
                "detector",
                ports["detector"],
                env=(
                    ("SNAP2CAPTION_DETECTOR_THREADS", threads),
                    ("SNAP2CAPTION_DETECTOR_MODEL_CACHE_DIR", cache),
                ),
            ),
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
            ServiceSpec(
                "etl",
                ports["etl"],
                env=(
                    ("SNAP2CAPTION_ETL_DATA_ROOT", str(workdir / "etl")),
                    ("SNAP2CAPTION_ETL_DB_URL", f"sqlite:///{workdir / 'etl.sqlite'}"),
                ),
            ),
        ]
        running = start_services(specs, workdir / "logs")
        results: list[Level] = []
        try:
            by_name = {svc.spec.name: svc for svc in running}
            for endpoint in args.endpoints.split(","):
                service, path = ENDPOINTS[endpoint]
                url = by_name[service].spec.url
                load = functools.partial(
                    closed_loop, url, images, path=path, check=no_feature_errors, name=path
                )
                asyncio.run(load(4, args.warmup_s))  # warm-up
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    result = asyncio.run(load(concurrency, args.duration_s))
                    results.append(result)
                    print(f"{path:<12} {concurrency:>3} clients: p50 {result.p50_ms:.1f} ms, p95 "
                          f"{result.p95_ms:.1f}, {result.images_per_s:.2f} img/s, errors {result.errors}",
                          flush=True)  # fmt: skip
            if args.rate:
                url = by_name["gateway"].spec.url
                path, check = "/v1/analyze", no_feature_errors
                asyncio.run(closed_loop(url, images, 4, args.warmup_s, path=path, check=check))  # warm-up
                result = asyncio.run(open_loop(url, images, args.rate, args.rate_s, path=path, check=check))
                results.append(result)
                print(f"{result.name}: p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f}, "
                      f"{result.images_per_s:.2f} img/s, errors {result.errors}, "
                      f"at most {result.concurrency} in flight", flush=True)  # fmt: skip
            rss = {svc.spec.name: peak_rss_mb(svc.process.pid) for svc in running}
        finally:
            stop_services(running)
        figures = report(base, results, rss, args, captioner.version)
        record.write(figures, config=vars(args), out=args.out)
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(
    base: Level, results: list[Level], rss: dict[str, float], args: argparse.Namespace, version: int
) -> dict[str, Any]:
    """Print the tables and the ratios to the baseline; return them as the JSON result's figures."""
    print(f"\nstarter services from {args.home} (captioner v{version}), {args.threads} thread(s) per model "
          f"service, cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    columns = ("reqs", "err", "p50 ms", "p95 ms", "p99 ms", "img/s")
    header = f"{'endpoint':<14} {'clients':>7} " + " ".join(f"{c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<14} {r.concurrency:>7} {r.requests:>8} {r.errors:>8} {r.p50_ms:>8.1f} "
              f"{r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.images_per_s:>8.2f}")  # fmt: skip
    b_p50, b_rate = base.p50_ms, base.images_per_s
    print(f"\nbaseline, HF generate eager one at a time: p50 {b_p50:.1f} ms, {b_rate:.2f} images/s")
    ratios = []
    for r in results:
        if r.name == "/v1/caption":
            latency, throughput = b_p50 / r.p50_ms, r.images_per_s / b_rate
            ratios.append({"concurrency": r.concurrency, "p50_latency": latency, "throughput": throughput})
            print(f"  /v1/caption {r.concurrency:>3} clients vs baseline: p50 latency ratio "
                  f"{latency:.2f}x, throughput ratio {throughput:.2f}x")  # fmt: skip
    print(
        "\npeak RSS: "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
        + f"; total {sum(rss.values()):.0f} MB"
    )
    model_services = rss.get("captioner", 0) + rss.get("detector", 0)
    print(f"model services (captioner + detector): {model_services:.0f} MB")
    return {
        "captioner_version": version,
        "baseline": asdict(base),
        "levels": [asdict(r) for r in results],
        "captioner_ratios": ratios,
        "peak_rss_mb": {**rss, "total": sum(rss.values())},
    }


if __name__ == "__main__":
    main()
