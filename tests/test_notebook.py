"""The example notebook runs from top to bottom in a Jupyter kernel and shows what it claims."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "from-the-book-to-batchnorm.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("notebook")
    # A kernel spec named like the notebook's ("python3") that runs this interpreter: found
    # first on JUPYTER_PATH, so the kernel is this environment's whatever else is installed.
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "runtime"))
        mp.setenv("IPYTHONDIR", str(tmp / "ipython"))
        found = kernelspec.KernelSpecManager().get_kernel_spec("python3")
        assert found.argv[0] == sys.executable, found.resource_dir
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
    return nb


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_notebook_runs_and_shows_its_results(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    printed = [_text(c) for c in code]
    assert not any(o.output_type == "error" for c in code for o in c.outputs)

    # 1. the book's layer passes the finite-difference check
    errors = dict(re.findall(r"^(dx|dgamma|dbeta)\s+relative error (\S+)$",
                             "".join(printed), flags=re.M))
    assert set(errors) == {"dx", "dgamma", "dbeta"}
    assert all(float(e) < 1e-6 for e in errors.values()), errors

    # 2. the modern layer agrees with the book's one
    agree = next(t for t in printed if t.startswith("output"))
    numbers = [float(v) for v in re.findall(r"\d\.\de[+-]\d+", agree)]
    assert len(numbers) == 6 and max(numbers) < 1e-12, agree

    # 3. both networks learn the digits: the hand-written loop with the book's layer and the
    #    toolkit's network; the last epoch's test accuracy of each
    loops = [t for t in printed if re.search(r"^epoch \d+: train accuracy", t, flags=re.M)]
    assert len(loops) == 2
    for t in loops:
        assert float(re.findall(r"test accuracy (\S+)", t)[-1]) > 0.8, t

    # 4. the weight-scale table: batch norm beats no batch norm at the smallest scale
    table = next(t for t in printed if t.startswith("weight std"))
    rows = re.findall(r"^\s*(\S+)\s+([01]\.\d{3})\s+([01]\.\d{3})", table, flags=re.M)
    assert len(rows) == 4, table
    scales = [float(r[0]) for r in rows]
    smallest = rows[scales.index(min(scales))]
    with_bn, without = float(smallest[1]), float(smallest[2])
    assert with_bn > 0.5 and with_bn > without + 0.3, table

    # and the plot is inline
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
