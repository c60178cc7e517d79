"""With several uvicorn workers, one scrape of /metrics counts the requests of all of them.

The monitored stack's gateway runs two uvicorn workers behind one socket. prometheus-client's multiprocess
mode (``snap2caption.http.run`` sets it up) keeps each worker's values in files under
``PROMETHEUS_MULTIPROC_DIR``, one set per pid, and ``/metrics``, answered by either worker, sums them. The
test reads those files to see that both workers served the requests it sends, then checks that every
scrape's totals grew by exactly what was sent. The requests are text bodies the real ``/v1/analyze``
route refuses with 415, so they cost no model time.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.infra.conftest import GATEWAY_WORKERS, MonitoredStack

pytestmark = pytest.mark.integration

ROUTE = "/v1/analyze"
LABELS = {"service": "gateway", "route": ROUTE, "method": "POST", "status": "415", "track": "production"}


def _per_worker(metrics_dir: Path) -> dict[str, float]:
    """``pid -> requests counted with LABELS``, from each worker's own counter file."""
    counted: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            _metric, name, labels, _help = json.loads(key)
            if name == "snap2caption_http_requests_total" and labels == LABELS:
                counted[pid] = counted.get(pid, 0.0) + value
    return counted


def _series(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _scraped(client: httpx.Client, series: str) -> float:
    """The value of one exact series in a scrape of ``/metrics`` (0 when absent)."""
    text = client.get("/metrics").text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture()
def client(monitored_stack: MonitoredStack) -> Iterator[httpx.Client]:
    """A client to the gateway without keep-alive: a new connection per request, so each request goes to
    whichever worker accepts it first."""
    url = monitored_stack.services["gateway"].url
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


def test_metrics_sum_the_requests_of_every_worker(
    monitored_stack: MonitoredStack, client: httpx.Client
) -> None:
    metrics_dir = monitored_stack.gateway_metrics_dir
    requests = _series("snap2caption_http_requests_total", **LABELS)
    durations = _series(
        "snap2caption_http_request_duration_seconds_count",
        service="gateway",
        route=ROUTE,
        method="POST",
        track="production",
    )
    before = {"requests": _scraped(client, requests), "durations": _scraped(client, durations)}
    before_per_worker = _per_worker(metrics_dir)

    def post(_: int) -> int:
        return client.post(ROUTE, content=b"not an image", headers={"content-type": "text/plain"}).status_code

    def grown() -> dict[str, float]:
        """Per worker pid, how many more requests it counted than before the test (only those that did)."""
        now = _per_worker(metrics_dir)
        return {
            pid: n - before_per_worker.get(pid, 0.0)
            for pid, n in now.items()
            if n > before_per_worker.get(pid, 0.0)
        }

    sent = 0
    deadline = time.monotonic() + 60  # a time, not a count: a worker may be slow to take its share
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:  # until every worker has answered some; the kernel spreads them
            statuses = list(pool.map(post, range(24)))
            assert statuses == [415] * len(statuses)
            sent += len(statuses)
            if len(grown()) == GATEWAY_WORKERS:
                break
    per_worker = grown()
    assert len(per_worker) == GATEWAY_WORKERS, per_worker
    assert sum(per_worker.values()) == sent

    for _ in range(4):  # whichever worker answers the scrape reports the totals of both
        assert _scraped(client, requests) == before["requests"] + sent
        assert _scraped(client, durations) == before["durations"] + sent
