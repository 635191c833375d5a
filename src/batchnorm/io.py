"""Saved state without pickle: ``.npz`` and ``.safetensors`` files, written atomically and
checked before their data is read.

A file holds named arrays and a JSON configuration (the ``config`` member of an ``.npz``
archive, the ``config`` metadata entry of a ``.safetensors`` file). Reading goes in three
steps, each of which can refuse the file before the next one reads anything:

1. the container (zip central directory, or the safetensors JSON header) and the configuration;
2. the member names, and the shape and dtype each member declares (the ``.npy`` header inside
   the zip, the safetensors header), against what the configuration says the file must hold;
3. the data, whose size is now known to be what the configuration implies.

So a file with an unexpected member, an array declared huge or of an object dtype is refused
without reading (or decompressing) its data. Every refusal is a :class:`LoadError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

from .backends import Backend

__all__ = ["LoadError", "load", "read_arrays", "save_layer", "write_arrays"]

# A configuration is a few hundred characters; this bounds what is read before anything is
# checked.
_MAX_CONFIG_CHARS = 1 << 20

_LAYER_CONFIG_KEYS = frozenset(
    ("class", "num_features", "axis", "eps", "momentum", "affine", "track_running_stats",
     "unbiased", "dtype", "frozen", "trainable_affine", "activation", "virtual_batch_size",
     "rmax", "dmax")
)
_LAYER_CLASSES = ("BatchNorm", "SyncBatchNorm", "BatchRenorm", "SyncBatchRenorm")

# safetensors dtype names by kind: "f" floats numpy can hold, "i" integers.
_ST_KINDS = {
    "F16": "f", "F32": "f", "F64": "f",
    "I8": "i", "I16": "i", "I32": "i", "I64": "i", "U8": "i", "U16": "i", "U32": "i", "U64": "i",
}

_PICKLE_ADVICE = (
    "it is a PyTorch/pickle file, and unpickling can run arbitrary code, so batchnorm never "
    "loads one. Convert it where you trust it, in Python with torch: "
    "safetensors.torch.save_file(model.state_dict(), \"model.safetensors\"), "
    "then load the .safetensors file"
)


class LoadError(ValueError):
    """A file that is not a valid saved layer or model; the message names the file and what
    is wrong. A subclass of ValueError."""


# ---------------------------------------------------------------------------------------------
# writing


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file next to `path`, flush it to disk and rename it
    over `path`: a failure at any point leaves the old file as it was and no temporary file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            # Mode 0o666 less the umask, as open(path, "wb") would give (mkstemp gives 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            break
        except FileExistsError:  # pragma: no cover - a 32-bit random name taken
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself reaches the disk when the directory is synced (POSIX only).
    with contextlib.suppress(OSError, AttributeError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _is_safetensors_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _import_safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as err:
        raise ImportError(
            "reading and writing .safetensors files needs the 'safetensors' package: "
            "pip install 'batchnorm[io]' (or pip install safetensors)"
        ) from err
    return safetensors


def _write_npz(f: IO[bytes], arrays: Mapping[str, np.ndarray], config: str) -> None:
    np.savez(f, config=np.array(config), **arrays)


def _write_safetensors(f: IO[bytes], arrays: Mapping[str, np.ndarray], config: str) -> None:
    st = _import_safetensors()
    # np.ascontiguousarray would make a 0-d array 1-d.
    data = {k: np.array(v, order="C") for k, v in arrays.items()}
    f.write(st.numpy.save(data, metadata={"config": config}))


def write_arrays(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> None:
    """Write `arrays` and the JSON-able `config` to `path`, atomically.

    Parameters
    ----------
    path : str or path-like
        ``*.safetensors`` writes a safetensors file (needs the ``safetensors`` package); any
        other name an ``.npz`` archive (NumPy's own, readable with ``allow_pickle=False``).
    arrays : mapping of str to ndarray
        Numeric arrays; ``"config"`` is reserved.
    config : mapping
        Stored as JSON.

    Raises
    ------
    ImportError
        For ``.safetensors`` without the ``safetensors`` package.
    OSError
        When writing fails; the file at `path`, if any, is then unchanged.
    """
    if "config" in arrays:
        raise ValueError("expected array names other than 'config' (it holds the configuration)")
    text = json.dumps(dict(config))
    if _is_safetensors_path(path):
        _import_safetensors()  # fail before creating anything
        _atomic_write(path, lambda f: _write_safetensors(f, arrays, text))
    else:
        _atomic_write(path, lambda f: _write_npz(f, arrays, text))


# ---------------------------------------------------------------------------------------------
# reading

Spec = Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, kind "f" or "i")


def _sniff(path: str | os.PathLike) -> str:
    """``"npz"``, ``"safetensors"``, or a LoadError for anything else (never unpickles)."""
    name = os.fspath(path)
    with open(name, "rb") as f:  # FileNotFoundError passes through
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    lower = name.lower()
    if lower.endswith((".pt", ".pth", ".ckpt", ".pkl", ".pickle")):
        raise LoadError(f"{name!r}: {_PICKLE_ADVICE}")
    if not head:
        raise LoadError(f"{name!r} is empty; expected an .npz or .safetensors file")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(name) as zf:
                members = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise LoadError(f"{name!r} is not a readable zip/.npz archive: {err}") from err
        if any(m == "data.pkl" or m.endswith("/data.pkl") for m in members):
            raise LoadError(f"{name!r}: {_PICKLE_ADVICE}")
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        raise LoadError(
            f"{name!r} is a single .npy array; expected an .npz archive or .safetensors file "
            "written by save()"
        )
    if len(head) >= 9:
        # Checked before the pickle signature: a header length such as 0x380 starts with the
        # bytes of a protocol-3 pickle. A safetensors file is never unpickled either way.
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise LoadError(f"{name!r}: {_PICKLE_ADVICE}")
    raise LoadError(
        f"{name!r} is neither an .npz archive nor a .safetensors file (first bytes "
        f"{head[:8]!r})"
    )


def _parse_config(name: str, text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as err:
        raise LoadError(f"{name!r}: its 'config' is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise LoadError(
            f"{name!r}: expected its 'config' to be a JSON object, got {type(config).__name__}"
        )
    return config


Describe = Callable[[str], str] | None


def _check_names(name: str, spec: Spec, names: set[str], describe: Describe) -> None:
    missing = [k for k in spec if k not in names]
    unexpected = sorted(names - set(spec))
    if missing or unexpected:
        where = ""
        if describe is not None:
            where = " (first at " + describe((missing or unexpected)[0]) + ")"
        raise LoadError(
            f"{name!r}: array names do not match{where}: missing {missing}, "
            f"unexpected {unexpected}"
        )


def _check_declared(name: str, spec: Spec, declared: Mapping[str, tuple[tuple[int, ...], str]],
                    dtype_names: Mapping[str, str], describe: Describe) -> None:
    for k, (shape, kind) in spec.items():
        where = repr(name) if describe is None else f"{name!r}: {describe(k)}"
        got_shape, got_kind = declared[k]
        what = {"f": "a float dtype (float16, float32, float64)", "i": "an integer dtype"}[kind]
        if got_kind != kind:
            raise LoadError(f"{where}: expected {k!r} of {what}, got {dtype_names[k]}")
        if tuple(got_shape) != tuple(shape):
            raise LoadError(
                f"{where}: expected {k!r} of shape {tuple(shape)}, got {tuple(got_shape)}"
            )


def _npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy format version {version}")


def _npy_kind(dtype: np.dtype) -> str:
    if dtype.type in (np.float16, np.float32, np.float64):
        return "f"
    if dtype.kind in "iu" and dtype.fields is None:
        return "i"
    return "?"


# Deflate expands at most about 1032-fold; a member claiming more is lying about its size.
_MAX_DEFLATE_RATIO = 1100


def _check_member_size(
    name: str, info: zipfile.ZipInfo, key: str, header_size: int, data_size: int
) -> None:
    """The data a header declares must be what the member holds, and the member's size must
    be possible for its compressed size: so reading allocates no more than the file can fill
    (NumPy allocates the whole array before reading it)."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise LoadError(
            f"{name!r}: expected member {key!r} stored or deflated (as numpy.savez writes), "
            f"got zip compression type {info.compress_type}"
        )
    if header_size + data_size != info.file_size:
        raise LoadError(
            f"{name!r}: member {key!r} declares {data_size} bytes of data but holds "
            f"{info.file_size - header_size}"
        )
    limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED
                                  else _MAX_DEFLATE_RATIO)
    if info.file_size > limit + 1024:
        raise LoadError(
            f"{name!r}: member {key!r} claims {info.file_size} bytes from "
            f"{info.compress_size} compressed bytes"
        )


