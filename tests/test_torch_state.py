"""PyTorch state in and out (batchnorm.nn.load_torch_state / export_torch_state), with PyTorch
2.13.0 as the oracle where it is installed."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.nn import (
    Conv2d,
    Flatten,
    Linear,
    ReLU,
    Sequential,
    cnn,
    export_torch_state,
    load_torch_state,
    mlp,
)

TOL = {"rtol": 2e-5, "atol": 2e-5}  # float32 round-off of two implementations


def _state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_same(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def _toolkit_mlp(seed=1, hidden=(8, 8)):
    return mlp(6, 3, hidden, batchnorm=True, dtype=np.float32, rng=np.random.default_rng(seed))


def _toolkit_cnn(seed=1):
    return cnn((1, 8, 8), 3, (4, 6), (12,), batchnorm=True, dtype=np.float32,
               rng=np.random.default_rng(seed))


def _train(model, rng, shape, steps=3):
    model.train()
    for _ in range(steps):
        model(rng.normal(0.5, 2.0, shape).astype(np.float32))
    for layer in model:
        if isinstance(layer, bn.BatchNorm):
            layer.gamma[:] = rng.uniform(0.5, 1.5, layer.num_features)
            layer.beta[:] = rng.normal(size=layer.num_features)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# without PyTorch


def test_export_uses_pytorch_names_and_layouts(rng):
    model = _train(_toolkit_cnn(), rng, (5, 1, 8, 8))
    state = export_torch_state(model)
    assert list(state)[:7] == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                               "1.running_var", "1.num_batches_tracked"]
    np.testing.assert_array_equal(state["0.weight"], model[0].W)  # (out, in, k, k) in both
    np.testing.assert_array_equal(state["9.weight"], model[9].W.T)  # (out, in) vs (in, out)
    assert state["9.weight"].flags.c_contiguous
    assert state["1.num_batches_tracked"].shape == () and state["1.num_batches_tracked"] == 3
    assert state["1.num_batches_tracked"].dtype == np.int64
    assert "2.weight" not in state  # ReLU
    assert export_torch_state(model, dtype=np.float64)["1.running_var"].dtype == np.float64


def test_export_then_import_restores_the_model(rng):
    model = _train(_toolkit_cnn(), rng, (5, 1, 8, 8))
    other = _toolkit_cnn(seed=9)
    assert load_torch_state(other, export_torch_state(model)) is other
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v, err_msg=k)


def test_import_refuses_a_mismatch_naming_the_first_layer_and_changes_nothing(rng):
    state = export_torch_state(_train(_toolkit_mlp(), rng, (7, 6)))
    wider = _toolkit_mlp(hidden=(8, 9))
    before = _state(wider)
    with pytest.raises(ValueError, match=r"layer 3 differs: PyTorch has weight \(8, 8\), bias "
                                         r"\(8,\), the model's Linear\(8, 9, bias=True\) expects "
                                         r"weight \(9, 8\), bias \(9,\)"):
        load_torch_state(wider, state)
    _assert_same(before, wider)
    no_bias = Sequential([Linear(6, 8, bias=False), ReLU()])
    with pytest.raises(ValueError,
                       match=r"layer 0 differs: .* bias=False\) expects weight \(8, 6\)$"):
        load_torch_state(no_bias, {"0.weight": np.ones((8, 6)), "0.bias": np.ones(8)})
    with pytest.raises(ValueError, match=r"layer 1 differs: PyTorch has weight \(8,\), the "
                                         r"model's ReLU\(\) expects no state"):
        load_torch_state(no_bias, {"0.weight": np.ones((8, 6)), "1.weight": np.ones(8)})
    with pytest.raises(ValueError, match=r"layer 5 differs: .* only 2 layers"):
        load_torch_state(no_bias, {"0.weight": np.ones((8, 6)), "5.weight": np.ones(8)})
    with pytest.raises(ValueError, match=r"names like '0.weight'\), got 'features.0.weight'"):
        load_torch_state(no_bias, {"features.0.weight": np.ones((8, 6))})
    with pytest.raises(ValueError, match=r"layer 0 differs: .*integer num_batches_tracked"):
        load_torch_state(no_bias, {"0.weight": np.ones((8, 6), int)})


def test_import_refuses_bad_values_and_changes_nothing(rng):
    model = _train(_toolkit_mlp(), rng, (7, 6))
    state = export_torch_state(model)
    state["4.running_var"] = -np.abs(state["4.running_var"])
    other = _toolkit_mlp(seed=4)
    before = _state(other)
    with pytest.raises(ValueError, match=r"layer 4 .*running_var >= 0"):
        load_torch_state(other, state)
    _assert_same(before, other)


def test_missing_counter_starts_at_zero(rng):
    model = _train(_toolkit_mlp(), rng, (7, 6))
    state = {k: v for k, v in export_torch_state(model).items()
             if not k.endswith("num_batches_tracked")}
    other = load_torch_state(_toolkit_mlp(seed=2), state)
    assert other[1].num_batches_tracked == 0
    np.testing.assert_array_equal(other[1].running_var, model[1].running_var)


def test_export_refuses_a_layer_without_counterpart():
    class Scale:
        params = property(lambda self: {"s": np.ones(2)})

    with pytest.raises(ValueError, match=r"layer 1 .* no PyTorch counterpart"):
        export_torch_state(Sequential([ReLU(), Scale()]))


def _fake_torch_zip(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", pickle.dumps({"0.weight": [1.0]}))
        zf.writestr("model/version", "3\n")


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.safetensors", "model.bin"])
def test_pickled_files_are_refused_without_unpickling(tmp_path, name):
    path = tmp_path / name
    _fake_torch_zip(path)
    model = _toolkit_mlp()
    before = _state(model)
    for load in (lambda p: load_torch_state(model, p), model.load, bn.load):
        with pytest.raises(bn.LoadError, match=r"unpickling can run arbitrary code.*"
                                               r"safetensors\.torch\.save_file\(model\.state_"
                                               r"dict\(\), \"model\.safetensors\"\)"):
            load(path)
    _assert_same(before, model)


def test_an_npz_is_not_a_torch_state_file(tmp_path, rng):
    path = tmp_path / "m.npz"
    _toolkit_mlp().save(path)
    with pytest.raises(bn.LoadError, match=r"expected a \.safetensors file"):
        load_torch_state(_toolkit_mlp(), path)


# ---------------------------------------------------------------------------------------------
# PyTorch as the oracle


def _torch_mlp(torch, hidden=(8, 8)):
    nn = torch.nn
    sizes = [6, *hidden]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 3))


def _torch_cnn(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3),
    )


def _train_torch(torch, model, shape, steps=3):
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, dtype=next(model.parameters()).dtype) * 2 + 0.5)
        for m in model:
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


CASES = {
    "mlp": (_torch_mlp, _toolkit_mlp, (7, 6)),
    "cnn": (_torch_cnn, _toolkit_cnn, (5, 1, 8, 8)),
}


def _torch_out(torch, model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("via", ["dict", "file"])
def test_pytorch_model_imported_gives_the_same_eval_outputs(tmp_path, rng, case, via):
    torch = pytest.importorskip("torch")
    make_torch, make_ours, shape = CASES[case]
    theirs = _train_torch(torch, make_torch(torch), shape)
    if via == "dict":
        source = theirs.state_dict()
    else:
        st_torch = pytest.importorskip("safetensors.torch")
        source = tmp_path / "model.safetensors"
        st_torch.save_file(theirs.state_dict(), str(source))
    ours = load_torch_state(make_ours(), source).eval()
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(ours(x), _torch_out(torch, theirs, x), **TOL)
    bn_layer = next(m for m in ours if isinstance(m, bn.BatchNorm))
    assert bn_layer.num_batches_tracked == 3


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("via", ["dict", "file"])
def test_toolkit_model_exported_gives_the_same_eval_outputs(tmp_path, rng, case, via):
    torch = pytest.importorskip("torch")
    make_torch, make_ours, shape = CASES[case]
    ours = _train(make_ours(), rng, shape)
    state = export_torch_state(ours)
    if via == "dict":
        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    else:
        stn = pytest.importorskip("safetensors.numpy")
        st_torch = pytest.importorskip("safetensors.torch")
        stn.save_file(state, str(tmp_path / "model.safetensors"))
        tensors = st_torch.load_file(str(tmp_path / "model.safetensors"))
    theirs = make_torch(torch)
    theirs.load_state_dict(tensors)  # strict: every name and shape must fit
    theirs.eval()
    x = rng.normal(0.5, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(_torch_out(torch, theirs, x), ours(x), **TOL)
    assert int(theirs[1].num_batches_tracked) == 3


def test_training_on_after_import_follows_pytorch_with_the_converted_config(rng):
    # PyTorch momentum=m is ours 1 - m; PyTorch averages the unbiased batch variance.
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Sequential(torch.nn.BatchNorm1d(5, momentum=0.1)).double()
    _train_torch(torch, theirs, (9, 5))
    ours = Sequential([bn.BatchNorm(5, momentum=0.9, unbiased=True, dtype=np.float64)])
    load_torch_state(ours, theirs.state_dict())
    theirs.train()
    ours.train()
    x = rng.normal(3.0, 2.0, (9, 5))
    with torch.no_grad():
        y_theirs = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), y_theirs, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours[0], name), getattr(theirs[0], name).numpy(),
                                   rtol=1e-12)
    assert ours[0].num_batches_tracked == int(theirs[0].num_batches_tracked) == 4


def test_pytorch_mismatch_is_refused_naming_the_layer_and_nothing_changes(tmp_path, rng):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    theirs = _torch_mlp(torch, hidden=(8, 9)).eval()
    ours = _toolkit_mlp()
    before = _state(ours)
    with pytest.raises(ValueError, match=r"layer 3 differs: PyTorch has weight \(9, 8\)"):
        load_torch_state(ours, theirs.state_dict())
    path = tmp_path / "wide.safetensors"
    st_torch.save_file(theirs.state_dict(), str(path))
    with pytest.raises(bn.LoadError, match=r"wide\.safetensors.*layer 3 differs"):
        load_torch_state(ours, path)
    dropout = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(),
                                  torch.nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match=r"layer 1 differs"):
        load_torch_state(ours, dropout.state_dict())
    _assert_same(before, ours)


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_a_torch_save_file_is_refused_by_name_and_content(tmp_path, zipped, name):
    torch = pytest.importorskip("torch")
    path = tmp_path / name
    torch.save(_torch_mlp(torch).state_dict(), path, _use_new_zipfile_serialization=zipped)
    ours = _toolkit_mlp()
    before = _state(ours)
    with pytest.raises(bn.LoadError, match=r"unpickling can run arbitrary code.*save_file"):
        load_torch_state(ours, path)
    with pytest.raises(bn.LoadError, match=r"unpickling can run arbitrary code"):
        ours.load(os.fspath(path))
    _assert_same(before, ours)


def test_bfloat16_tensors_are_widened_and_bfloat16_files_refused(tmp_path, rng):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    theirs = _train_torch(torch, _torch_mlp(torch), (7, 6)).to(torch.bfloat16)
    ours = load_torch_state(_toolkit_mlp(), theirs.state_dict())
    np.testing.assert_array_equal(ours[0].W, theirs[0].weight.detach().float().numpy().T)
    path = tmp_path / "bf16.safetensors"
    st_torch.save_file(theirs.state_dict(), str(path))
    before = _state(ours)
    with pytest.raises(bn.LoadError, match=r"'0\.\w+' is bfloat16, which NumPy cannot read"):
        load_torch_state(ours, path)
    _assert_same(before, ours)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_group_and_layer_norm_move_with_pytorch(rng, direction):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def make_torch(seed):
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                            nn.Flatten(), nn.Linear(64, 5), nn.LayerNorm(5), nn.Linear(5, 3))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        return net.eval()

    ours = Sequential([Conv2d(2, 4, 3, pad=1, dtype=np.float32), bn.GroupNorm(2, 4), ReLU(),
                       Flatten(), Linear(64, 5, dtype=np.float32), bn.LayerNorm(5),
                       Linear(5, 3, dtype=np.float32)])
    theirs = make_torch(0)
    load_torch_state(ours, theirs.state_dict())
    if direction == "export":
        theirs = make_torch(1)
        state = export_torch_state(ours)
        theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(ours.eval()(x), _torch_out(torch, theirs, x), **TOL)
