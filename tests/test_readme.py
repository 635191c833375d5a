"""The ```python examples of the README and of every topic page in docs/ run.

One test per file: its blocks run in order, in one namespace, in a temporary directory (the
examples write files). A page may have no block.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def run_blocks(path: Path) -> tuple[list[str], dict]:
    """Execute the file's ```python blocks in order in one namespace; return both."""
    blocks = BLOCK.findall(path.read_text())
    namespace: dict = {"__name__": f"doc_{path.stem}"}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return blocks, namespace


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks, ns = run_blocks(README)
    assert len(blocks) >= 3
    assert (tmp_path / "bn.npz").exists()
    # the saved layer loads back with the state it had
    np.testing.assert_array_equal(ns["bn2"].running_mean, ns["bn"].running_mean)
    np.testing.assert_array_equal(ns["bn2"].running_var, ns["bn"].running_var)
    assert ns["bn"].training and not ns["bn2"].training
    # the kernels normalise each channel of the tour's data to mean 0 and variance 1
    np.testing.assert_allclose(ns["y"].mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.isfinite(ns["loss"])


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks(page)


def test_docs_pages_exist_and_are_linked():
    """Every topic page is listed on the front page, and every relative link resolves."""
    assert PAGES, "docs/ has no topic page"
    readme = README.read_text()
    for page in PAGES:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    for path in [README, ROOT / "CONTRIBUTING.md", *PAGES]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links missing {target}"
