"""``batchnorm demo --experiment batch-size`` on the --quick settings: outputs, determinism,
the methods it builds, and the arguments it refuses."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from batchnorm import BatchNorm, BatchRenorm, GroupNorm
from batchnorm.apps.data import load_digits
from batchnorm.apps.demo import main
from batchnorm.apps.experiment import (
    BATCH_SIZES,
    METHODS,
    QUICK,
    make_norm,
    renorm_bounds,
    run_batch_size_experiment,
    table,
)
from batchnorm.nn import cnn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run1"
    assert main(["--experiment", "batch-size", "--quick", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_quick_writes_figure_table_and_json(quick_out):
    import matplotlib.image

    results = json.loads((quick_out / "batch_size.json").read_text())
    s = results["settings"]
    assert s["batch_sizes"] == list(BATCH_SIZES)
    assert list(s["methods"]) == list(METHODS)
    assert s["train_size"] == QUICK["train_size"] and s["epochs"] == QUICK["epochs"]
    assert s["backend"] == "numpy" and s["test_size"] == 360
    for m in METHODS:
        for b in BATCH_SIZES:
            (run,) = results["runs"][m][str(b)]
            assert len(run["test_acc"]) == 1
            assert 0.0 <= run["test_acc"][-1] <= 1.0
            assert results["final_test_acc"][m][str(b)] == run["test_acc"][-1]
    # the learning rate scales with the batch size
    assert s["lrs"]["2"] == pytest.approx(s["lr"] * 2 / 64)
    assert s["plan"]["2"]["total_steps"] == QUICK["train_size"] // 2
    raw = (quick_out / "batch_size.png").read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    img = matplotlib.image.imread(quick_out / "batch_size.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.05
    assert (quick_out / "batch_size.txt").read_text() == table(results) + "\n"


def test_json_is_byte_identical_across_runs(quick_out, tmp_path):
    out = tmp_path / "run2"
    assert main(["--experiment", "batch-size", "--quick", "--out", str(out),
                 "--no-progress"]) == 0
    first = (quick_out / "batch_size.json").read_bytes()
    assert (out / "batch_size.json").read_bytes() == first
    assert (out / "batch_size.txt").read_bytes() == (quick_out / "batch_size.txt").read_bytes()
    assert b"time" not in first


def test_table_lists_every_method_and_batch_size(quick_out):
    text = (quick_out / "batch_size.txt").read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("batch size"))
    assert header.split()[2:] == [str(b) for b in BATCH_SIZES]
    results = json.loads((quick_out / "batch_size.json").read_text())
    for m, label in METHODS.items():
        (row,) = [line for line in lines if line.startswith(label)]
        cells = row[len(label):].split()
        assert len(cells) == len(BATCH_SIZES)
        want = [f"{results['final_test_acc'][m][str(b)]:.3f}" for b in BATCH_SIZES]
        assert [c.rstrip("!") for c in cells] == want


def test_ghost_batchnorm_is_batchnorm_up_to_the_virtual_batch(quick_out):
    """With virtual batches of 4, a batch of 2 or 4 is one virtual batch: the same training."""
    results = json.loads((quick_out / "batch_size.json").read_text())
    for b in ("2", "4"):
        ghost, bn = results["runs"]["ghost"][b][0], results["runs"]["batchnorm"][b][0]
        np.testing.assert_allclose(ghost["loss"], bn["loss"], rtol=1e-10)
        assert ghost["test_acc"] == bn["test_acc"]


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["--experiment", "batch-size", "--quick", "--train-size", "64",
                 "--out", str(tmp_path)]) == 0
    per_run = sum(64 // b for b in BATCH_SIZES)
    total = per_run * len(METHODS)
    assert "training" in err.getvalue() and f"{total}/{total}" in err.getvalue()


def test_seeds_are_averaged():
    r = run_batch_size_experiment(batch_sizes=(8, 16), methods=("batchnorm", "none"), epochs=1,
                                  seeds=(0, 1), train_size=64)
    assert r["settings"]["seeds"] == [0, 1]
    for m in ("batchnorm", "none"):
        for b in ("8", "16"):
            runs = r["runs"][m][b]
            assert [x["seed"] for x in runs] == [0, 1]
            accs = [x["test_acc"][-1] for x in runs]
            assert r["final_test_acc"][m][b] == pytest.approx(sum(accs) / 2)
    # different seeds, different weights and batches
    assert r["runs"]["none"]["8"][0]["loss"] != r["runs"]["none"]["8"][1]["loss"]


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_builds_its_normalization(method):
    data = load_digits()
    net = cnn(data.image_shape, 10, channels=(8, 16), hidden=(100,),
              norm=make_norm(method, 1000), rng=np.random.default_rng(0), dtype=np.float64)
    norms = [layer for layer in net if isinstance(layer, (BatchNorm, GroupNorm))]
    if method == "none":
        assert norms == []
        return
    assert len(norms) == 3
    kinds = {type(n) for n in norms}
    if method == "groupnorm":
        assert kinds == {GroupNorm} and [n.num_groups for n in norms] == [4, 4, 4]
    elif method == "batchrenorm":
        assert kinds == {BatchRenorm}
        layer = norms[0]
        assert layer.current_bounds() == (1.0, 0.0)  # plain batch norm at first
        layer.num_batches_tracked = 500
        assert layer.current_bounds() == (3.0, 5.0)  # full strength from half-way
    else:
        assert kinds == {BatchNorm}
        want = 4 if method == "ghost" else None
        assert [n.virtual_batch_size for n in norms] == [want] * 3


def test_renorm_bounds_scale_the_papers_schedule():
    rmax, dmax = renorm_bounds(1600)
    assert (rmax(100), dmax(100)) == (1.0, 0.0)  # warm-up: 1/16 of the steps
    assert dmax(500) == 5.0 and rmax(500) < 3.0  # dmax first, at 5/16
    assert rmax(800) == 3.0
    assert 1.0 < rmax(450) < 3.0 and 0.0 < dmax(300) < 5.0


def test_unknown_method_and_bad_batch_size_are_errors():
    with pytest.raises(ValueError, match="expected a method"):
        make_norm("layernorm", 10)
    with pytest.raises(ValueError, match="batch sizes between 2"):
        run_batch_size_experiment(batch_sizes=(1, 4), train_size=64)
    with pytest.raises(ValueError, match="batch sizes between 2"):
        run_batch_size_experiment(batch_sizes=(128,), train_size=64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "batch-size", "--model", "mlp"], "argument --model: not used by"),
        (["--experiment", "batch-size", "--model", "cnn"], "argument --model: not used by"),
        (["--experiment", "batch-size", "--batch-size", "8"], "argument --batch-size: not used"),
        (["--experiment", "batch-size", "--lr", "0.5"], "argument --lr: not used"),
        (["--experiment", "batch-size", "--dataset", "mnist"], "argument --dataset: not used"),
        (["--experiment", "batch-size", "--dataset", "digits"], "argument --dataset: not used"),
        (["--experiment", "batch-size", "--distributed"], "argument --distributed: not used"),
        (["--experiment", "batch-size", "--train-size", "10"], "argument --train-size: expected "
         "at least 64"),
        (["--experiment", "batch-size", "--seeds", "0"], "argument --seeds: expected an integer"),
        (["--experiment", "batch-size", "--epochs", "x"], "argument --epochs: expected an "
         "integer"),
        (["--experiment", "batch-sizes"], "argument --experiment: invalid choice"),
        (["--seeds", "2"], "argument --seeds: expected it only with --experiment batch-size"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last
    assert not out.exists()


def test_an_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--experiment", "batch-size", "--quick", "--out", str(blocker / "sub")])
    assert exc.value.code == 2
    assert "argument --out" in capsys.readouterr().err
