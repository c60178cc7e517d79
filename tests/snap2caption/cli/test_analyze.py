"""``snap2caption analyze`` against the real gateway stack (and the scripted stand-in for auth and 429).

The stack and the stand-in are the fixtures of ``tests/snap2caption/test_client.py`` (one stack for
both modules). What the command prints is checked against what the client gets for the same image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.client import Snap2CaptionClient
from tests.gateway_stack import CAPTIONS, Stack, colour_png
from tests.helpers import free_port
from tests.snap2caption.test_client import OK, Stub, envelope, stub

pytestmark = pytest.mark.integration

__all__ = ["stub"]  # a fixture, imported to be found here


@pytest.fixture()
def red_png(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(colour_png("red", (128, 96)))
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``snap2caption <args>`` in-process; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_summary_shows_every_feature(stack: Stack, red_png: Path) -> None:
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        expected = client.analyze(red_png)
    code, out, err = invoke("analyze", str(red_png), "--gateway", stack.gateway.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "image     128 x 96 png"
    assert expected.caption is not None and expected.caption.confidence is not None
    assert f"caption   {CAPTIONS[0]} (confidence {expected.caption.confidence:.2f})" in lines
    assert expected.alt_text is not None
    assert f"alt text  {expected.alt_text.text} [{expected.alt_text.source}]" in lines
    assert (
        expected.tags
        and f"tags      {'  '.join(f'{t.hashtag} {t.score:.2f}' for t in expected.tags)}" in lines
    )
    assert expected.objects is not None and f"objects   {len(expected.objects)}" in lines
    for obj in expected.objects:
        b = obj.box
        assert any(
            line.split()
            == [obj.label, f"{obj.score:.2f}", f"({b.x1:.0f},", f"{b.y1:.0f})-({b.x2:.0f},", f"{b.y2:.0f})"]
            for line in lines
        )
    timings = next(line for line in lines if line.startswith("timings "))
    assert "decode" in timings and "total" in timings and timings.endswith(" ms")
    assert next(line for line in lines if line.startswith("models ")).count(" v") == 3
    assert lines[-1].startswith("request   ") and len(lines[-1].split()[-1]) >= 16


def test_json_is_the_gateway_answer_and_options_apply(stack: Stack, red_png: Path) -> None:
    code, out, err = invoke(
        "analyze",
        str(red_png),
        "--gateway",
        stack.gateway.url,
        "--json",
        "--features",
        "caption,tags",
        "--max-tags",
        "2",
        "--gender-neutral",
    )
    assert code == 0, err
    body = json.loads(out)
    assert set(body) >= {"request_id", "image", "caption", "alt_text", "tags", "objects", "models", "timings"}
    assert body["objects"] is None and body["alt_text"] is None and len(body["tags"]) <= 2
    assert "man" not in body["caption"]["text"].split()


def test_api_errors_are_one_line_and_exit_1(stack: Stack, tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture\n")
    code, out, err = invoke("analyze", str(notes), "--gateway", stack.gateway.url)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("error: 415 unsupported_format: ") and "(request id " in err


def test_usage_and_connection_errors(tmp_path: Path) -> None:
    code, _, err = invoke("analyze", str(tmp_path / "missing.png"))
    assert code == 2 and "no such file" in err
    code, _, err = invoke("analyze", "https://example.com/a.png", "--features", "caption,colour")
    assert code == 2 and "choose from caption, alt_text, tags, objects" in err
    code, out, err = invoke(
        "analyze", "https://example.com/a.png", "--gateway", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 3 and out == "" and err.startswith("error: cannot reach http://127.0.0.1:")


def test_api_key_from_the_environment_and_retries(stub: Stub) -> None:
    stub.script(envelope(429, "rate_limited", "slow down", retry_after="0.1"), OK)
    code, out, err = invoke(
        "analyze",
        "https://example.com/cat.jpg",
        "--gateway",
        stub.url,
        "--retries",
        "1",
        env={"SNAP2CAPTION_API_KEY": "from-env"},
    )
    assert code == 0, err
    assert out.splitlines()[1] == "caption   a red circle (confidence 0.50)"
    first, second = stub.seen()
    assert first["authorization"] == second["authorization"] == "Bearer from-env"
    assert second["json"] == {"url": "https://example.com/cat.jpg"}

    stub.script(envelope(429, "rate_limited", "slow down", retry_after="0.1"))
    code, out, err = invoke("analyze", "https://example.com/cat.jpg", "--gateway", stub.url, "--retries", "0")
    assert code == 1 and err.strip() == "error: 429 rate_limited: slow down (request id rid-rate_limited)"


def test_the_installed_command_reads_stdin(stack: Stack) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "snap2caption", "analyze", "-", "--gateway", stack.gateway.url, "--json"],
        input=colour_png("blue"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 0, process.stderr.decode()
    assert json.loads(process.stdout)["caption"]["text"] == CAPTIONS[1]
