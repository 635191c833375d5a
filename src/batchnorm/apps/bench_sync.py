"""``batchnorm bench --sync``: the cost of SyncBatchNorm against local BatchNorm.

Run as ``batchnorm bench --sync`` (or ``python -m batchnorm.apps.bench_sync``), it launches
``mpiexec -n K`` for each K of ``--ranks`` and prints one table. Run under ``mpiexec``
yourself (``mpiexec -n 4 batchnorm bench --sync``), it measures that job's size only.

For each size K the global batch (``--shape``, default (64, 256, 14, 14)) is split over the
ranks as evenly as possible and every rank times, on its own shard:

- ``BatchNorm`` forward + backward (no communication: what each rank would pay without sync);
- ``SyncBatchNorm`` forward + backward (header and statistics Allgathers, header Allgather
  and Allreduce);
- the two collectives alone, on buffers of the same size.

A step's time is the slowest rank's; the table shows the median over ``--repeat`` steps.
Bytes per step are those of the collectives' buffers (``forward_bytes``, ``backward_bytes``):
``K * (12 + 2C + 2)`` float64 gathered in the forward (headers and statistics), ``K * 12``
gathered and ``2C + 2`` reduced in the backward, independent of the batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._checks import int_at_least

__all__ = ["main"]

_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchnorm bench --sync",
        description="Time SyncBatchNorm forward+backward against local BatchNorm under MPI.",
    )
    p.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=_int_list("process counts", 1), default=[1, 2, 4],
                   help="process counts to launch (default 1,2,4)")
    p.add_argument("--shape", type=_int_list("sizes", 1, min_len=2), default=[64, 256, 14, 14],
                   help="global batch shape N,C,... (default 64,256,14,14)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba"],
                   help="auto, numpy or numba (default auto)")
    p.add_argument("--repeat", type=int_at_least(1), default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=int_at_least(0), default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int_at_least(1), default=1,
                   help="threads per rank for numba/BLAS (default 1: ranks share the cores)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _int_list(what: str, low: int, min_len: int = 1):
    """An argparse ``type``: comma-separated integers ``>= low``, at least `min_len` of them."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}") from None
        if len(values) < min_len or min(values) < low:
            raise argparse.ArgumentTypeError(
                f"expected at least {min_len} {what} >= {low}, comma-separated, got {text!r}")
        return values

    parse.__name__ = what
    return parse


def _under_mpiexec() -> bool:
    return any(k in os.environ for k in _MPI_ENV)


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


# ---------------------------------------------------------------------------------------------
# one MPI job


def _interleaved_medians(comm, fns: list, repeat: int, warmup: int) -> list[float]:
    """Median over steps of the slowest rank's time for each of `fns`, in seconds.

    The functions take turns within every step, so that the noise of a shared machine falls
    on all of them alike.
    """
    from mpi4py import MPI

    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeat):
        for j, fn in enumerate(fns):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
            if i >= warmup:
                times[j].append(dt)
    return [float(np.median(t)) for t in times]


def _worker(args: argparse.Namespace) -> dict:
    from mpi4py import MPI

    from ..distributed import SyncBatchNorm, backward_bytes, forward_bytes, shard_bounds
    from ..layers import BatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    shape = tuple(args.shape)
    n, c = shape[0], shape[1]
    lo, hi = shard_bounds(n, rank, size)
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((hi - lo, *shape[1:])).astype(args.dtype)
    dy = rng.standard_normal(x.shape).astype(args.dtype)
    local = BatchNorm(c, dtype=args.dtype, backend=args.backend)
    sync = SyncBatchNorm(c, comm=comm, dtype=args.dtype, backend=args.backend)
    # With a timeout the collectives are non-blocking and polled with short sleeps: a rank
    # that waits yields its core instead of spinning in MPI.
    polled = SyncBatchNorm(c, comm=comm, dtype=args.dtype, backend=args.backend, timeout=3600)

    def step(layer):
        layer.forward(x)
        layer.backward(dy)

    row = np.zeros(2 * c + 2)
    table = np.empty((size, row.size))
    red = np.empty_like(row)

    def collectives():
        comm.Allgather(row, table)
        comm.Allreduce(row, red, op=MPI.SUM)

    fns = [lambda: step(local), lambda: step(sync), lambda: step(polled)]
    fns += [collectives] if size > 1 else []
    t = [*_interleaved_medians(comm, fns, args.repeat, args.warmup), 0.0]
    t_local, t_sync, t_polled, t_comm = t[:4]
    return {
        "ranks": size,
        "local_batch": hi - lo if rank == 0 else None,
        "shape": list(shape),
        "dtype": args.dtype,
        "backend": sync.backend.name,
        "t_local": t_local,
        "t_sync": t_sync,
        "t_polled": t_polled,
        "t_comm": t_comm,
        "bytes_fwd": forward_bytes(c, size) if size > 1 else 0,
        "bytes_bwd": backward_bytes(c, size) if size > 1 else 0,
    }


# ---------------------------------------------------------------------------------------------
# the launcher


def _table(rows: list[dict]) -> str:
    head = (f"{'ranks':>5} {'shard':>6} {'BatchNorm ms':>13} {'Sync ms':>9} {'overhead':>9} "
            f"{'Sync+timeout ms':>16} {'collectives ms':>15} {'bytes fwd':>10} {'bytes bwd':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        over = r["t_sync"] / r["t_local"] - 1 if r["t_local"] > 0 else float("nan")
        lines.append(
            f"{r['ranks']:>5} {r['local_batch']:>6} {1e3 * r['t_local']:>13.2f} "
            f"{1e3 * r['t_sync']:>9.2f} {100 * over:>8.1f}% {1e3 * r['t_polled']:>16.2f} "
            f"{1e3 * r['t_comm']:>15.3f} "
            f"{r['bytes_fwd']:>10} {r['bytes_bwd']:>10}"
        )
    return "\n".join(lines)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    exe = _mpiexec()
    if exe is None:
        print("batchnorm bench --sync: mpiexec not found; install it with: "
              "pip install 'batchnorm[mpi]'", file=sys.stderr)
        return 2
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(NUMBA_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               OPENBLAS_NUM_THREADS=threads)
    rows = []
    for k in args.ranks:
        cmd = [exe, "-n", str(k), sys.executable, "-m", "mpi4py", "-m", "batchnorm.apps.bench_sync",
               *argv, "--worker"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            print(f"mpiexec -n {k} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                  file=sys.stderr)
            return 1
        rows.append(json.loads(found[-1][len("RESULT "):]))
    r0 = rows[0]
    print(f"SyncBatchNorm vs BatchNorm, forward+backward, global batch {tuple(r0['shape'])} "
          f"{r0['dtype']}, backend {r0['backend']}, {args.threads} thread(s) per rank, "
          f"{os.cpu_count()} CPU(s); median of {args.repeat} steps, slowest rank")
    print(_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm bench --sync``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.worker or _under_mpiexec():
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            print("batchnorm bench --sync needs mpi4py: pip install 'batchnorm[mpi]'",
                  file=sys.stderr)
            return 2
        result = _worker(args)
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            if args.worker:
                print("RESULT " + json.dumps(result), flush=True)
            else:
                print(_table([result]))
        return 0
    return _launch(args, [a for a in argv if a != "--sync"])


if __name__ == "__main__":
    sys.exit(main())
