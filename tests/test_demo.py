"""The demo on reduced settings: what the experiment is about, its outputs, determinism."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from batchnorm import available_backends
from batchnorm.apps.data import load_digits
from batchnorm.apps.demo import (
    History,
    build_model,
    main,
    make_batches,
    run_experiment,
    steps_to_target,
    summary,
    train_network,
    write_results,
)
from batchnorm.nn import SGD

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small_run() -> dict:
    # One small weight scale, 8 epochs (112 steps), a short two-rate headline: about a second.
    return run_experiment(
        "digits", scales=[1e-3], epochs=8, seed=0, headline_epochs=4, lr_multipliers=(1, 30)
    )


def test_batchnorm_learns_at_small_scale_where_plain_network_does_not(small_run):
    run = small_run["weight_scale"][0]
    assert run["scale"] == 1e-3
    with_bn, without = run["with_bn"], run["without_bn"]
    assert len(with_bn["test_acc"]) == len(without["test_acc"]) == 8
    # Chance is 0.10 on ten balanced classes.
    assert with_bn["test_acc"][-1] > 0.5
    assert with_bn["train_acc"][-1] > 0.5
    assert without["test_acc"][-1] < 0.2
    assert without["train_acc"][-1] < 0.2


def test_headline_structure(small_run):
    h = small_run["headline"]
    assert [r["lr"] for r in h["runs"]] == [0.01, 0.3]
    assert h["total_steps"] == 4 * 14
    for r in h["runs"]:
        for key in ("with_bn", "without_bn"):
            c = r[key]
            assert c["eval_steps"] == list(range(0, 57))  # every step on digits, and step 0
            assert len(c["step_test_acc"]) == 57
            s = c["steps_to_target"]
            assert s is None or c["step_test_acc"][c["eval_steps"].index(s)] >= 0.9
    # With He init and the larger rate, batch norm reaches 90% within 56 steps.
    fast = h["runs"][1]["with_bn"]["steps_to_target"]
    assert fast is not None and h["best_with_bn"]["steps"] <= fast


def test_results_are_json_and_the_same_for_the_same_seed(small_run):
    again = run_experiment(
        "digits", scales=[1e-3], epochs=8, seed=0, headline_epochs=4, lr_multipliers=(1, 30)
    )
    assert json.dumps(again, allow_nan=False) == json.dumps(small_run, allow_nan=False)


@pytest.mark.parametrize("backend", available_backends())
def test_bit_identical_reruns_on_every_backend(backend):
    def once() -> str:
        r = run_experiment("digits", scales=[0.05], epochs=2, seed=3, headline=False,
                           backend=backend, train_size=400)
        return json.dumps(r)

    assert once() == once()


def test_other_seed_changes_the_curves():
    a = run_experiment("digits", scales=[0.05], epochs=1, seed=0, headline=False, train_size=300)
    b = run_experiment("digits", scales=[0.05], epochs=1, seed=1, headline=False, train_size=300)
    assert a["weight_scale"][0]["with_bn"]["loss"] != b["weight_scale"][0]["with_bn"]["loss"]


def test_outputs_are_written(small_run, tmp_path):
    paths = write_results(small_run, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["settings"]["scales"] == [1e-3]
    assert data["weight_scale"][0]["with_bn"]["test_acc"] == small_run["weight_scale"][0][
        "with_bn"]["test_acc"]
    import matplotlib.image

    for key in ("weight_scale", "headline"):
        raw = paths[key].read_bytes()
        assert raw.startswith(PNG_SIGNATURE)
        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.05  # not a blank canvas


def test_summary_names_both_experiments(small_run):
    text = summary(small_run)
    assert "1.00e-03" in text
    assert "steps to 90% test accuracy" in text
    assert "0.3 (x30)" in text


def test_main_writes_table_json_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--quick", "--epochs", "1", "--train-size", "200", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "with batch norm" in printed and "wall time" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["weight_scale"]) == 4
    assert results["settings"]["train_size"] == 200
    assert "time" not in json.dumps(results["settings"])
    for name in ("weight_scale.png", "headline.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_main_reports_a_missing_data_dir(tmp_path, capsys):
    rc = main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "o").exists()


def test_mnist_from_idx_files(tmp_path, capsys):
    """The MNIST path end to end, on a tiny fake data set in the real file format."""
    import gzip
    import struct

    rng = np.random.default_rng(0)
    parts = {"train": 300, "t10k": 50}
    for part, n in parts.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, a in (("images-idx3", images), ("labels-idx1", labels)):
            head = struct.pack(">I", 0x800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
            (tmp_path / f"{part}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + a.tobytes()))
    out = tmp_path / "out"
    rc = main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--quick", "--epochs", "1",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["dataset"] == "mnist" and s["input_shape"] == [784]
    assert s["train_size"] == 300 and s["test_size"] == 50 and s["steps_per_epoch"] == 3
    assert "MLP on mnist" in capsys.readouterr().out


def test_cnn_path_end_to_end():
    r = run_experiment("digits", model="cnn", scales=[1e-3], epochs=2, headline=False,
                       train_size=300)
    s = r["settings"]
    assert s["model"] == "cnn" and s["input_shape"] == [1, 8, 8]
    assert len(r["weight_scale"][0]["with_bn"]["test_acc"]) == 2


def test_cnn_model_uses_per_channel_batchnorm():
    from batchnorm import BatchNorm

    data = load_digits()
    net = build_model("cnn", data, batchnorm=True, weight_init="he", seed=0)
    bns = [layer for layer in net if isinstance(layer, BatchNorm)]
    assert [b.num_features for b in bns] == [8, 16, 100]
    assert net(data.x_test[:5]).shape == (5, 10)


def test_train_network_hooks_and_shard():
    """The data-parallel hooks: two 'processes' that each see half of a batch and sum their
    gradients in the hook take the step of one process that sees the whole batch."""
    data = load_digits().flat().subset(200)
    batches = [[make_batches(200, 50, 1, seed=0)[0][0]]]  # one step

    def model():
        # Without batch norm: per-shard batch statistics would differ from the global ones
        # (that is what SyncBatchNorm fixes).
        return build_model("mlp", data, batchnorm=False, weight_init="he", seed=0)

    ref = model()
    train_network(ref, SGD(ref.params, 0.1), data, batches)

    grads_b = []
    b = model()
    train_network(b, SGD(b.params, 0.1), data, batches, shard=lambda idx: idx[1::2],
                  grad_hook=lambda net: grads_b.append({k: v.copy() for k, v in
                                                        net.grads.items()}))

    def all_reduce(net):
        for k, g in net.grads.items():
            g += grads_b[0][k]

    a = model()
    before = {k: v.copy() for k, v in a.params.items()}
    train_network(a, SGD(a.params, 0.1), data, batches, shard=lambda idx: idx[0::2],
                  grad_hook=all_reduce)
    assert len(grads_b) == 1
    for k, p in ref.params.items():
        assert not np.array_equal(p, before[k])
        np.testing.assert_allclose(a.params[k], p, rtol=1e-12, atol=1e-14)


def test_divergence_is_recorded_not_raised():
    data = load_digits().flat().subset(200)
    net = build_model("mlp", data, batchnorm=False, weight_init=1.0, seed=0)
    hist = train_network(net, SGD(net.params, 1e3), data, make_batches(200, 100, 6, seed=0))
    assert hist.diverged_at_step is not None and hist.diverged_at_step < 12
    assert len(hist.test_acc) == 6 and hist.loss[-1] is None
    assert hist.steps == hist.diverged_at_step


def test_steps_to_target():
    h = History(eval_steps=[0, 1, 2, 3], step_test_acc=[0.1, 0.5, 0.91, 0.95])
    assert steps_to_target(h, 0.9) == 2
    assert steps_to_target(h, 0.99) is None


def test_make_batches():
    b = make_batches(250, 100, 2, seed=0)
    assert [len(e) for e in b] == [2, 2]
    assert all(len(i) == 100 for e in b for i in e)
    assert len(np.unique(np.concatenate(b[0]))) == 200
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(50, 100, 1, seed=0)


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("flag", [[], ["--no-progress"]])
def test_progress_bar_on_a_terminal_only(tmp_path, monkeypatch, flag):
    err = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    args = ["--quick", "--epochs", "1", "--train-size", "200", "--out", str(tmp_path)]
    assert main(args + flag) == 0
    text = err.getvalue()
    if flag:
        assert text == ""
    else:
        total = 2 * 4 * 2 + 2 * 3 * 2  # networks x epochs x steps per epoch
        assert "training" in text and f"{total}/{total}" in text


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_networks_train_like_unfused_ones(kind):
    """The demo's networks fuse BatchNorm -> ReLU; a few SGD steps give the unfused network's
    losses and weights up to float64 round-off."""
    from batchnorm import BatchNorm
    from batchnorm.nn import ReLU

    data = load_digits().subset(300)
    if kind == "mlp":
        data = data.flat()
    batches = make_batches(300, 50, 2, seed=1)
    hists, nets = [], []
    for fuse in (True, False):
        net = build_model(kind, data, batchnorm=True, weight_init=0.3, seed=0,
                          fuse_activation=fuse)
        hists.append(train_network(net, SGD(net.params, 0.05), data, batches))
        nets.append(net)
    fused, plain = nets
    bns = [layer for layer in fused if isinstance(layer, BatchNorm)]
    assert bns and all(b.activation == "relu" for b in bns)
    assert not any(isinstance(layer, ReLU) for layer in fused)
    assert sum(isinstance(layer, ReLU) for layer in plain) == len(bns)
    assert hists[0].steps == hists[1].steps == 12 and len(hists[0].loss) == 2
    np.testing.assert_allclose(hists[0].loss, hists[1].loss, rtol=1e-12)
    assert hists[0].test_acc == hists[1].test_acc
    # the same arrays in the same order (the indices differ: the ReLU layers are gone)
    got, want = list(fused.params.values()), list(plain.params.values())
    assert [a.shape for a in got] == [a.shape for a in want]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=str(i))
