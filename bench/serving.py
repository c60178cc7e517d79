"""Caption serving benchmark: closed-loop clients through real HTTP, against the baseline a user would run.

What it does, in one run on one machine:

1. Builds a caption model of the given config (default ``starter``: frozen pretrained EfficientNet-Lite0,
   random-init decoder, tokenizer trained on synthetic captions) or takes a saved artifact, with decoding
   fixed at exactly ``--tokens`` greedy tokens per caption (``min_new_tokens = max_new_tokens``), so
   every side does the same work whatever the weights say.
2. Baseline: Hugging Face ``GPT2LMHeadModel.generate`` (PyTorch eager, greedy, no compile), one image at a
   time in this process, after the same decode + preprocessing, with the same thread count as the service.
3. Registers the artifact in a temporary MLflow SQLite registry, starts ``snap2caption serve captioner``
   as its own process, and runs closed-loop clients (each sends a synthetic-scene JPEG, waits for the
   answer, sends the next) at each ``--concurrency`` level for ``--duration-s``.
4. Prints p50/p95/p99 latency, throughput, errors, the service's peak RSS, and the ratios to the
   baseline, and writes them with the machine, load average, versions and arguments to a JSON result
   (``bench/results/serving-<UTC time>.json``, or ``--out``; ``bench/result_json.py``).

The clients run in this process on the same cores as the service: on a 2-core machine they take a share
of the CPU the service would otherwise have, so the numbers are a floor. Example::

    .venv/bin/python bench/serving.py --concurrency 1,8,50 --duration-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_json import ROOT, BenchRecord, add_out_argument


@dataclass
class Level:
    """One load level's results."""

    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    images_per_s: float
    mean_batch: float
    rate_per_s: float = 0.0  # open loop (:func:`open_loop`): the offered arrival rate; 0 for closed loops


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def synth_images(folder: Path, count: int) -> tuple[list[bytes], list[str]]:
    """``count`` synthetic scenes (JPEG bytes) and their captions."""
    from snap2caption.data.synth import SynthConfig, write_synth

    write_synth(folder, SynthConfig(images=count, seed=0, workers=1), progress=False)
    images = [p.read_bytes() for p in sorted((folder / "images").glob("*.jpg"))]
    annotations = json.loads((folder / "annotations" / "captions.json").read_text())
    return images, [a["caption"] for a in annotations["annotations"]]


def build_artifact(config_path: Path, captions: list[str], tokens: int, out: Path) -> Path:
    from snap2caption.models.caption.artifact import save_caption_model
    from snap2caption.models.caption.config import CaptionConfig
    from snap2caption.models.caption.model import build_caption_model

    overrides = [f"decoding.max_new_tokens={tokens}", f"decoding.min_new_tokens={tokens}"]
    config = CaptionConfig.from_yaml(config_path, overrides)
    model, tokenizer = build_caption_model(config, captions=captions)
    return save_caption_model(model.eval(), tokenizer, out, extra={"image_max_side": 512, "bench": True})


def baseline(artifact: Path, images: list[bytes], n: int, tokens: int, exact: bool = True) -> Level:
    """HF ``generate``, eager, greedy, one image at a time: decode + preprocess + encode + generate.

    ``exact``: exactly ``tokens`` tokens per caption (the speed benchmark); else up to ``tokens``, stopping at
    EOS as the service does (a trained model)."""
    import torch

    from snap2caption.imaging import decode_image
    from snap2caption.models.caption.artifact import load_caption_model

    model, tokenizer = load_caption_model(artifact)
    decoder = model.base_decoder

    def one(data: bytes) -> None:
        image = decode_image(data, max_side=512).image
        pixels = torch.from_numpy(model.preprocess.batch([image]))
        with torch.inference_mode():
            prefix = model.encode(pixels)  # (1, P, D)
            bos = torch.full((1, 1), tokenizer.bos_id, dtype=torch.long)
            prompt = torch.cat([prefix, model.embed_tokens(bos)], dim=1)
            out = decoder.generate(
                inputs_embeds=prompt,
                attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
                max_new_tokens=tokens,
                min_new_tokens=tokens if exact else 1,
                do_sample=False,
                num_beams=1,
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
            )
        assert out.shape[1] == tokens or not exact, out.shape

    for data in images[:3]:  # warm-up
        one(data)
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        one(images[i % len(images)])
        latencies.append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    return Level(
        "HF generate, eager, one at a time", 1, n, 0, seconds,
        percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99), n / seconds, 1.0,
    )  # fmt: skip


def any_answer(body: dict[str, Any]) -> bool:
    """Accept every 200 answer (``closed_loop``'s default check)."""
    return True


