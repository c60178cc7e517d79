"""bench/alt_text.py: its tally of the gateway's answers on held-out scenes, and a smoke run through the
session stack on a small synthetic ETL output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import load_script, read_result
from tests.gateway_stack import Stack

script = load_script("alt_text")
REFERENCES = ["a small red circle and a large blue square", "two shapes: a red circle and a blue square"]


def _body(text: str, in_domain: bool, source: str) -> dict[str, object]:
    return {"caption": {"text": text, "in_domain": in_domain}, "alt_text": {"text": "...", "source": source}}


def test_a_scene_is_kept_when_its_alt_text_is_the_caption_and_right_when_its_pairs_are() -> None:
    kept = script.scene("1", REFERENCES, 200, _body("a blue square and a red circle", True, "caption"))
    assert (kept.pairs, kept.in_domain, kept.kept, kept.right) == (2, True, True, True)
    wrong = script.scene("2", REFERENCES, 200, _body("a red circle and a red circle", True, "fallback"))
    assert (wrong.kept, wrong.right) == (False, False)
    failed = script.scene("3", REFERENCES, 503, None)
    assert (failed.status, failed.kept, failed.right, failed.in_domain) == (503, False, False, None)


def test_tally_gives_the_shares_over_the_answered_scenes_and_by_pairs() -> None:
    one = ["a small green star"]
    scenes = [
        script.scene("1", REFERENCES, 200, _body("a blue square and a red circle", True, "caption")),
        script.scene("2", REFERENCES, 200, _body("a red circle and a blue square", True, "fallback")),
        script.scene("3", REFERENCES, 200, _body("a red circle", True, "caption")),
        script.scene("4", one, 200, _body("a green star", False, "fallback")),
        script.scene("5", one, 0, None),
    ]
    figures = script.tally(scenes)
    assert (figures["requests"], figures["errors"], figures["images"]) == (5, 1, 4)
    assert (figures["in_domain"], figures["kept"], figures["right"]) == (0.75, 0.5, 0.75)
    assert figures["kept_right"] == 0.5  # of the two kept captions, one names every pair
    assert figures["by_pairs"]["1"] == {
        "images": 1,
        "in_domain": 0.0,
        "kept": 0.0,
        "kept_interval": [0.0, 0.7935],
        "right": 1.0,
        "kept_right": None,
    }
    assert figures["by_pairs"]["2"]["kept"] == pytest.approx(2 / 3, abs=1e-4)
    assert figures["kept_interval"] == script.wilson_interval(2, 4)


def test_the_kept_share_comes_with_its_wilson_interval() -> None:
    assert script.wilson_interval(8, 10) == [0.4902, 0.9433]  # worked out by hand from the formula
    low, high = script.wilson_interval(271, 285)  # 95.1 % kept of a bootstrap's 285 test scenes
    assert 0.91 < low < 0.951 < high < 0.98
    assert script.wilson_interval(0, 4)[0] == 0.0 and script.wilson_interval(4, 4)[1] == 1.0
    assert script.wilson_interval(3, 0) is None


def test_a_missing_split_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(["--data", str(tmp_path), "--out", str(tmp_path / "out.json")])
    assert "cannot read the 'test' split" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_run_writes_its_result(stack: Stack, tmp_path: Path) -> None:
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth

    write_synth(tmp_path / "synth", SynthConfig(images=40, seed=5, image_size=64, workers=1), progress=False)
    data = tmp_path / "processed"
    annotations = [tmp_path / "synth" / "annotations" / "captions.json"]
    run_etl(
        EtlConfig(
            source="coco", images=tmp_path / "synth" / "images", annotations=annotations, out=data, workers=1
        ),
        progress=False,
    )
    out = tmp_path / "alt_text.json"
    args = [
        "--url", stack.gateway.url, "--data", str(data), "--split", "train", "--limit", "2",
        "--out", str(out),
    ]  # fmt: skip
    returned = load_script("alt_text").main(args)
    figures = read_result(out, "alt_text")
    assert figures == returned
    assert (figures["requests"], figures["errors"], figures["images"]) == (2, 0, 2)
    # The session stack's tiny captioner: only the shape of the answers is checked, not their values.
    for row in figures["scenes"]:
        assert row["status"] == 200 and row["caption"] and row["pairs"] >= 1
        assert isinstance(row["kept"], bool) and isinstance(row["right"], bool)
