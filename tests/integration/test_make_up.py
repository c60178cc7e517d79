"""`make up`, the README's main command, exactly as written, on a clean copy of the repository.

From a shell whose PATH holds no virtual environment (`env -i` with the system PATH), on a copy of the
repository (a clone plus the working tree's uncommitted changes) with its own SNAP2CAPTION_HOME and its own
free ports: the data pipeline, the starter models and every service come up, each URL `up` prints answers
200, `/v1/analyze` describes a real photo (and no real photo gets shape words in its alt text), and Ctrl-C
(SIGINT to make's process group, as a terminal sends it) stops everything: no process of the stack is left.

Two honest shortcuts keep it at a few minutes on 2 cores, both stated where they are made:

- The venv. `make up` runs `scripts/setup.sh`, which would build a venv with torch (minutes, GBs). The copy
  gets a `.venv` whose `bin` and `lib` are links into the already built one, and setup's "installed" stamp
  for the copy's pyproject.toml, so setup finds it ready. Its editable install points at this checkout, so
  `PYTHONPATH=<copy>` puts the copy's code first; the test checks that the copy's modules are imported.
- The training. `SNAP2CAPTION_BOOTSTRAP_MINUTES=2.5` (the documented budget; default 9) gives the
  detector what the tagger leaves of it, less than its one epoch of the 5,400 training scenes (at least one
  always runs), and
  `SNAP2CAPTION_BOOTSTRAP_CAPTIONER_STEPS=30` (documented) trains the captioner exactly 30 steps instead of
  to a deadline: the same starter commands
  with a fixed amount of training, so the models and their scores do not depend on how loaded the machine
  is (with a 1.5-minute caption budget, a run at load average 5 got 13 steps and the next 4). The starter
  floors (`SNAP2CAPTION_BOOTSTRAP_MIN_*`, documented) are lowered to what that training reaches: captioner
  test CIDEr-D 0.05 (30 steps reached 0.47) and detector mAP50-95 0.005 (0.0345 after its epoch on the
  earlier 2,000 scenes), below the defaults (0.5, 0.1) and far above an untrained model (CIDEr-D 0.0003
  after 0 steps).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import psutil
import pytest
import skimage.data
from PIL import Image

from snap2caption.data.synth.scene import PLURALS, SHAPES
from tests.helpers import free_port
from training.detector.domain import REAL_PHOTOS, real_photos

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
SERVICES = ("gateway", "captioner", "detector", "etl", "prometheus", "mlflow")
# Setup + data + models + services take ~280 s on 2 idle cores (the whole test 284 s with the 6,000 scenes);
# the bound is 5x that so a busy machine (parallel jobs, a slow disk) cannot fail the test, and the pytest
# timeout leaves room for the rest.
READY_TIMEOUT_S = 1400.0
SHAPE_WORDS = {*SHAPES, *PLURALS.values()}
# scikit-image's real photos: those the detector's training measures its domain on, and the grey ones.
PHOTOS = (*REAL_PHOTOS, "brick", "cell", "clock", "microaneurysms", "page", "text")
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _clean_copy(dest: Path) -> None:
    """A clone of the repository with the working tree's uncommitted changes (edits, new files, deletions)."""
    _git("clone", "-q", str(REPO), str(dest))
    for rel in filter(
        None, _git("ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    ):
        source, target = REPO / rel, dest / rel
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:  # deleted in the working tree
            target.unlink(missing_ok=True)


def _link_venv(dest: Path) -> None:
    """The copy's `.venv`: the built venv's bin and lib, and setup.sh's stamp for the copy's pyproject."""
    venv = REPO / ".venv"
    if not (venv / "bin" / "python").exists():
        pytest.fail("no .venv: run `make setup` first")
    link = dest / ".venv"
    link.mkdir()
    shutil.copy(venv / "pyvenv.cfg", link / "pyvenv.cfg")
    for name in ("bin", "lib", "lib64", "include"):
        if (venv / name).exists():
            (link / name).symlink_to(venv / name)
    extras = re.search(
        r"EXTRAS=\$\{SNAP2CAPTION_EXTRAS:-([^}]+)\}", (dest / "scripts" / "setup.sh").read_text()
    )
    assert extras is not None, "scripts/setup.sh no longer names its default extras"
    digest = hashlib.sha256((dest / "pyproject.toml").read_bytes()).hexdigest()
    (link / ".snap2caption-installed").write_text(f"{digest} {extras.group(1)}\n")


def _photo_jpeg() -> bytes:
    return _jpeg(Image.fromarray(skimage.data.chelsea()))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _shape_words(text: str) -> set[str]:
    """The synthetic scenes' shape words in ``text`` (what the starter captioner and detector know)."""
    return set(re.findall(r"[a-z]+", text.lower())) & SHAPE_WORDS


def _stack(pid: int) -> list[psutil.Process]:
    """``pid`` and every process under it that runs (the services run in sessions of their own, still its
    children; a child that has just exited and awaits its parent's wait() is a zombie, left out)."""
    make = psutil.Process(pid)
    return [p for p in (make, *make.children(recursive=True)) if not _stopped(p)]


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # exited since it was listed
        return ""


def _stopped(proc: psutil.Process) -> bool:
    """Whether a process seen before the stop is gone: exited (a zombie has exited; this machine's PID 1
    does not reap orphans), or its pid now belongs to a newer process."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE or not proc.is_running()
    except psutil.NoSuchProcess:
        return True


def test_make_up_on_a_clean_copy_serves_a_photo_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.fail("make and git are needed (Debian: build-essential, git)")
    started = time.monotonic()
    copy = tmp_path / "snap2caption"
    _clean_copy(copy)
    _link_venv(copy)
    ports = {name: free_port() for name in SERVICES}
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": SYSTEM_PATH,  # a plain shell: no .venv/bin
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(copy),  # the copy's code before the venv's editable install of this checkout
        "SNAP2CAPTION_HOME": str(tmp_path / "home"),
        **{f"SNAP2CAPTION_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        "SNAP2CAPTION_BOOTSTRAP_MINUTES": "2.5",
        "SNAP2CAPTION_BOOTSTRAP_CAPTIONER_STEPS": "30",
        "SNAP2CAPTION_BOOTSTRAP_MIN_CAPTIONER_CIDER_D": "0.05",
        "SNAP2CAPTION_BOOTSTRAP_MIN_DETECTOR_MAP50_95": "0.005",
        # Offline by construction, as scripts/test.sh runs every test.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "YOLO_OFFLINE": "1",
    }
    imported = subprocess.run(
        [str(copy / ".venv" / "bin" / "python"), "-c",
         "import snap2caption, services, training; print(snap2caption.__file__, services.__path__[0], "
         "training.__path__[0])"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(copy) for p in imported), imported
    tree_before = _git("status", "--porcelain", cwd=copy)

    make = subprocess.Popen(
        ["make", "up"], cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # make's own process group, which SIGINT goes to as from a terminal
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # also into a file, to read while it runs or after a failure
        assert make.stdout is not None
        with (tmp_path / "make-up.log").open("w") as log:
            for line in make.stdout:
                log.write(line)
                log.flush()
                lines.append(line.rstrip("\n"))
                if line.startswith("Ready:"):
                    ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stack: list[psutil.Process] = []
    try:
        while not ready.wait(1.0):
            if make.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
                break
        assert ready.is_set(), "make up did not get ready:\n" + "\n".join(lines[-40:])
        stack = _stack(make.pid)  # now already, so that a failure below still stops them all

        # Every URL `up` printed answers 200 (a fragment such as MLflow's `/#/models` stays in the browser).
        printed = sorted(
            {url for line in lines for url in re.findall(r"http://127\.0\.0\.1:\d+[^\s,)]*", line)}
        )
        assert {urllib.parse.urlsplit(url).port for url in printed} == set(ports.values()), printed
        with httpx.Client(timeout=30, follow_redirects=True) as client:
            for url in printed:
                response = client.get(urllib.parse.urldefrag(url).url)
                assert response.status_code == 200, f"{url}: {response.status_code}"

            answer = client.post(
                f"http://127.0.0.1:{ports['gateway']}/v1/analyze",
                files={"file": ("chelsea.jpg", _photo_jpeg(), "image/jpeg")},
            )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert {"caption", "alt_text", "tags", "objects"} <= set(body), body
        assert not body.get("errors"), body["errors"]
        assert body["caption"]["text"] and body["alt_text"]["text"], body
        assert body["tags"] and isinstance(body["objects"], list), body

        # Real photos never get shape words in alt text (issue 13): every photo scikit-image ships, the
        # grey ones too (the starter detector's own domain check passes some of those; the captioner's
        # rejects them). A shape word may only come from a tag's name (the ImageNet tagger's "sea star").
        with httpx.Client(timeout=30) as client:
            for name, photo in real_photos(PHOTOS) or []:
                answer = client.post(
                    f"http://127.0.0.1:{ports['gateway']}/v1/analyze",
                    files={"file": (f"{name}.jpg", _jpeg(photo), "image/jpeg")},
                )
                assert answer.status_code == 200, (name, answer.text)
                body = answer.json()
                tag_words = _shape_words(" ".join(t["name"] for t in body["tags"] or []))
                alt = (body.get("alt_text") or {}).get("text") or ""
                assert _shape_words(alt) <= tag_words, (name, body)

        # Every process of the stack, before stopping it: make, `snap2caption up`, each service and what
        # the services started themselves (MLflow's server workers, the ETL's pool).
        stack = _stack(make.pid)
        commands = [_command(p) for p in stack]
        for name in ("etl", "captioner", "detector", "gateway"):
            assert any(f"serve {name}" in c for c in commands), commands
        assert any("prometheus" in c for c in commands) and any("mlflow" in c for c in commands), commands

        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=90)
        reader.join(timeout=10)
        left = [f"{p.pid} {_command(p)}" for p in stack if not _stopped(p)]  # before any clean-up below
    finally:
        if make.poll() is None:  # a failure above: stop what runs, the services' own groups included
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(timeout=60)
        for proc in stack:
            if not _stopped(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
    output = "\n".join(lines)
    assert "stopped." in output, output[-3000:]
    assert not left, f"still running after Ctrl-C: {left}"

    # Running the product leaves the checkout as it was: var/ and logs are ignored, and the data the
    # pipeline built on this clone hashes as the committed dvc.lock says (no modified or staged lock).
    assert _git("status", "--porcelain", cwd=copy) == tree_before
    dvc = subprocess.run(
        [str(copy / ".venv" / "bin" / "dvc"), "status", "etl"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "up to date" in dvc.stdout.lower(), dvc.stdout + dvc.stderr
