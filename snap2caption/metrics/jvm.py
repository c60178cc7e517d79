"""The Java side of pycocoevalcap: is a JVM usable, where the jars are, and PTB tokenization.

pycocoevalcap's own ``PTBTokenizer`` writes its temporary file into site-packages (fails on a
read-only install) and splits the jar's output on ``\\n`` only, so a caption holding ``\\r``,
U+2028 or a form feed becomes two lines and shifts every later caption onto the wrong image.
:func:`ptb_tokenize` runs the same jar with the same flags and the same punctuation removal, but
writes to a private temporary directory, turns every line break inside a caption into a space and
checks that one line comes back per caption.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Every character the PTB lexer treats as a line break (with -preserveLines, a line per caption).
_LINE_BREAKS = re.compile(r"[\n\r\u000B\u000C\u0085\u2028\u2029]")
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


class JavaUnavailable(RuntimeError):
    """pycocoevalcap or a working ``java`` is missing, so the reference scorer cannot run."""


@functools.cache
def java_available() -> bool:
    """Whether ``java -version`` runs (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return (
            subprocess.run([java, "-version"], capture_output=True, timeout=30, check=False).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def pycocoevalcap_installed() -> bool:
    """Whether the pycocoevalcap package is importable."""
    return importlib.util.find_spec("pycocoevalcap") is not None


def pycocoevalcap_dir() -> Path:
    """Directory of the installed pycocoevalcap package (it holds the jars).

    Raises:
        JavaUnavailable: pycocoevalcap is not installed (it comes with the ``train`` extra).
    """
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise JavaUnavailable("pycocoevalcap is not installed (pip install 'snap2caption[train]')")
    # A namespace package (no __init__.py), so the location list is the way to its directory.
    return Path(next(iter(spec.submodule_search_locations)))


def ptb_tokenize(captions: Sequence[str], timeout_s: float = 600.0) -> list[str]:
    """Tokenize captions with pycocoevalcap's Stanford PTBTokenizer jar, in one JVM run.

    Args:
        captions: Raw captions.
        timeout_s: Limit for the whole run.

    Returns:
        One string per caption: lower-cased tokens joined by spaces, coco-caption punctuation
        removed, exactly what ``PTBTokenizer().tokenize`` yields for it.

    Raises:
        JavaUnavailable: No pycocoevalcap or no ``java``.
        RuntimeError: The jar failed or returned a different number of lines.
    """
    if not captions:
        return []
    if not java_available():
        raise JavaUnavailable("no working `java` on PATH (pycocoevalcap's tokenizer runs on the JVM)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    jar = pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    # Every line ends with a newline, the last one too, so the lexer sees the same context after each
    # caption (pycocoevalcap leaves the last one without; that only matters for a trailing clitic).
    text = "".join(_LINE_BREAKS.sub(" ", caption) + "\n" for caption in captions)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text(text, encoding="utf-8")
        command = ["java", "-cp", str(jar), _PTB_CLASS, "-preserveLines", "-lowerCase", str(source)]
        result = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"PTBTokenizer failed with status {result.returncode}: {stderr}")
    lines = result.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    logger.debug("ptb tokenized %d captions", len(captions))
    return [" ".join(word for word in line.rstrip().split(" ") if word not in PUNCTUATIONS) for line in lines]
