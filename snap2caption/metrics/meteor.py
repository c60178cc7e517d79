"""METEOR 1.5 through the jar that ships with pycocoevalcap, run as one long-lived Java process.

Same jar, same command line (``-l en -norm``, 2 GB heap) and same SCORE/EVAL protocol as
``pycocoevalcap.meteor.Meteor``, so the numbers are the same; the process handling is what differs,
because the upstream wrapper is known to hang:

* stderr went to a pipe nobody read; a chatty or failing JVM could block on it. Here it goes to a
  temporary file, which also gives the error message when the JVM dies (e.g. it cannot reserve
  its heap) instead of ``ValueError: could not convert string to float: ''``.
* a failed read left its lock held, and ``__del__`` then blocked on that lock at garbage
  collection or interpreter exit. Here the lock is a ``with`` block and the exit hook
  (``weakref.finalize``) takes no lock.
* a reply that never came blocked ``readline()`` forever. Here every read has a timeout, after
  which the process is killed and :class:`MeteorError` raised.
* a line break or ``|||`` inside a caption desynchronised the line protocol; both are removed from
  hypotheses and references (upstream removed ``|||`` from hypotheses only).

Starting the JVM and loading the paraphrase table takes about 10 s, so keep one scorer open for
repeated evaluations (``with MeteorScorer() as meteor: ...``); after :meth:`MeteorScorer.close` the
next call starts a fresh process.
"""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from snap2caption.metrics.jvm import pycocoevalcap_dir

logger = logging.getLogger(__name__)

_EOF = None  # reader-thread sentinel: the JVM closed its stdout
_JAVA_LINE_BREAK = re.compile(r"[\r\n]")  # what METEOR's BufferedReader.readLine() splits on


class MeteorError(RuntimeError):
    """The METEOR process failed, died or stopped answering."""


def _clean(text: str) -> str:
    """Keep a caption from breaking METEOR's one-line, ``|||``-separated protocol.

    The two replacements are pycocoevalcap's (it applied them to hypotheses only); on tokenized
    references they change nothing, as the PTB tokenizer never emits ``|||`` or double spaces.
    """
    return _JAVA_LINE_BREAK.sub(" ", text).replace("|||", "").replace("  ", " ")


def _shutdown(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """Stop the JVM: EOF on stdin ends METEOR's stdio loop; kill it if it is not gone in ``grace_s``."""
    try:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=grace_s)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Reader thread: forward stdout lines so the caller can wait on them with a timeout."""
    with stream:
        for raw in iter(stream.readline, b""):
            lines.put(raw.decode("utf-8", errors="replace").strip())
    lines.put(_EOF)


class MeteorScorer:
    """A METEOR 1.5 process that scores tokenized captions; thread-safe, restartable.

    Args:
        max_heap: JVM ``-Xmx`` value; pycocoevalcap uses ``"2G"`` (the paraphrase table needs it).
        timeout_s: Longest wait for any one reply line, including the first, which waits for the
            JVM to start and load its tables.
    """

    def __init__(self, max_heap: str = "2G", timeout_s: float = 120.0) -> None:
        self.max_heap = max_heap
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running JVM, ``None`` when none is running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def score(
        self, references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
    ) -> tuple[float, dict[str, float]]:
        """METEOR of tokenized predictions against tokenized references.

        Args:
            references: Image id -> tokenized reference captions.
            predictions: Image id -> tokenized predicted caption; same ids as ``references``.

        Returns:
            ``(corpus score, per-image scores)``. The corpus score is METEOR's own aggregate over
            all sufficient statistics (not the mean of the per-image scores), as in pycocoevalcap.

        Raises:
            ValueError: No images.
            MeteorError: The JVM failed to start, died, or did not answer within ``timeout_s``;
                the process is stopped and the next call starts a new one.
        """
        if not references:
            raise ValueError("no images to score")
        with self._lock:
            try:
                return self._score(references, predictions)
            except MeteorError:
                # The line protocol is out of step or the JVM is stuck: no point waiting for it.
                self._stop(grace_s=0.0)
                raise

    def close(self) -> None:
        """Stop the JVM (idempotent). A later :meth:`score` starts a new one."""
        with self._lock:
            self._stop(grace_s=5.0)

    def _score(
        self, references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
    ) -> tuple[float, dict[str, float]]:
        self._ensure_started()
        stats = []
        for image_id, refs in references.items():
            line = " ||| ".join(
                ("SCORE", " ||| ".join(_clean(ref) for ref in refs), _clean(predictions[image_id]))
            )
            self._send(line)
            stats.append(self._receive_numbers())
        self._send(" ||| ".join(("EVAL", *stats)))
        per_image = {image_id: self._receive_float() for image_id in references}
        return self._receive_float(), per_image

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop(grace_s=0.0)
        jar_dir = pycocoevalcap_dir() / "meteor"
        command = [
            "java",
            "-jar",
            f"-Xmx{self.max_heap}",
            "meteor-1.5.jar",
            "-",
            "-",
            "-stdio",
            "-l",
            "en",
            "-norm",
        ]
        # Lives as long as the process, so no `with`; _stop() closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                command, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError as error:
            raise MeteorError(f"cannot start METEOR ({' '.join(command)}): {error}") from error
        assert self._process.stdout is not None  # stdout=PIPE
        self._lines = queue.Queue()
        self._reader = threading.Thread(
            target=_pump, args=(self._process.stdout, self._lines), name="meteor-stdout", daemon=True
        )
        self._reader.start()
        # Runs at garbage collection or interpreter exit if close() was never called; takes no lock.
        self._finalizer = weakref.finalize(self, _shutdown, self._process, 5.0)
        logger.info("meteor started pid=%d heap=%s dir=%s", self._process.pid, self.max_heap, Path(jar_dir))

    def _send(self, line: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(f"{line}\n".encode())
            self._process.stdin.flush()
        except OSError as error:
            raise self._exited() from error

    def _receive(self) -> str:
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            raise MeteorError(f"METEOR sent no reply within {self.timeout_s:.0f} s") from None
        if line is _EOF:
            raise self._exited()
        return line

    def _receive_float(self) -> float:
        """An EVAL reply line: one number."""
        line = self._receive_numbers()
        if len(line.split()) != 1:
            raise MeteorError(f"expected one METEOR score, got {line!r}")
        return float(line)

    def _receive_numbers(self) -> str:
        """A reply line that must be space-separated numbers (SCORE statistics or an EVAL score)."""
        line = self._receive()
        fields = line.split()
        if not fields or not all(_is_number(field) for field in fields):
            # e.g. the JVM printing "Error occurred during initialization of VM" on stdout.
            raise MeteorError(f"unexpected METEOR reply {line!r}")
        return line

    def _exited(self, limit: int = 2000) -> MeteorError:
        """The error for a JVM that closed its pipes, with its exit status and stderr."""
        assert self._process is not None and self._stderr is not None
        try:
            code: int | str = self._process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = "unknown (still running)"
        self._stderr.seek(0)
        stderr = self._stderr.read().decode("utf-8", errors="replace").strip()[-limit:]
        return MeteorError(f"METEOR exited with status {code}; stderr: {stderr or '(empty)'}")

    def _stop(self, grace_s: float) -> None:
        """Stop the JVM, if any, and release its reader thread, finalizer and stderr file."""
        if self._process is not None:
            _shutdown(self._process, grace_s)
            logger.info("meteor stopped pid=%d status=%s", self._process.pid, self._process.returncode)
            self._process = None
        if self._reader is not None:
            # The JVM is gone, so its stdout hits EOF and the reader closes it and returns.
            self._reader.join(timeout=5.0)
            self._reader = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
