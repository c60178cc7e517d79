"""The quality benches' one upload to ``/v1/analyze`` (``bench/gateway_post.py``); its 200 answers are
covered by the alt-text and real-photo smoke runs against the session's gateway stack."""

from __future__ import annotations

import httpx
import pytest

from tests.bench.conftest import load_script
from tests.helpers import free_port

script = load_script("gateway_post")


def test_no_answer_is_status_0_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{free_port()}", timeout=5.0) as client:  # nothing listens
        assert script.analyze(client, "a.png", b"\x89PNG", "cat/orig") == (0, None)
    assert "cat/orig: no answer" in capsys.readouterr().out
