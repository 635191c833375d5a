"""``batchnorm info``: the backend in use, versions, threads and the kernel cache.

Prints what decides speed and behaviour on this machine, for bug reports and for checking an
installation (``pip install 'batchnorm[fast]'`` should show ``backend in use: numba``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from typing import Any

from ..backends import ENV_VAR, available_backends, get_backend

__all__ = ["collect", "main"]


def _version(dist: str) -> str | None:
    # Package metadata, not an import: asking for torch's version must not load torch.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _writable(path: str) -> bool:
    """Whether files can be created in ``path`` (created if missing, as numba would)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def _numba_info() -> dict[str, Any]:
    try:
        import numba
    except ImportError as err:
        return {"importable": False, "error": str(err)}
    out: dict[str, Any] = {"importable": True, "version": numba.__version__}
    out["threads"] = numba.get_num_threads()  # also starts the thread pool
    out["max_threads"] = numba.config.NUMBA_NUM_THREADS
    try:
        out["threading_layer"] = numba.threading_layer()
    except ValueError:
        out["threading_layer"] = None
    try:
        from .._numba import kernels

        # Where numba will store and look for the compiled kernels: NUMBA_CACHE_DIR, the
        # package's __pycache__, or a per-user directory when the package is read-only.
        path = kernels[0].stats.cache_path
    except Exception as err:  # noqa: BLE001 - a broken cache must not break `info`
        path = None
        out["cache_error"] = f"{type(err).__name__}: {err}"
    out["cache_dir"] = path
    out["cache_writable"] = None if path is None else _writable(path)
    return out


def collect() -> dict[str, Any]:
    """Everything ``batchnorm info`` prints, as a dict (what ``--json`` prints).

    Returns
    -------
    dict
        Keys ``backend``, ``env``, ``available``, ``versions``, ``numba``, ``cpu``.
    """
    env = os.environ.get(ENV_VAR)
    try:
        in_use: str | None = get_backend().name
        error = None
    except (ImportError, ValueError) as err:
        in_use, error = None, str(err)
    from .. import __version__

    return {
        "backend": in_use,
        "backend_error": error,
        "env": {ENV_VAR: env},
        "available": available_backends(),
        "versions": {
            "batchnorm": __version__,
            "python": platform.python_version(),
            "numpy": _version("numpy"),
            "numba": _version("numba"),
            "torch": _version("torch"),
        },
        "numba": _numba_info(),
        "cpu": {
            "model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
        },
    }


def _text(d: dict[str, Any]) -> str:
    env = d["env"][ENV_VAR]
    how = f"{ENV_VAR}={env}" if env else f"{ENV_VAR} not set, so 'auto'"
    used = d["backend"] or f"none ({d['backend_error']})"
    nb = d["numba"]
    lines = [
        f"backend in use : {used}   ({how})",
        f"available      : {', '.join(d['available'])}",
        "versions       : "
        + ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v is not None),
    ]
    if nb["importable"]:
        lines.append(
            f"numba threads  : {nb['threads']} of {nb['max_threads']}, "
            f"threading layer {nb['threading_layer']}"
        )
        state = {True: "writable", False: "NOT writable", None: "unknown"}[nb["cache_writable"]]
        lines.append(f"kernel cache   : {nb['cache_dir']} ({state})")
    else:
        lines.append(f"numba          : not importable ({nb['error']}); "
                     "pip install 'batchnorm[fast]' for the fast backend")
    cpu = d["cpu"]
    lines.append(f"cpu            : {cpu['model']}, {cpu['cpu_count']} logical CPUs "
                 f"({cpu['usable']} usable), {cpu['platform']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm info``.

    Parameters
    ----------
    argv : list of str or None
        Command-line arguments after ``info`` (``--json``).

    Returns
    -------
    int
        0, or 1 when the backend asked for in ``BATCHNORM_BACKEND`` cannot be loaded.
    """
    parser = argparse.ArgumentParser(
        prog="batchnorm info", description="Backend in use, versions, threads, kernel cache."
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    d = collect()
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text(d))
    return 0 if d["backend"] is not None else 1