def _read_npz(
    name: str, make_spec: Callable[[dict[str, Any]], Spec], describe: Describe
) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(name) as zf:
        members = zf.namelist()
        bad = [m for m in members if not m.endswith(".npy")]
        if bad:
            raise LoadError(f"{name!r}: expected only .npy members, got {bad[:5]}")
        if "config.npy" not in members:
            raise LoadError(f"{name!r} has no 'config' entry; expected a file written by save()")
        with zf.open("config.npy") as fp:
            shape, _, dtype = _npy_header(fp)
            if dtype.kind != "U" or shape != () or dtype.itemsize > 4 * _MAX_CONFIG_CHARS:
                raise LoadError(
                    f"{name!r}: expected 'config' to be a JSON string, got {dtype} of shape "
                    f"{shape}"
                )
        with zf.open("config.npy") as fp:
            text = str(np.lib.format.read_array(fp, allow_pickle=False))
        spec = make_spec(_parse_config(name, text))
        names = {m[: -len(".npy")] for m in members if m != "config.npy"}
        # Names first: an unexpected member is refused before its header is even opened.
        _check_names(name, spec, names, describe)
        declared, dtypes, sizes = {}, {}, {}
        for k in spec:
            with zf.open(k + ".npy") as fp:
                shape, _, dtype = _npy_header(fp)
                sizes[k] = (fp.tell(), math.prod(shape) * dtype.itemsize)
            declared[k], dtypes[k] = (shape, _npy_kind(dtype)), str(dtype)
        _check_declared(name, spec, declared, dtypes, describe)
        for k, (header_size, data_size) in sizes.items():
            _check_member_size(name, zf.getinfo(k + ".npy"), k, header_size, data_size)
        out = {}
        for k in spec:
            with zf.open(k + ".npy") as fp:
                out[k] = np.lib.format.read_array(fp, allow_pickle=False)
        return out


