"""``snap2caption keys``: create / list in-process, revoke from a real subprocess seen by a live KeyStore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.gateway.auth import KeyStore
from services.gateway.db import default_database_url, make_engine
from snap2caption.cli import main


def test_create_list_revoke_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "mobile app", "--database", url])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("s2c_")

    now = [0.0]  # the store's clock, moved by hand: the cache TTL is tested, not the machine's speed
    store = KeyStore(make_engine(url), cache_ttl_s=1.0, clock=lambda: now[0])  # the gateway's view
    key = store.verify(secret)
    assert key is not None and key.name == "mobile app"

    listed = runner.invoke(main, ["keys", "list", "--json", "--database", url])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["name"], r["revoked_at"]) for r in rows] == [(key.id, "mobile app", None)]
    assert secret not in listed.stdout  # list never shows secrets
    table = runner.invoke(main, ["keys", "list", "--database", url])
    assert key.id in table.stdout and "active" in table.stdout

    revoked = subprocess.run(
        [sys.executable, "-m", "snap2caption", "keys", "revoke", key.id, "--database", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    now[0] += 0.9
    assert store.verify(secret) == key  # still the cached row, within the TTL
    now[0] += 0.1
    assert store.verify(secret) is None  # the TTL is over: the revocation from the other process is seen

    again = runner.invoke(main, ["keys", "revoke", key.id, "--database", url])
    assert again.exit_code != 0 and "no active key" in again.output


def test_default_database_follows_snap2caption_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SNAP2CAPTION_GATEWAY_DATABASE_URL", raising=False)
    assert default_database_url() == f"sqlite:///{tmp_path / 'home' / 'gateway.db'}"
    result = CliRunner().invoke(main, ["keys", "create", "x"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "gateway.db").is_file()
