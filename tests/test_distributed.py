"""SyncBatchNorm: exactness under real MPI (``mpiexec -n 2, 3, 4`` as subprocesses), no hangs,
the size-1 path, converting a network, and the optional dependency."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchnorm import BatchNorm
from batchnorm.distributed import (
    _merge,
    backward_bytes,
    convert_sync_batchnorm,
    forward_bytes,
    shard_bounds,
)

HERE = Path(__file__).parent
WORKER = HERE / "mpi_worker.py"
# Seconds a whole mpiexec job may take before the test fails: generous, because several ranks
# start Python, import numpy and mpi4py (and compile numba kernels the first time) on a machine
# that may be loaded; a job that goes well ends in seconds and never waits for it. A hang still
# fails the test rather than the CI job. No test measures time itself.
TIMEOUT = 900


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Several ranks on few cores: one thread each, or they fight over the cores.
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_mpi(
    n: int, *args: str, timeout: float = TIMEOUT, mpi4py_main: bool = True
) -> subprocess.CompletedProcess:
    """Run the worker on `n` ranks; ``-m mpi4py`` turns a failed check into an abort."""
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found")
    main = ["-m", "mpi4py"] if mpi4py_main else []
    cmd = [exe, "-n", str(n), sys.executable, *main, str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def run_mpi_module(n: int, module: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` on `n` ranks (through ``-m mpi4py``)."""
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found")
    cmd = [exe, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def assert_all_ok(proc: subprocess.CompletedProcess, n: int, mode: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for r in range(n):
        assert f"rank {r} ok {mode}" in proc.stdout, out


def _backends() -> str:
    from batchnorm import available_backends

    return ",".join(available_backends())


# ---------------------------------------------------------------------------------------------
# under mpiexec


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param("6,6", id="n2-even"),
        pytest.param("2,9,4", id="n3-uneven"),
        pytest.param("5,0,7,3", id="n4-empty-shard"),
    ],
)
def test_sync_equals_batchnorm_on_concatenated_batch(sizes):
    n = len(sizes.split(","))
    # Every backend on the hardest split; the reference backend elsewhere (numba compiles on
    # every rank, which is slow).
    backends = _backends() if n == 4 else "numpy"
    proc = run_mpi(n, "exact", sizes, backends)
    assert_all_ok(proc, n, "exact")


@pytest.mark.parametrize("n, bad_rank", [(2, 1), (3, 0)])
def test_bad_input_on_one_rank_raises_on_every_rank(n, bad_rank):
    proc = run_mpi(n, "bad", str(bad_rank))
    assert_all_ok(proc, n, "bad")


@pytest.mark.parametrize(
    "n, batch, epochs, max_steps",
    [
        pytest.param(3, 50, 3, 0, id="n3-uneven-3-epochs"),
        pytest.param(4, 3, 1, 2, id="n4-empty-shard-2-steps"),
    ],
)
def test_data_parallel_training_equals_single_process(n, batch, epochs, max_steps):
    pytest.importorskip("sklearn")  # the digits data set
    pytest.importorskip("batchnorm.apps.demo")
    proc = run_mpi(n, "train", str(batch), str(epochs), str(max_steps))
    assert_all_ok(proc, n, "train")


