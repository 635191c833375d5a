"""The numba backend under Python threads and after ``fork``, for every threading layer numba can
load here (each check runs in a fresh interpreter: the layer is chosen once per process, and a
crash or a hang must fail the test, not end the test run)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

SRC = Path(__file__).resolve().parent.parent / "src"
# Seconds for a whole child run. Generous (it may compile the kernels on a loaded machine);
# a run that goes well takes a few seconds and never waits for it.
TIMEOUT = 600


def _layers() -> list[str]:
    """numba's threading layers that can be loaded on this machine (workqueue is built in)."""
    found = []
    for name, module in (("omp", "omppool"), ("tbb", "tbbpool"), ("workqueue", "workqueue")):
        try:
            importlib.import_module(f"numba.np.ufunc.{module}")
        except (ImportError, OSError):
            continue
        found.append(name)
    return found


LAYERS = _layers()


def run_child(code: str, layer: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BATCHNORM_BACKEND", None)
    # Two threads at least, so that large inputs take the parallel drivers on any machine.
    env.update(NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", _COMMON + textwrap.dedent(code), layer],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


# Shared by the children: training forward and backward and inference on inputs large enough
# for the parallel drivers (>= 2**15 values), in both layouts, against the NumPy backend; and
# a count of the parallel driver calls (to show that the parallel path was taken).
_COMMON = textwrap.dedent("""
    import os
    import sys

    import numba
    import numpy as np

    import batchnorm as bn
    from batchnorm import _numba

    LAYER = sys.argv[1]
    PARALLEL_CALLS = []


    def _count(name):
        real = getattr(_numba, name)

        def wrapper(*args):
            PARALLEL_CALLS.append(name)
            return real(*args)

        setattr(_numba, name, wrapper)


    for _name in ("_rows_moments_par", "_planes_moments_par"):
        _count(_name)

    _rng = np.random.default_rng(0)
    CASES = []
    for _shape, _axis in (((4096, 16), 1), ((16, 8, 32, 32), 1)):
        _x = (5 + 2 * _rng.standard_normal(_shape)).astype(np.float32)
        _dy = _rng.standard_normal(_shape).astype(np.float32)
        _g = _rng.normal(1, 0.2, _shape[_axis]).astype(np.float32)
        _b = _rng.normal(0, 0.2, _shape[_axis]).astype(np.float32)
        CASES.append((_x, _dy, _g, _b, _axis))


    def compute(backend):
        out = []
        for x, dy, g, b, axis in CASES:
            y, cache = bn.batch_norm_train(x, g, b, axis=axis, backend=backend)
            dx, dg, db = bn.batch_norm_backward(dy, cache)
            yi = bn.batch_norm_inference(x, g, b, cache.mean, cache.var + 1.0, axis=axis,
                                         backend=backend)
            out += [y, cache.mean, cache.var, dx, dg, db, yi]
        return out


    REF = compute("numpy")


    def check(got):
        for k, (a, b) in enumerate(zip(got, REF, strict=True)):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            err = np.abs(a64 - b64).max() / np.abs(b64).max()
            assert err < 1e-4, f"output {k}: relative difference {err:.1e} from NumPy"
""")


@pytest.mark.parametrize("layer", LAYERS)
def test_calls_from_several_threads_at_once(layer):
    """Under workqueue, two threads in parallel kernels at once ended the process (SIGABRT,
    "Concurrent access has been detected"). Now every call is safe, and right."""
    proc = run_child("""
        import threading

        start = threading.Barrier(4)
        errors = []


        def work():
            try:
                start.wait()
                for _ in range(15):
                    check(compute("numba"))
            except BaseException as err:  # reported by the main thread
                errors.append(repr(err))


        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert numba.threading_layer() == LAYER, numba.threading_layer()
        assert PARALLEL_CALLS, "the parallel drivers never ran"
        print("ok", len(PARALLEL_CALLS), "parallel calls")
    """, layer)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "ok" in proc.stdout


@pytest.mark.parametrize("layer", LAYERS)
def test_forked_children_use_the_library(layer):
    """After the parallel kernels ran, a child made by ``os.fork`` or by multiprocessing's fork
    start method was killed (GNU OpenMP) and a multiprocessing parent then waited forever. Now
    the children compute (with the serial kernels) and the parent keeps its parallel ones."""
    proc = run_child("""
        import multiprocessing
        import traceback

        check(compute("numba"))  # in the parent: starts the threading layer
        assert numba.threading_layer() == LAYER, numba.threading_layer()
        assert PARALLEL_CALLS, "the parallel drivers never ran in the parent"
        calls = len(PARALLEL_CALLS)


        def in_child(_=None):
            check(compute("numba"))
            # Serial kernels only: the threading layer is left alone.
            assert len(PARALLEL_CALLS) == calls, "a forked child ran a parallel driver"
            return os.getpid()


        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                in_child()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"os.fork child: status {status}"

        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(target=in_child)
        p.start()
        p.join()
        assert p.exitcode == 0, f"multiprocessing child: exit code {p.exitcode}"
        with ctx.Pool(2) as pool:
            pids = pool.map(in_child, range(4))
        assert os.getpid() not in pids

        check(compute("numba"))  # the parent still runs its parallel kernels
        assert len(PARALLEL_CALLS) > calls
        print("ok")
    """, layer)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "ok" in proc.stdout
