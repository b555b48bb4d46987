"""The notebooks run end to end on logs of a short simulation (a fresh kernel each)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["data_science_evaluation.ipynb", "finance_cost_report.ipynb"])
def test_notebook_runs(name: str, tmp_path: Path) -> None:
    nb = _run(name, tmp_path)
    text = _text(nb)
    assert "serving run" in text
    if name.startswith("data_science"):
        assert "cheapest: DR" in text and "epsilon_greedy: DR" in text
        assert any(
            "image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])
        )
    else:
        assert "USD" in text and "cost_per_delivered" in text
        charts = [
            str(out["data"]["text/html"])
            for c in nb.cells
            for out in c.get("outputs", [])
            if "<img" in str(out.get("data", {}).get("text/html", ""))
        ]
        assert len(charts) == 2
        assert all("data:image/png;base64,iVBOR" in html for html in charts)  # real PNGs