async def closed_loop(
    url: str,
    images: list[bytes],
    concurrency: int,
    duration_s: float,
    *,
    path: str = "/v1/caption",
    check: Callable[[dict[str, Any]], bool] = any_answer,
    name: str | None = None,
) -> Level:
    """``concurrency`` clients, each posting a JPEG to ``path``, waiting for the answer, posting the next.

    Args:
        url: The service's base URL.
        images: JPEG bytes, sent round-robin.
        concurrency: Number of clients.
        duration_s: How long to keep sending.
        path: The endpoint.
        check: Whether a 200 answer's JSON body counts as a success; anything else is an error.
        name: The level's name; default ``service, N clients``.

    Returns:
        Latency of the successes, throughput, errors, and the mean ``batch_size`` the answers report
        (0 when they report none).
    """
    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def client(http: httpx.AsyncClient, worker: int) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < stop_at:
            data = images[i % len(images)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                response = await http.post(path, content=data, headers={"content-type": "image/jpeg"})
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code != 200 or not check(body := response.json()):
                errors += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if "batch_size" in body:  # the model services say how many images shared the forward pass
                batches.append(body["batch_size"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http, w) for w in range(concurrency)))
    seconds = time.perf_counter() - started
    return Level(
        name or f"service, {concurrency} clients", concurrency, len(latencies), errors, seconds,
        percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99),
        len(latencies) / seconds, statistics.fmean(batches) if batches else 0.0,
    )  # fmt: skip