def _read_safetensors(
    name: str, make_spec: Callable[[dict[str, Any]], Spec], describe: Describe
) -> dict[str, np.ndarray]:
    st = _import_safetensors()
    try:
        with st.safe_open(name, framework="np") as f:
            return _read_safetensors_open(name, f, make_spec, describe)
    except st.SafetensorError as err:
        raise LoadError(f"{name!r} is not a valid .safetensors file: {err}") from err


def _read_safetensors_open(
    name: str, f: Any, make_spec: Callable[[dict[str, Any]], Spec], describe: Describe
) -> dict[str, np.ndarray]:
    meta = f.metadata() or {}
    if "config" not in meta:
        raise LoadError(
            f"{name!r} has no 'config' metadata; expected a file written by save() (a "
            "PyTorch state goes through batchnorm.nn.load_torch_state)"
        )
    spec = make_spec(_parse_config(name, meta["config"]))
    keys = list(f.keys())
    _check_names(name, spec, set(keys), describe)
    declared, dtypes = {}, {}
    for k in spec:
        sl = f.get_slice(k)
        dtypes[k] = sl.get_dtype()
        declared[k] = (tuple(sl.get_shape()), _ST_KINDS.get(dtypes[k], "?"))
    _check_declared(name, spec, declared, dtypes, describe)
    return {k: np.array(f.get_tensor(k)) for k in spec}


def read_arrays(
    path: str | os.PathLike,
    make_spec: Callable[[dict[str, Any]], Spec],
    describe: Describe = None,
) -> dict[str, np.ndarray]:
    """Read a file written by :func:`write_arrays`, checking it before reading its data.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` or ``.safetensors`` file, recognised by its content.
    make_spec : callable
        Given the file's configuration (a dict), returns ``{name: (shape, kind)}`` with kind
        ``"f"`` (float16/32/64) or ``"i"`` (integer) for every array the file must hold, or
        raises LoadError.
    describe : callable, optional
        Turns an array name into the words that name its place in messages (for a model:
        the layer).

    Returns
    -------
    arrays : dict of str to ndarray

    Raises
    ------
    FileNotFoundError
        When `path` does not exist.
    LoadError
        For anything else that is wrong with the file.
    """
    name = os.fspath(path)
    kind = _sniff(name)
    try:
        if kind == "safetensors":
            return _read_safetensors(name, make_spec, describe)
        return _read_npz(name, make_spec, describe)
    except LoadError:
        raise
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as err:
        raise LoadError(f"{name!r} is damaged or not a saved batchnorm file: {err}") from err


# ---------------------------------------------------------------------------------------------
# the BatchNorm layer


