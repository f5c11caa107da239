"""The notebooks under notebooks/ run top to bottom on the embedded SmolLM2, as a user opens them.

Each is executed with nbclient in a fresh kernel of this interpreter, from the notebooks/ folder
(where Jupyter starts), and every cell must finish without an error. The notebooks' own asserts
check that the methods fired. They are committed without outputs; a stray output would go stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks() -> None:
    assert [n.name for n in NOTEBOOKS] == ["1-apply-recipe.ipynb", "2-kv-compression.ipynb", "3-profile-heads.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    book = nbformat.read(path, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' report folders land here
    # kernel "python3" starts this interpreter (jupyter_client swaps its "python" for sys.executable)
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.data for o in outputs)
    if path.stem == "2-kv-compression":  # the task's progress bar rendered as one line, updated to its end
        bars = [o.data["text/plain"] for o in outputs if o.output_type == "display_data" and "text/plain" in o.data]
        assert any(bar.startswith("needle 6/6 (100%)") and "ETA 0 s" in bar for bar in bars), bars
