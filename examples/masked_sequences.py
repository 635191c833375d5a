"""Batch normalization of padded variable-length sequences, with and without a mask.

A batch of 6 sequences of lengths 3 to 20, 8 features per step, channels-last ``(N, L, C)``,
zero-padded to the longest. ``BatchNorm.forward(x, mask)`` with the ``(N, L)`` mask of real
steps normalises with the statistics of the real steps only; without the mask the padding
(here 58 of 120 steps) drags the mean towards 0 and the variance with it.

The script checks (and prints) that:

1. the masked layer's output at the real steps, its running statistics and its gradient at
   the real steps equal those of ``BatchNorm`` applied to the real steps alone (the padding
   removed), and that padded steps get no gradient through the statistics;
2. the unmasked layer differs from both.

Usage, from the repository root: ``.venv/bin/python examples/masked_sequences.py``
"""

from __future__ import annotations

import sys

import numpy as np

from batchnorm import BatchNorm


def main() -> int:
    rng = np.random.default_rng(0)
    lengths = [20, 3, 11, 7, 16, 5]
    n, c, longest = len(lengths), 8, max(lengths)
    x = np.zeros((n, longest, c))
    mask = np.zeros((n, longest), dtype=bool)
    for i, length in enumerate(lengths):
        x[i, :length] = rng.normal(4.0, 2.5, (length, c))
        mask[i, :length] = True
    dy = rng.normal(size=x.shape) * mask[:, :, None]  # a loss on the real steps only

    def layer() -> BatchNorm:
        return BatchNorm(c, axis=-1, dtype=np.float64, unbiased=True, backend="numpy")

    masked, plain, alone = layer(), layer(), layer()
    y_masked = masked.forward(x, mask)
    dx_masked = masked.backward(dy)
    y_plain = plain.forward(x)
    real = x[mask]  # (sum of lengths, C): the real steps, padding removed
    y_alone = alone.forward(real)
    dx_alone = alone.backward(dy[mask])

    checks = {
        "output at real steps": np.max(np.abs(y_masked[mask] - y_alone)),
        "dx at real steps": np.max(np.abs(dx_masked[mask] - dx_alone)),
        "running mean": np.max(np.abs(masked.running_mean - alone.running_mean)),
        "running var": np.max(np.abs(masked.running_var - alone.running_var)),
        "dgamma": np.max(np.abs(masked.dgamma - alone.dgamma)),
    }
    print(f"{n} sequences of lengths {lengths}: {mask.sum()} real steps, "
          f"{mask.size - mask.sum()} padded")
    print("masked BatchNorm against BatchNorm on the real steps alone (max abs difference):")
    for name, err in checks.items():
        print(f"  {name:22s} {err:.2e}")
        assert err < 1e-12, name
    # Padded steps: dy is 0 there and they are not in the statistics, so dx is 0.
    assert np.all(dx_masked[~mask] == 0)
    gap_y = np.max(np.abs(y_plain[mask] - y_alone))
    gap_mean = np.max(np.abs(plain.running_mean - alone.running_mean))
    print("unmasked BatchNorm (padding counted) against the same:")
    print(f"  output at real steps   {gap_y:.2e}")
    print(f"  running mean           {gap_mean:.2e}")
    assert gap_y > 0.1 and gap_mean > 0.1
    print("ok: the mask removes the padding from the statistics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
