"""Run on every rank under ``mpiexec`` by tests/test_population_stats.py (not a test module).

Usage: ``mpiexec -n P python -m mpi4py tests/mpi_popstats_worker.py SIZES...``, each argument
the comma-separated shard sizes of one global batch (one size per rank, zeros allowed).

Every rank builds the same network twice: with ``SyncBatchNorm`` (its shard of every batch) and
with ``BatchNorm`` (every global batch whole). ``recompute_batchnorm_stats`` must give both the
same running statistics, identical on every rank. Prints ``rank R ok popstats`` on success.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
from mpi4py import MPI

from batchnorm import BatchNorm
from batchnorm.distributed import convert_sync_batchnorm
from batchnorm.nn import Sequential, mlp, recompute_batchnorm_stats

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()


def bn_layers(model: Sequential) -> list[BatchNorm]:
    return [layer for layer in model.layers if isinstance(layer, BatchNorm)]


def main(argv: list[str]) -> int:
    shards = [[int(v) for v in arg.split(",")] for arg in argv]
    assert all(len(s) == SIZE for s in shards), f"expected {SIZE} sizes per batch, got {argv}"
    for unbiased in (True, False):
        ref = mlp(6, 3, hidden=(5, 4), batchnorm=True, rng=np.random.default_rng(0))
        for layer in bn_layers(ref):
            layer.unbiased = unbiased
        syn = convert_sync_batchnorm(copy.deepcopy(ref))
        rng = np.random.default_rng(1)  # the same global data on every rank
        whole, local = [], []
        for sizes in shards:
            x = rng.standard_normal((sum(sizes), 6)) * 3 + 20
            lo = sum(sizes[:RANK])
            whole.append(x)
            local.append((x[lo : lo + sizes[RANK]], np.zeros(sizes[RANK], np.int64)))
        assert recompute_batchnorm_stats(ref, whole) == len(shards)
        assert recompute_batchnorm_stats(syn, local) == len(shards)
        for a, b in zip(bn_layers(ref), bn_layers(syn), strict=True):
            np.testing.assert_allclose(b.running_mean, a.running_mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(b.running_var, a.running_var, rtol=1e-12, atol=1e-12)
            assert a.num_batches_tracked == b.num_batches_tracked == len(shards)
            table = np.empty((SIZE, 2 * b.num_features))
            COMM.Allgather(np.concatenate([b.running_mean, b.running_var]), table)
            assert (table == table[0]).all(), "running statistics differ between ranks"
        assert syn.training and all(layer.training for layer in syn.layers)
    print(f"rank {RANK} ok popstats", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