def save_layer(layer: Any, path: str | os.PathLike) -> None:
    """Write a :class:`batchnorm.BatchNorm`'s configuration and state to `path` (see
    :meth:`batchnorm.BatchNorm.save`)."""
    write_arrays(path, layer.state_dict(), layer._config())


def _layer_spec(name: str, config: dict[str, Any]) -> tuple[dict[str, Any], Spec]:
    """The arrays the configuration implies; the layer itself is made once the file's headers
    are checked, so that a configuration claiming a huge layer allocates nothing."""
    config = dict(config)
    if "layers" in config and "class" not in config:
        raise LoadError(
            f"{name!r} holds a whole model (batchnorm.nn.Sequential); load it with model.load()"
        )
    cls = config.pop("class", "BatchNorm")
    if cls not in _LAYER_CLASSES:
        raise LoadError(
            f"{name!r}: expected a saved BatchNorm, got class {cls!r} (expected one of "
            f"{', '.join(_LAYER_CLASSES)})"
        )
    renorm = cls in ("BatchRenorm", "SyncBatchRenorm")
    if not renorm and ({"rmax", "dmax"} & set(config)):
        raise LoadError(f"{name!r}: rmax and dmax belong to a BatchRenorm, not a {cls}")
    config["renorm"] = renorm
    unknown = sorted(set(config) - _LAYER_CONFIG_KEYS - {"renorm"})
    if unknown:
        raise LoadError(
            f"{name!r}: unknown configuration key(s) {unknown}; expected some of "
            f"{sorted(_LAYER_CONFIG_KEYS)}"
        )
    if "num_features" not in config:
        raise LoadError(f"{name!r}: its configuration has no 'num_features'")
    c = config["num_features"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise LoadError(f"{name!r}: expected num_features to be an int >= 1, got {c!r}")
    flags = {k: config.get(k, True) for k in ("affine", "track_running_stats")}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise LoadError(f"{name!r}: expected {k} to be true or false, got {v!r}")
    keys = ("gamma", "beta") if flags["affine"] else ()
    if flags["track_running_stats"]:
        keys += ("running_mean", "running_var", "num_batches_tracked")
    spec = {k: (((), "i") if k == "num_batches_tracked" else ((c,), "f")) for k in keys}
    return config, spec


def load(path: str | os.PathLike, *, backend: str | Backend | None = None) -> Any:
    """Read a layer written by ``layer.save(path)``, never with pickle.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` or ``.safetensors`` file (recognised by content, not by name).
    backend : {"auto", "numpy", "numba"} or None
        Of the new layer (not stored in the file).

    Returns
    -------
    BatchNorm or BatchRenorm
        With the saved configuration and state.

    Raises
    ------
    FileNotFoundError
        When `path` does not exist.
    LoadError
        (a ValueError) naming the file and what is wrong, for anything that is not a saved
        layer: another format (``.npy``, a PyTorch ``.pt`` pickle), an empty, truncated or
        damaged file, a configuration that is not a valid layer configuration, missing or
        unexpected arrays, wrong shapes or dtypes (checked before any data is read), object
        arrays, or values the layer refuses (non-finite, negative variance, a
        ``num_batches_tracked`` out of range).
    ImportError
        For a ``.safetensors`` file without the ``safetensors`` package.
    """
    from .layers import BatchNorm  # layers imports this module for save
    from .renorm import BatchRenorm, bound_from_config

    name = os.fspath(path)
    configs: list[dict[str, Any]] = []

    def make_spec(config: dict[str, Any]) -> Spec:
        config, spec = _layer_spec(name, config)
        configs.append(config)
        return spec

    arrays = read_arrays(name, make_spec)
    config = configs[0]
    frozen = config.pop("frozen", False)
    trainable_affine = config.pop("trainable_affine", True)
    try:
        if config.pop("renorm"):
            for key in ("rmax", "dmax"):
                if key in config:
                    config[key] = bound_from_config(config[key], key)
            layer = BatchRenorm(config.pop("num_features"), backend=backend, **config)
        else:
            layer = BatchNorm(config.pop("num_features"), backend=backend, **config)
        if not isinstance(frozen, bool):
            raise TypeError(f"expected frozen to be true or false, got {frozen!r}")
        if frozen:
            layer.freeze(trainable_affine=trainable_affine)
    except (TypeError, ValueError) as err:
        raise LoadError(f"{name!r}: invalid configuration: {err}") from err
    try:
        layer.load_state_dict(arrays)
    except (KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise LoadError(f"{name!r}: {msg}") from err
    return layer
