"""Progress bars outside a terminal: lines with an ETA in a log, one updating line in a notebook."""

from __future__ import annotations

import re
import sys
import types

import pytest

from attnkit.tasks import progress
from attnkit.tasks.progress import duration, progress_bar

LINE = re.compile(r"^job (\d+)/20 \(\d+%\) \d+ s elapsed, ETA (\d+ s|\?)$")


def test_a_log_gets_a_line_every_n_items_with_an_eta(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("job", 20) as advance:  # stderr is captured: not a terminal, not a notebook
        for _ in range(20):
            advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert [int(LINE.match(line).group(1)) for line in lines] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert all("ETA" in line for line in lines) and lines[-1].endswith("ETA 0 s")


def test_uneven_steps_print_once_per_boundary_and_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.log_lines("job", 7, every=3) as advance:
        for n in (1, 4, 2):  # 1, 5 (crosses 3), 7 (crosses 6, the end)
            advance(n)
    assert [line.split()[1] for line in capsys.readouterr().err.splitlines()] == ["5/7", "7/7"]


def test_disabled_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("job", 5, enabled=False) as advance:
        advance(5)
    assert capsys.readouterr().err == ""


def test_a_notebook_gets_one_line_updated_in_place(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    shown: list[tuple[str, str]] = []

    class Handle:
        def update(self, data: dict, raw: bool) -> None:
            shown.append(("update", data["text/plain"]))

    def display(data: dict, raw: bool, display_id: bool) -> Handle:
        assert raw and display_id
        shown.append(("display", data["text/plain"]))
        return Handle()

    monkeypatch.setitem(sys.modules, "IPython.display", types.SimpleNamespace(display=display))
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with progress_bar("needle", 4) as advance:
        for _ in range(4):
            advance(1)
    assert [kind for kind, _ in shown] == ["display"] + ["update"] * 4
    assert shown[0][1].startswith("needle 0/4 (0%) [....") and shown[0][1].endswith("ETA ?")
    assert shown[-1][1].startswith("needle 4/4 (100%) [####") and "ETA 0 s" in shown[-1][1]
    assert capsys.readouterr().err == ""  # nothing in the log stream besides the one line


@pytest.mark.parametrize(
    ("seconds", "text"), [(float("nan"), "?"), (7.4, "7 s"), (185, "3 min 05 s"), (3720, "1 h 02 min")]
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
