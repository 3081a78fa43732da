"""Execute the course's notebooks in place, as CI's nbval will, and store their outputs:
`python scripts/run_notebooks.py [notebooks/02_load_an_exl2_model.ipynb ...]` (default: every notebook).
A cell's consecutive stdout (or stderr) writes are stored as one output, as JupyterLab shows them (a streamed
chat is one output, not one per token)."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def coalesce(outputs: list) -> list:
    out: list = []
    for o in outputs:
        if out and o.get("output_type") == "stream" and out[-1].get("output_type") == "stream" \
                and out[-1].get("name") == o.get("name"):
            out[-1]["text"] += o["text"]
        else:
            out.append(o)
    return out


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce(cell.outputs)
    nbformat.write(nb, path)
    print(f"ran {path.relative_to(REPO)}")


if __name__ == "__main__":
    for p in [Path(a).resolve() for a in sys.argv[1:]] or sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        run(p)
