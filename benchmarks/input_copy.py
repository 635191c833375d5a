"""What the copy of the input costs a training step, and what a read-only input saves.

The kernels keep a private copy of a writeable input for backward (so that editing ``x`` in
place cannot change a gradient); an input that nothing can write to is kept as it is
(``x.setflags(write=False)``). This times ``batch_norm_train`` + ``batch_norm_backward`` with
the numba backend on the benchmark's large cases, writeable and read-only input interleaved,
and prints the medians and their ratio.

Usage, from the repository root: ``.venv/bin/python benchmarks/input_copy.py [rounds]``
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import batchnorm as bn
from batchnorm.apps.bench import CASES


def main(rounds: int = 9) -> None:
    be = bn.get_backend("numba")
    print("| case | writeable x ms | read-only x ms | read-only / writeable |")
    print("|---|---:|---:|---:|")
    for name in ("S1", "S2", "S3", "S4", "S5"):
        case = CASES[name]
        rng = np.random.default_rng(0)
        x = rng.standard_normal(case.shape, dtype=np.float32)
        ro = x.copy()
        ro.setflags(write=False)
        dy = rng.standard_normal(case.shape, dtype=np.float32)
        c = case.shape[case.axis]
        g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        times: dict[str, list[float]] = {"rw": [], "ro": []}
        for r in range(rounds + 1):
            for key, inp in (("rw", x), ("ro", ro)) if r % 2 else (("ro", ro), ("rw", x)):
                t = time.perf_counter()
                _, cache = bn.batch_norm_train(inp, g, b, axis=case.axis, backend=be)
                bn.batch_norm_backward(dy, cache)
                if r:  # the first round warms up
                    times[key].append(time.perf_counter() - t)
        rw, rd = (statistics.median(times[k]) * 1e3 for k in ("rw", "ro"))
        print(f"| {name} {case.label} | {rw:.2f} | {rd:.2f} | {rd / rw:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
