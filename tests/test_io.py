"""Saved state: atomic writes, one error type for bad files, headers checked before data,
.npz and .safetensors, layers and whole models (batchnorm.io, Sequential.save/load)."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.nn import Sequential, cnn, mlp
from helpers import assert_same_state, snapshot

FORMATS = ["npz", "safetensors"]


def _need(fmt: str) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors")


def _trained_layer(rng, **kw) -> bn.BatchNorm:
    layer = bn.BatchNorm(3, backend="numpy", **kw)
    for _ in range(3):
        layer(rng.normal(1.0, 2.0, (6, 3)))
    if layer.affine:
        layer.gamma[:] = rng.normal(size=3)
    return layer


def _valid_state(rng) -> dict[str, np.ndarray]:
    return _trained_layer(rng).state_dict()


def _config(**change) -> dict:
    config = bn.BatchNorm(3)._config()
    config.update(change)
    return {k: v for k, v in config.items() if v is not _DROP}


_DROP = object()


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_header(shape, descr: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False},
                                {"dtype": np.float64, "momentum": None, "unbiased": True}])
def test_layer_round_trip(tmp_path, rng, fmt, kw):
    _need(fmt)
    layer = _trained_layer(rng, **kw)
    path = tmp_path / f"bn.{fmt}"
    layer.save(path)
    loaded = bn.load(path, backend="numpy")
    assert repr(loaded) == repr(layer)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
        assert loaded.state_dict()[k].dtype == v.dtype
    x = rng.normal(size=(4, 3))
    np.testing.assert_array_equal(loaded.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trainable_affine", [False, True])
def test_the_frozen_state_survives_save_and_load(tmp_path, rng, fmt, trainable_affine):
    _need(fmt)
    layer = _trained_layer(rng).freeze(trainable_affine=trainable_affine)
    layer.save(tmp_path / f"bn.{fmt}")
    loaded = bn.load(tmp_path / f"bn.{fmt}")
    assert loaded.frozen and loaded.trainable_affine == trainable_affine
    assert set(loaded.params) == set(layer.params)
    layer.unfreeze().save(tmp_path / f"bn.{fmt}")
    assert not bn.load(tmp_path / f"bn.{fmt}").frozen


def test_format_is_chosen_by_suffix_and_read_by_content(tmp_path, rng):
    pytest.importorskip("safetensors")
    layer = _trained_layer(rng)
    layer.save(tmp_path / "a.safetensors")
    layer.save(tmp_path / "a.npz")
    assert zipfile.is_zipfile(tmp_path / "a.npz")
    assert not zipfile.is_zipfile(tmp_path / "a.safetensors")
    os.replace(tmp_path / "a.safetensors", tmp_path / "renamed.bin")
    np.testing.assert_array_equal(bn.load(tmp_path / "renamed.bin").gamma, layer.gamma)


def test_safetensors_file_holds_the_config_as_metadata(tmp_path, rng):
    st = pytest.importorskip("safetensors")
    layer = _trained_layer(rng, eps=1e-3)
    layer.save(tmp_path / "bn.safetensors")
    with st.safe_open(str(tmp_path / "bn.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["config"]) == layer._config()
        assert set(f.keys()) == set(layer.state_dict())


def test_missing_safetensors_package_is_named(tmp_path, rng, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("No module named 'safetensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError, match=r"batchnorm\[io\]"):
        _trained_layer(rng).save(tmp_path / "bn.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 1. save() is atomic


def _failing_writer(real):
    """A writer that gets half of its output onto the disk and then finds the disk full."""

    def write(file, *args, **kwargs):
        buf = io.BytesIO()
        real(buf, *args, **kwargs)
        data = buf.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_failed_npz_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, rng, monkeypatch):
    path = tmp_path / "bn.npz"
    old = _trained_layer(rng)
    old.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _failing_writer(np.savez))
    new = bn.BatchNorm(3)
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.npz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(bn.load(path).gamma, old.gamma)


def test_failed_safetensors_save_keeps_the_old_file(tmp_path, rng, monkeypatch):
    stn = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "bn.safetensors"
    _trained_layer(rng).save(path)
    before = path.read_bytes()

    def save(*args, **kwargs):
        raise MemoryError("while serialising")

    monkeypatch.setattr(stn, "save", save)
    with pytest.raises(MemoryError):
        bn.BatchNorm(3).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.safetensors"]


def test_save_into_a_missing_directory_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        bn.BatchNorm(3).save(tmp_path / "nowhere" / "bn.npz")
    assert os.listdir(tmp_path) == []


def test_saved_file_gets_the_usual_permissions(tmp_path):
    # The temporary file is renamed into place: its mode must be what open() would give.
    (tmp_path / "plain").write_bytes(b"")
    bn.BatchNorm(3).save(tmp_path / "bn.npz")
    assert (tmp_path / "bn.npz").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_save_replaces_an_existing_file(tmp_path, rng):
    path = tmp_path / "bn.npz"
    bn.BatchNorm(3).save(path)
    layer = _trained_layer(rng)
    layer.save(path)
    np.testing.assert_array_equal(bn.load(path).running_var, layer.running_var)
    assert os.listdir(tmp_path) == ["bn.npz"]


# ---------------------------------------------------------------------------------------------
# 2. one documented error type naming the file and what is wrong


def _write_npz(arrays):
    return lambda path: path.write_bytes(_npz_bytes(arrays))


def _with(change, rng):
    arrays = dict(_valid_state(rng))
    arrays["config"] = np.array(json.dumps(_config()))
    change(arrays)
    return arrays


def _truncated(path, rng):
    path.write_bytes(_npz_bytes(_with(lambda a: None, rng))[:300])


def _corrupted(path, rng):
    data = bytearray(_npz_bytes(_with(lambda a: None, rng)))
    i = data.index(b"\x93NUMPY", 200)  # inside the second member: its CRC no longer matches
    data[i + 130] ^= 0xFF
    path.write_bytes(bytes(data))


def _torch_like_zip(path, rng):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
        zf.writestr("archive/version", "3\n")


BAD_NPZ = {
    "npy": (lambda p, r: p.write_bytes(_npy_header((3,), "<f8") + bytes(24)),
            r"single \.npy array"),
    "empty": (lambda p, r: p.write_bytes(b""), r"is empty"),
    "text": (lambda p, r: p.write_text("hello, world\n" * 3), r"neither an \.npz"),
    "truncated": (_truncated, r"zip"),
    "corrupt": (_corrupted, r"damaged|CRC"),
    "config-null": (
        lambda p, r: _write_npz(_with(lambda a: a.update(config=np.array("null")), r))(p),
        r"expected its 'config' to be a JSON object, got NoneType",
    ),
    "config-not-json": (
        lambda p, r: _write_npz(_with(lambda a: a.update(config=np.array("{nope")), r))(p),
        r"not valid JSON",
    ),
    "config-not-a-string": (
        lambda p, r: _write_npz(_with(lambda a: a.update(config=np.ones(2)), r))(p),
        r"expected 'config' to be a JSON string, got float64",
    ),
    "no-config": (
        lambda p, r: _write_npz(_with(lambda a: a.pop("config"), r))(p), r"no 'config' entry"
    ),
    "no-num-features": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(num_features=_DROP)))), r))(p),
        r"no 'num_features'",
    ),
    "unknown-key": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(colour="red")))), r))(p),
        r"unknown configuration key\(s\) \['colour'\]",
    ),
    "bad-num-features": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(num_features="3")))), r))(p),
        r"expected num_features to be an int >= 1, got '3'",
    ),
    "bad-affine": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(affine="no")))), r))(p),
        r"expected affine to be true or false, got 'no'",
    ),
    "bad-frozen": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(frozen="yes")))), r))(p),
        r"invalid configuration: expected frozen to be true or false",
    ),
    "bad-trainable-affine": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(frozen=True, trainable_affine=1)))), r))(p),
        r"invalid configuration: .*trainable_affine",
    ),
    "bad-config-value": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(eps="small")))), r))(p),
        r"invalid configuration",
    ),
    "wrong-class": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            config=np.array(json.dumps(_config(**{"class": "Linear"})))), r))(p),
        r"expected a saved BatchNorm, got class 'Linear'",
    ),
    "wrong-shape": (
        lambda p, r: _write_npz(_with(lambda a: a.update(gamma=np.ones(4, np.float32)), r))(p),
        r"expected 'gamma' of shape \(3,\), got \(4,\)",
    ),
    "wrong-dtype": (
        lambda p, r: _write_npz(_with(lambda a: a.update(running_var=np.ones(3, int)), r))(p),
        r"expected 'running_var' of a float dtype .*, got int64",
    ),
    "complex": (
        lambda p, r: _write_npz(_with(lambda a: a.update(beta=np.ones(3, complex)), r))(p),
        r"expected 'beta' of a float dtype",
    ),
    "object": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            gamma=np.array([{"a": 1}, None, 3], dtype=object)), r))(p),
        r"expected 'gamma' of a float dtype .*, got object",
    ),
    "float-counter": (
        lambda p, r: _write_npz(_with(lambda a: a.update(num_batches_tracked=np.array(2.0)), r))(p),
        r"expected 'num_batches_tracked' of an integer dtype",
    ),
    "missing": (
        lambda p, r: _write_npz(_with(lambda a: a.pop("beta"), r))(p),
        r"missing \['beta'\], unexpected \[\]",
    ),
    "extra": (
        lambda p, r: _write_npz(_with(lambda a: a.update(extra=np.ones(3)), r))(p),
        r"missing \[\], unexpected \['extra'\]",
    ),
    "nan": (
        lambda p, r: _write_npz(_with(lambda a: a["beta"].__setitem__(1, np.nan), r))(p),
        r"finite beta",
    ),
    "negative-var": (
        lambda p, r: _write_npz(_with(lambda a: a.update(running_var=-np.ones(3, "f4")), r))(p),
        r"running_var >= 0",
    ),
    "counter-overflow": (
        lambda p, r: _write_npz(_with(lambda a: a.update(
            num_batches_tracked=np.array(2**63, np.uint64)), r))(p),
        r"num_batches_tracked in \[0, 2\*\*63 - 1\] \(int64\), got 9223372036854775808",
    ),
    "torch-zip": (_torch_like_zip, r"pickle.*safetensors\.torch\.save_file"),
    "pickle": (
        lambda p, r: p.write_bytes(pickle.dumps({"gamma": [1.0]}, protocol=4)),
        r"unpickling can run arbitrary code",
    ),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_load_refuses_bad_files_with_load_error(tmp_path, rng, case):
    make, match = BAD_NPZ[case]
    path = tmp_path / "bad.npz"
    make(path, rng)
    with pytest.raises(bn.LoadError, match=match) as info:
        bn.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def test_a_pt_file_is_refused_by_its_name_without_reading_it(tmp_path, rng):
    path = tmp_path / "model.pt"
    _trained_layer(rng).save(path)  # even a valid archive: the name says pickle
    with pytest.raises(bn.LoadError, match=r"unpickling can run arbitrary code.*save_file"):
        bn.load(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        bn.load(tmp_path / "nothing.npz")


def _safetensors_file(path, arrays, metadata):
    stn = pytest.importorskip("safetensors.numpy")
    path.write_bytes(stn.save(arrays, metadata=metadata))


BAD_SAFETENSORS = {
    "no-metadata": (lambda s: (s, None), r"no 'config' metadata"),
    "config-null": (lambda s: (s, {"config": "null"}), r"got NoneType"),
    "unknown-key": (lambda s: (s, {"config": json.dumps(_config(colour=1))}), r"\['colour'\]"),
    "wrong-class": (
        lambda s: (s, {"config": json.dumps(_config(**{"class": "X"}))}), r"class 'X'"
    ),
    "wrong-shape": (
        lambda s: ({**s, "gamma": np.ones(5, "f4")}, {"config": json.dumps(_config())}),
        r"expected 'gamma' of shape \(3,\), got \(5,\)",
    ),
    "wrong-dtype": (
        lambda s: ({**s, "gamma": np.ones(3, "i4")}, {"config": json.dumps(_config())}),
        r"expected 'gamma' of a float dtype .*, got I32",
    ),
    "extra": (
        lambda s: ({**s, "x": np.ones(3, "f4")}, {"config": json.dumps(_config())}),
        r"unexpected \['x'\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_load_refuses_bad_safetensors_files(tmp_path, rng, case):
    change, match = BAD_SAFETENSORS[case]
    arrays, meta = change(_valid_state(rng))
    path = tmp_path / "bad.safetensors"
    _safetensors_file(path, arrays, meta)
    with pytest.raises(bn.LoadError, match=match) as info:
        bn.load(path)
    assert str(path) in str(info.value)


def test_safetensors_header_lengths_that_look_like_pickle_bytes_load(tmp_path, rng):
    # A header of 0x380 bytes starts with b"\x80\x03", the signature of a protocol-3 pickle.
    st = pytest.importorskip("safetensors.numpy")
    layer = _trained_layer(rng)
    config = json.dumps(layer._config())
    for extra in range(1024):
        data = st.save(layer.state_dict(), metadata={"config": config, "pad": "x" * extra})
        if data[0] == 0x80 and 2 <= data[1] <= 5:
            break
    else:  # pragma: no cover
        pytest.fail("no padding gave a header length of 0x2NN to 0x5NN")
    (tmp_path / "bn.safetensors").write_bytes(data)
    np.testing.assert_array_equal(bn.load(tmp_path / "bn.safetensors").gamma, layer.gamma)


def test_load_refuses_a_truncated_safetensors_file(tmp_path, rng):
    pytest.importorskip("safetensors")
    path = tmp_path / "bn.safetensors"
    _trained_layer(rng).save(path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(bn.LoadError, match="bn.safetensors"):
        bn.load(path)


# ---------------------------------------------------------------------------------------------
# 3. names, shapes and dtypes are checked before any data is read


def _stream_member(zf: zipfile.ZipFile, name: str, header: bytes, nbytes: int) -> None:
    """A member of `nbytes` zeros after `header`, compressed as it is written (the test never
    holds it in memory)."""
    chunk = bytes(1 << 20)
    with zf.open(name, "w", force_zip64=True) as f:
        f.write(header)
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)


def test_an_unexpected_large_member_is_refused_without_being_read(tmp_path, rng):
    path = tmp_path / "bomb.npz"
    arrays = _with(lambda a: None, rng)
    size = 128 << 20  # 128 MiB when decompressed, about 130 kB on disk
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v, allow_pickle=False)
        _stream_member(zf, "extra.npy", _npy_header((size // 8,), "<f8"), size)
    assert path.stat().st_size < size // 100
    tracemalloc.start()
    try:
        with pytest.raises(bn.LoadError, match=r"unexpected \['extra'\]"):
            bn.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes while refusing the file"


def test_a_header_declaring_a_huge_array_is_refused_from_the_header(tmp_path, rng):
    # The member declares 10**12 float64 values and holds none: reading it would fail with
    # MemoryError or an EOF error, not with the shape message.
    arrays = _with(lambda a: a.pop("running_var"), rng)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v, allow_pickle=False)
        zf.writestr("running_var.npy", _npy_header((10**12,), "<f8"))
    with pytest.raises(bn.LoadError, match=r"expected 'running_var' of shape \(3,\), got "
                                           r"\(1000000000000,\)"):
        bn.load(path)


def test_a_configuration_and_header_claiming_a_huge_layer_allocate_nothing(tmp_path, rng):
    # num_features and the header agree on 10**9 values, but the member holds 12 bytes.
    c = 10**9
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.npy", _npy_bytes(np.array(json.dumps(_config(
            num_features=c, track_running_stats=False)))))
        zf.writestr("gamma.npy", _npy_header((c,), "<f4") + bytes(12))
        zf.writestr("beta.npy", _npy_header((c,), "<f4") + bytes(12))
    tracemalloc.start()
    try:
        with pytest.raises(bn.LoadError, match=r"member 'gamma' declares 4000000000 bytes of "
                                               r"data but holds 12"):
            bn.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_an_object_header_is_refused_before_its_pickle_is_read(tmp_path, rng):
    arrays = _with(lambda a: a.pop("gamma"), rng)
    path = tmp_path / "obj.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v, allow_pickle=False)
        zf.writestr("gamma.npy", _npy_header((3,), "|O") + b"not a pickle at all")
    with pytest.raises(bn.LoadError, match=r"'gamma' of a float dtype .*, got object"):
        bn.load(path)


def test_an_unexpected_member_is_not_even_parsed(tmp_path, rng):
    arrays = _with(lambda a: None, rng)
    data = _npz_bytes(arrays)
    path = tmp_path / "junk.npz"
    path.write_bytes(data)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("junk.npy", b"this is not an npy header")
    with pytest.raises(bn.LoadError, match=r"unexpected \['junk'\]"):
        bn.load(path)


# ---------------------------------------------------------------------------------------------
# 13. num_batches_tracked stays within int64


@pytest.mark.parametrize("value", [2**63, 2**64 - 1, -1])
def test_load_state_dict_refuses_a_counter_outside_int64(rng, value):
    layer = _trained_layer(rng)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(value, np.uint64 if value >= 2**63 else np.int64)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"num_batches_tracked in \[0, 2\*\*63 - 1\]"):
        layer.load_state_dict(state)
    assert_same_state(before, layer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_and_save_work_after_the_largest_accepted_counter(tmp_path, rng, fmt):
    _need(fmt)
    layer = _trained_layer(rng)
    state = layer.state_dict()
    state["num_batches_tracked"] = np.array(2**63 - 1, np.uint64)
    layer.load_state_dict(state)
    path = tmp_path / f"bn.{fmt}"
    for _ in range(2):
        assert layer.state_dict()["num_batches_tracked"] == 2**63 - 1
        layer.save(path)
        assert bn.load(path).num_batches_tracked == 2**63 - 1
        layer(rng.normal(size=(4, 3)))  # counting on saturates at the int64 maximum


# ---------------------------------------------------------------------------------------------
# whole models


def _trained_cnn(rng, **kw):
    model = cnn(batchnorm=True, channels=(4, 6), hidden=(12,), rng=rng, **kw)
    for _ in range(2):
        model(rng.normal(size=(5, 1, 8, 8)))
    return model


def test_sequential_state_dict_names_and_copies(rng):
    model = _trained_cnn(rng)
    sd = model.state_dict()
    assert list(sd)[:7] == ["0.W", "0.b", "1.gamma", "1.beta", "1.running_mean",
                            "1.running_var", "1.num_batches_tracked"]
    assert sd["1.num_batches_tracked"] == 2 and sd["1.num_batches_tracked"].dtype == np.int64
    sd["0.W"][:] = 0
    assert (model[0].W != 0).any()
    other = cnn(batchnorm=True, channels=(4, 6), hidden=(12,), rng=np.random.default_rng(5))
    other.load_state_dict(model.state_dict())
    x = rng.normal(size=(3, 1, 8, 8))
    np.testing.assert_array_equal(other.eval()(x), model.eval()(x))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_save_and_load_round_trip(tmp_path, rng, fmt, dtype):
    _need(fmt)
    model = _trained_cnn(rng, dtype=dtype)
    path = tmp_path / f"model.{fmt}"
    model.save(path)
    other = cnn(batchnorm=True, channels=(4, 6), hidden=(12,), rng=np.random.default_rng(7),
                dtype=dtype)
    assert other.load(path) is other
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v, err_msg=k)
    x = rng.normal(size=(3, 1, 8, 8)).astype(dtype)
    np.testing.assert_array_equal(other.eval()(x), model.eval()(x))


def _model_state(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_same_model(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_load_refuses_another_structure_naming_the_layer(tmp_path, rng, fmt):
    _need(fmt)
    path = tmp_path / f"model.{fmt}"
    _trained_cnn(rng).save(path)
    wider = cnn(batchnorm=True, channels=(4, 6), hidden=(13,), rng=rng)
    before = _model_state(wider)
    with pytest.raises(bn.LoadError, match=r"model\.\w+': layer 9 \(Linear\(24, 13, bias=True\)"
                                           r"\), 'W': expected '9.W' of shape \(24, 13\), got "
                                           r"\(24, 12\)$"):
        wider.load(path)
    _assert_same_model(before, wider)
    no_bn = cnn(batchnorm=False, channels=(4, 6), hidden=(12,), rng=rng)
    with pytest.raises(bn.LoadError, match=r"layer 1 is a BatchNorm in the file, a ReLU here"):
        no_bn.load(path)
    with pytest.raises(bn.LoadError, match=r"not a saved model .* batchnorm\.load"):
        wider.load(_save_layer(tmp_path, rng, fmt))
    with pytest.raises(bn.LoadError, match=r"holds a whole model .* model\.load"):
        bn.load(path)
    _assert_same_model(before, wider)


def _save_layer(tmp_path, rng, fmt):
    path = tmp_path / f"layer.{fmt}"
    _trained_layer(rng).save(path)
    return path


def test_model_load_checks_values_of_every_layer_before_changing_any(tmp_path, rng):
    model = _trained_cnn(rng)
    path = tmp_path / "model.npz"
    state = model.state_dict()
    state["10.running_var"][0] = -1.0  # only the last batch-norm layer is wrong
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in {**state, "config": np.array(json.dumps(model._file_config()))}.items():
            with zf.open(k + ".npy", "w") as f:
                np.lib.format.write_array(f, v)
    fresh = _trained_cnn(np.random.default_rng(3))
    before = _model_state(fresh)
    with pytest.raises(bn.LoadError, match=r"layer 10 \(BatchNorm\(12.*running_var >= 0"):
        fresh.load(path)
    _assert_same_model(before, fresh)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda s: s.pop("4.b"), KeyError, r"layer 4 \(Conv2d.*missing \['b'\]"),
        (lambda s: s.update({"2.W": np.ones(1)}), KeyError, r"layer 2 \(ReLU\(\)\).*unexpected"),
        (lambda s: s.update({"99.W": np.ones(1)}), KeyError, r"'99.W'.*index below 13"),
        (lambda s: s.update({"9.W": np.ones((24, 11))}), ValueError, r"layer 9 .*\(24, 12\)"),
        (lambda s: s.update({"0.b": np.ones(4, int)}), TypeError, r"layer 0 .*float dtype"),
        (lambda s: s.update({"12.b": np.full(10, np.inf)}), ValueError, r"layer 12 .*finite"),
    ],
)
def test_sequential_load_state_dict_refuses_and_changes_nothing(rng, change, error, match):
    model = _trained_cnn(rng)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    change(state)
    before = _model_state(model)
    with pytest.raises(error, match=match):
        model.load_state_dict(state)
    _assert_same_model(before, model)


def test_sequential_of_layers_without_state_dict(tmp_path, rng):
    class Scale:  # a user's layer that follows the protocol without state_dict
        def __init__(self):
            self.s = np.ones(2)

        params = property(lambda self: {"s": self.s})

    model = Sequential([Scale()])
    model.layers[0].s[:] = [2.0, 3.0]
    model.save(tmp_path / "m.npz")
    other = Sequential([Scale()])
    other.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(other.layers[0].s, [2.0, 3.0])


def test_mlp_without_batchnorm_round_trips(tmp_path, rng):
    model = mlp(6, 3, (5,), rng=rng)
    model.save(tmp_path / "m.npz")
    other = mlp(6, 3, (5,), rng=np.random.default_rng(1)).load(tmp_path / "m.npz")
    x = rng.normal(size=(2, 6))
    np.testing.assert_array_equal(other(x), model(x))


def test_nested_sequential_state(rng):
    def make(seed):
        r = np.random.default_rng(seed)
        return Sequential([mlp(4, 4, (5,), batchnorm=True, rng=r), mlp(4, 2, (3,), rng=r)])

    model = make(0)
    model(rng.normal(size=(6, 4)))
    assert "0.1.running_var" in model.state_dict()
    other = make(1)
    other.load_state_dict(model.state_dict())
    x = rng.normal(size=(2, 4))
    np.testing.assert_array_equal(other.eval()(x), model.eval()(x))
    state = model.state_dict()
    state["1.2.W"] = np.ones((3, 3))
    before = _model_state(other)
    with pytest.raises(ValueError, match=r"layer 1 \(Sequential.*layer 2 \(Linear"):
        other.load_state_dict(state)
    _assert_same_model(before, other)