async def open_loop(
    url: str,
    images: list[bytes],
    rate_per_s: float,
    duration_s: float,
    *,
    path: str = "/v1/analyze",
    check: Callable[[dict[str, Any]], bool] = any_answer,
    name: str | None = None,
    seed: int = 0,
) -> Level:
    """Poisson arrivals: requests sent at exponentially spaced times averaging ``rate_per_s``, whatever is
    still in flight (users do not wait for each other's answers, unlike :func:`closed_loop`'s clients).

    Latency counts from each request's scheduled arrival, not from when the client got round to sending it,
    so a client that falls behind cannot hide the wait (coordinated omission). The arrival times are drawn
    from ``seed``: runs with the same arguments offer the same load.

    Returns:
        The level, with ``concurrency`` the most requests that were in flight at once.
    """
    rng = random.Random(seed)
    arrivals, at = [], rng.expovariate(rate_per_s)
    while at < duration_s:
        arrivals.append(at)
        at += rng.expovariate(rate_per_s)
    latencies: list[float] = []
    errors = in_flight = most_in_flight = 0

    async def one(http: httpx.AsyncClient, i: int, due: float) -> None:
        nonlocal errors, in_flight, most_in_flight
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            data = images[i % len(images)]
            response = await http.post(path, content=data, headers={"content-type": "image/jpeg"})
            if response.status_code == 200 and check(response.json()):
                latencies.append((time.perf_counter() - due) * 1000)
            else:
                errors += 1
        except httpx.HTTPError:
            errors += 1
        finally:
            in_flight -= 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)  # never queue in the client
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http, i, started + at) for i, at in enumerate(arrivals)))
        seconds = time.perf_counter() - started
    return Level(
        name or f"{path} poisson {rate_per_s:g}/s", most_in_flight, len(latencies), errors, seconds,
        percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99),
        len(latencies) / seconds, 0.0, rate_per_s,
    )  # fmt: skip


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_service(
    artifact: Path, workdir: Path, env_extra: dict[str, str], registry_template: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Register ``artifact`` as ``captioner@production`` in a registry of its own under ``workdir`` (a copy
    of ``registry_template``, an empty migrated MLflow SQLite file, when given) and serve it."""
    from snap2caption.launcher import wait_ready
    from snap2caption.registry import Registry

    if registry_template is not None:
        shutil.copyfile(registry_template, workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    registry = Registry(uri)
    registry.register("captioner", artifact, metrics={"test_cider_d": 0.0})
    registry.promote("captioner")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(workdir / "home"),
        "SNAP2CAPTION_CAPTIONER_MODEL_CACHE_DIR": str(workdir / "cache"),
        "SNAP2CAPTION_LOG_LEVEL": "WARNING",
        **env_extra,
    }
    log = (workdir / "captioner.log").open("ab")
    command = [sys.executable, "-m", "snap2caption", "serve", "captioner", "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, 300, process):
        process.kill()
        raise SystemExit(f"the captioner did not become ready; log: {workdir / 'captioner.log'}")
    return process, url


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its table and write its JSON result.

    Returns:
        The figures written (``baseline``, ``levels``, ``peak_rss_mb``, ``ratios``).
    """
    record = BenchRecord("serving")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "training/configs/caption/starter.yaml")
    parser.add_argument("--model-dir", type=Path, help="A saved caption artifact instead of --config.")
    parser.add_argument("--tokens", type=int, default=20, help="Greedy tokens per caption, exactly.")
    parser.add_argument("--concurrency", default="1,8,50", help="Comma-separated client counts.")
    parser.add_argument("--duration-s", type=float, default=20.0, help="Per load level.")
    parser.add_argument("--baseline-images", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads, service and baseline.")
    parser.add_argument(
        "--runtime", choices=("torch", "onnx", "onnx-int8"), default="onnx", help="The service's runtime."
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="Closed-loop warm-up, 4 clients.")
    parser.add_argument(
        "--registry-template",
        type=Path,
        help="An empty, migrated MLflow SQLite file to copy as the run's registry (skips MLflow's "
        "first migration, seconds); default: a new one.",
    )
    add_out_argument(parser)
    parser.add_argument("--json", dest="out", type=Path, help="The older name of --out.")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        images, captions = synth_images(workdir / "synth", 32)
        if args.model_dir is not None:  # a copy: an ONNX export must not touch the original
            artifact = Path(shutil.copytree(args.model_dir, workdir / "artifact"))
        else:
            artifact = build_artifact(args.config, captions, args.tokens, workdir / "artifact")
        if args.runtime != "torch" and not (artifact / "onnx" / "decoder.int8.onnx").is_file():
            from snap2caption.models.caption.export import export_for_serving

            export_for_serving(artifact)
        base = baseline(artifact, images, args.baseline_images, args.tokens)
        print(f"baseline: p50 {base.p50_ms:.1f} ms, {base.images_per_s:.2f} images/s", flush=True)
        settings = {
            "SNAP2CAPTION_CAPTIONER_THREADS": str(args.threads),
            "SNAP2CAPTION_CAPTIONER_RUNTIME": args.runtime,
            "SNAP2CAPTION_CAPTIONER_MAX_BATCH_SIZE": str(args.max_batch_size),
            "SNAP2CAPTION_CAPTIONER_MAX_IMAGES_PER_REQUEST": str(min(16, args.max_batch_size)),
            "SNAP2CAPTION_CAPTIONER_MAX_WAIT_MS": str(args.max_wait_ms),
            "SNAP2CAPTION_CAPTIONER_MAX_QUEUE": "512",
        }
        process, url = start_service(artifact, workdir, settings, args.registry_template)
        levels = []
        try:
            asyncio.run(closed_loop(url, images, 4, args.warmup_s))  # warm-up
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                level = asyncio.run(closed_loop(url, images, concurrency, args.duration_s))
                levels.append(level)
                print(
                    f"{concurrency:>3} clients: p50 {level.p50_ms:.1f} ms, p95 {level.p95_ms:.1f}, "
                    f"p99 {level.p99_ms:.1f}, {level.images_per_s:.2f} images/s, errors {level.errors}, "
                    f"mean batch {level.mean_batch:.1f}",
                    flush=True,
                )
            rss = peak_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(30)
        figures = report(base, levels, rss, args)
        record.write(figures, config=vars(args), out=args.out)
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(base: Level, levels: list[Level], rss_mb: float, args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the ratios to the baseline; return them as the JSON result's figures."""
    print()
    print(f"model: {args.model_dir or args.config}, {args.tokens} greedy tokens, {args.runtime} runtime, "
          f"{args.threads} thread(s), cpu count {os.cpu_count()}")  # fmt: skip
    columns = ("reqs", "err", "p50 ms", "p95 ms", "p99 ms", "img/s", "batch")
    header = f"{'run':<38} " + " ".join(f"{c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for level in [base, *levels]:
        print(
            f"{level.name:<38} {level.requests:>8} {level.errors:>8} {level.p50_ms:>8.1f} "
            f"{level.p95_ms:>8.1f} {level.p99_ms:>8.1f} {level.images_per_s:>8.2f} {level.mean_batch:>8.1f}"
        )
    print(f"\ncaptioner peak RSS: {rss_mb:.0f} MB")
    ratios = []
    for level in levels:
        latency = base.p50_ms / level.p50_ms
        throughput = level.images_per_s / base.images_per_s
        ratios.append({"concurrency": level.concurrency, "p50_latency": latency, "throughput": throughput})
        print(
            f"{level.concurrency:>3} clients vs baseline: p50 latency ratio {latency:.2f}x, "
            f"throughput ratio {throughput:.2f}x"
        )
    return {
        "baseline": asdict(base),
        "levels": [asdict(level) for level in levels],
        "peak_rss_mb": rss_mb,
        "ratios": ratios,
    }


if __name__ == "__main__":
    main()