def _curves(results: dict) -> list[tuple[str, float]]:
    """Every float of a demo's results.json, with its path (for a side-by-side comparison)."""
    out: list[tuple[str, float]] = []

    def walk(x, path):
        if isinstance(x, dict):
            for k in sorted(x):
                walk(x[k], f"{path}/{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append((path, float(x)))

    walk(results, "")
    return out


def test_demo_distributed_equals_single_process(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("batchnorm.apps.demo")
    import json

    from batchnorm.apps import demo

    args = ["--quick", "--epochs", "2", "--train-size", "300", "--no-progress"]
    # 300 examples, batches of 100 over 3 ranks: shards of 34, 33 and 33.
    proc = run_mpi_module(3, "batchnorm", "demo", "--distributed", *args,
                          "--out", str(tmp_path / "mpi"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone prints the table.
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert demo.main([*args, "--out", str(tmp_path / "one")]) == 0
    got = json.loads((tmp_path / "mpi" / "results.json").read_text())
    want = json.loads((tmp_path / "one" / "results.json").read_text())
    got_c, want_c = _curves(got), _curves(want)
    assert [p for p, _ in got_c] == [p for p, _ in want_c]
    for (path, a), (_, b) in zip(got_c, want_c, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12), path
    assert got["weight_scale"][0]["with_bn"]["test_acc"] == want["weight_scale"][0]["with_bn"][
        "test_acc"]


def test_dead_rank_ends_the_job():
    # MPICH's mpiexec kills the job when a process exits without MPI_Finalize; the other ranks
    # wait for it in a collective with no timeout, so without that the job would hang until
    # TIMEOUT fails the test.
    proc = run_mpi(3, "dead")
    assert proc.returncode != 0
    assert "ok dead" not in proc.stdout
    for r in range(3):  # every rank got past start-up and the first forward
        assert f"rank {r} passed the first forward" in proc.stdout, proc.stdout + proc.stderr


MISMATCHES = ["features", "dtype", "input-dtype", "settings", "order", "mode", "phase", "grads"]


@pytest.mark.parametrize("timeout", ["none", "30"])
def test_configuration_mismatch_raises_on_every_rank(timeout):
    # One kind after the other in one job, rank 1 differing each time; each rank checks that
    # it raised RankMismatchError naming rank 1 and how (the needles are in
    # tests/mpi_worker.py). Before the header exchange: a raw "Message truncated", corrupted
    # statistics or a hang.
    proc = run_mpi(3, "mismatch", ",".join(MISMATCHES), timeout)
    assert_all_ok(proc, 3, "mismatch")
    for kind in MISMATCHES:
        assert proc.stdout.count(f" {kind}: rank 1") == 3, (kind, proc.stdout)


@pytest.mark.parametrize(
    "how, mpi4py_main, timeout",
    [
        ("sys.exit", True, "none"),
        ("sys.exit", False, "none"),
        ("sys.exit", False, "60"),
        ("return", False, "none"),
        ("raise", False, "none"),
    ],
)
def test_a_rank_that_exits_ends_the_job(how, mpi4py_main, timeout):
    # Rank 1 leaves after the first forward; ranks 0 and 2 wait for it in the second. The exit
    # guard ends the job about EXIT_GRACE seconds later (before the layer timeout); a hang
    # fails at the job's hard limit instead of hanging the suite.
    try:
        proc = run_mpi(3, "exit", how, timeout, mpi4py_main=mpi4py_main)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 1 left with {how} and the job hung")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "ok exit" not in proc.stdout
    assert "rank 1 of 3 exited while rank" in proc.stderr, proc.stderr
    assert "waited more than" not in proc.stderr  # the exit notice, not the timeout


def test_ranks_that_end_cleanly_at_different_times_are_not_aborted():
    # Rank 1 exits after the last step; rank 0 works on for longer than the exit grace.
    proc = run_mpi(3, "clean", mpi4py_main=False)
    assert_all_ok(proc, 3, "clean")
    assert "MPI_Abort" not in proc.stderr


def test_stuck_rank_times_out_and_aborts():
    # Rank 1 never returns after the first forward; the others have timeout=2 and must end the
    # job (without that, it would hang until TIMEOUT fails the test).
    proc = run_mpi(3, "stuck")
    assert proc.returncode != 0
    assert "ok stuck" not in proc.stdout
    for r in range(3):  # the timeout did not fire before rank 1 was stuck
        assert f"rank {r} passed the first forward" in proc.stdout, proc.stdout + proc.stderr
    assert "waited more than 2.0 s" in proc.stderr
    assert "MPI_Abort" in proc.stderr


def test_error_on_one_rank_aborts_the_job_without_mpi4py_main():
    """A console script (no ``-m mpi4py``) that raises on one rank inside abort_on_error must
    end every rank instead of leaving rank 0 in a collective forever."""
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found")
    code = (
        "from batchnorm.distributed import DataParallel\n"
        "dp = DataParallel()\n"
        "with dp.abort_on_error():\n"
        "    if dp.rank == 1:\n"
        "        raise ValueError('boom on rank 1')\n"
        "    dp.comm.Barrier()\n"
        "print('finished', dp.rank, flush=True)\n"
    )
    proc = subprocess.run([exe, "-n", "2", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr
    assert "finished" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# in this process


def test_importing_batchnorm_does_not_import_mpi():
    code = (
        "import sys, batchnorm, batchnorm.distributed; "
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_missing_mpi4py_is_an_import_error_that_says_what_to_install(monkeypatch):
    import batchnorm

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    cls = batchnorm.SyncBatchNorm  # the class itself is importable
    with pytest.raises(ImportError, match=r"pip install 'batchnorm\[mpi\]'"):
        cls(4)


def test_single_rank_is_the_local_path():
    MPI = pytest.importorskip("mpi4py.MPI")
    from batchnorm import SyncBatchNorm

    rng = np.random.default_rng(0)
    ref = BatchNorm(5, dtype=np.float64, backend="numpy")
    syn = SyncBatchNorm(5, comm=MPI.COMM_SELF, dtype=np.float64, backend="numpy")
    for _ in range(2):
        x = rng.standard_normal((8, 5, 3))
        dy = rng.standard_normal(x.shape)
        np.testing.assert_array_equal(syn.forward(x), ref.forward(x))
        np.testing.assert_array_equal(syn.backward(dy), ref.backward(dy))
        np.testing.assert_array_equal(syn.dgamma, ref.dgamma)
        np.testing.assert_array_equal(syn.running_var, ref.running_var)
    assert "ranks=1" in repr(syn)
    with pytest.raises(TypeError, match="Intracomm"):
        SyncBatchNorm(5, comm="world")
    with pytest.raises(ValueError, match="timeout"):
        SyncBatchNorm(5, comm=MPI.COMM_SELF, timeout=0)


def test_chan_merge_equals_the_whole_batch_moments():
    rng = np.random.default_rng(3)
    c = 4
    parts = [rng.standard_normal((n, c)) * 3 + 1e4 for n in (3, 0, 1, 8, 5)]
    rows = []
    for p in parts:
        n = len(p)
        mean = p.mean(0) if n else np.zeros(c)
        m2 = ((p - mean) ** 2).sum(0) if n else np.zeros(c)
        rows.append(np.concatenate([[0, n], mean, m2]))
    n, mean, m2 = _merge(np.array(rows), c)
    whole = np.concatenate(parts)
    assert n == len(whole)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-15)
    np.testing.assert_allclose(m2 / n, whole.var(0), rtol=1e-10)
    # All shards empty: count 0, no NaN.
    n0, mean0, m20 = _merge(np.zeros((3, 2 * c + 2)), c)
    assert n0 == 0 and np.all(mean0 == 0) and np.all(m20 == 0)


@pytest.mark.parametrize("n, size", [(10, 4), (3, 4), (0, 2), (12, 3)])
def test_shard_bounds_partition_the_batch(n, size):
    bounds = [shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    lengths = [b - a for a, b in bounds]
    assert max(lengths) - min(lengths) <= 1


def test_bytes_per_step():
    from batchnorm.distributed import HEADER_SIZE

    assert forward_bytes(256, 4) == 8 * 4 * (HEADER_SIZE + 514)
    assert backward_bytes(256, 4) == 8 * (4 * HEADER_SIZE + 514)


def test_convert_sync_batchnorm_shares_arrays():
    MPI = pytest.importorskip("mpi4py.MPI")
    from batchnorm import SyncBatchNorm

    class Net:  # any container of layers: attributes, lists, dicts
        def __init__(self):
            self.bn = BatchNorm(3, backend="numpy")
            self.layers = [object(), BatchNorm(4, backend="numpy")]
            self.layers.append((BatchNorm(2, backend="numpy"),))
            self.named = {"head": BatchNorm(5, backend="numpy")}
            self.layers.append(self.bn)  # the same layer twice stays one layer

    net = Net()
    old = net.bn
    old.forward(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))
    gamma, rmean = old.gamma, old.running_mean
    out = convert_sync_batchnorm(net, comm=MPI.COMM_SELF)
    assert out is net
    assert isinstance(net.bn, SyncBatchNorm) and net.layers[-1] is net.bn
    assert isinstance(net.layers[1], SyncBatchNorm)
    assert isinstance(net.layers[2][0], SyncBatchNorm)
    assert isinstance(net.named["head"], SyncBatchNorm)
    assert net.bn.gamma is gamma and net.bn.running_mean is rmean
    assert net.bn.num_batches_tracked == 1 and net.bn.comm is MPI.COMM_SELF
    # Converting again changes nothing; a bare layer is returned converted.
    assert convert_sync_batchnorm(net, comm=MPI.COMM_SELF).bn is net.bn
    bare = convert_sync_batchnorm(BatchNorm(2, backend="numpy"), comm=MPI.COMM_SELF)
    assert isinstance(bare, SyncBatchNorm)


def test_convert_sync_batchnorm_on_toolkit_networks():
    MPI = pytest.importorskip("mpi4py.MPI")
    from batchnorm import SyncBatchNorm
    from batchnorm.nn import SGD, cnn

    net = cnn((1, 8, 8), 10, channels=(4,), hidden=(8,), batchnorm=True, backend="numpy")
    opt = SGD(net.params, 0.1)  # built before the conversion: must still train the network
    before = [type(layer) for layer in net.layers]
    convert_sync_batchnorm(net, comm=MPI.COMM_SELF)
    kinds = [type(layer) for layer in net.layers]
    assert kinds.count(SyncBatchNorm) == before.count(BatchNorm) == 2
    assert [k for k in kinds if k is not SyncBatchNorm] == [k for k in before if k is not BatchNorm]
    assert all(net.params[k] is v for k, v in opt.params.items())
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8))
    out = net.forward(x)
    net.backward(np.ones_like(out))
    gamma = net.layers[1].gamma.copy()
    opt.step(net.grads)
    assert not np.array_equal(net.layers[1].gamma, gamma)


def test_bench_sync_reports_every_size_and_the_bytes(capsys):
    pytest.importorskip("mpi4py")
    if _mpiexec() is None:
        pytest.skip("mpiexec not found")
    from batchnorm.apps import bench_sync

    rc = bench_sync.main(["--ranks", "1,2", "--shape", "8,16,4,4", "--repeat", "2",
                          "--warmup", "1", "--backend", "numpy"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    assert [r[1] for r in rows] == ["8", "4"]  # rank 0's shard of the global batch
    # No communication on one rank; headers and statistics on two.
    assert rows[0][-2:] == ["0", "0"]
    assert rows[1][-2:] == [str(forward_bytes(16, 2)), str(backward_bytes(16, 2))]
