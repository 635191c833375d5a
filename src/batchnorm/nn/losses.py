"""Softmax cross-entropy, the loss of the demo's classifiers."""

from __future__ import annotations

import numpy as np

__all__ = ["SoftmaxCrossEntropy", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `logits` of shape (N, K); subtracting the row maximum keeps ``exp``
    from overflowing."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxCrossEntropy:
    """Cross-entropy of softmax probabilities against integer labels, mean or sum over the batch.

    Parameters
    ----------
    reduction : {"mean", "sum"}, default "mean"
        ``"mean"``: ``loss = -mean_n log softmax(logits)[n, labels[n]]``, gradient
        ``(softmax(logits) - onehot(labels)) / N``. ``"sum"``: the sum over the batch, gradient
        without the ``1 / N``; an empty batch (N = 0) then has loss 0 and an empty gradient,
        which is what a data-parallel process with an empty shard contributes.

    Raises
    ------
    ValueError
        If `reduction` is neither ``"mean"`` nor ``"sum"``.

    Examples
    --------
    >>> loss_fn = SoftmaxCrossEntropy()
    >>> loss = loss_fn(logits, labels)      # float
    >>> dlogits = loss_fn.backward()        # same shape as logits
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"expected reduction 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return self.forward(logits, labels)

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The loss of the batch (mean or sum, see `reduction`).

        Parameters
        ----------
        logits : ndarray of shape (N, K), float
        labels : ndarray of shape (N,), integers in [0, K)

        Returns
        -------
        loss : float

        Raises
        ------
        ValueError
            For shapes other than (N, K) and (N,), or labels outside ``[0, K)``.
        TypeError
            For labels that are not integers.
        """
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(
                f"expected logits of shape (N, K) and labels of shape (N,), got "
                f"{logits.shape} and {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"expected integer labels, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(f"expected labels in [0, {logits.shape[1]}), got values outside")
        z = logits - logits.max(axis=1, keepdims=True)
        logsum = np.log(np.exp(z).sum(axis=1))
        rows = np.arange(labels.size)
        # log softmax = z - logsumexp(z): stable for large logits, unlike log(softmax(z)).
        per_sample = logsum - z[rows, labels]
        loss = float(per_sample.sum() if self.reduction == "sum" else np.mean(per_sample))
        self._cache = (np.exp(z - logsum[:, None]), labels)
        return loss

    def backward(self, scale: float = 1.0) -> np.ndarray:
        """Gradient of ``scale * loss`` with respect to the logits.

        Parameters
        ----------
        scale : float, default 1.0
            Multiplies the gradient. In data-parallel training each process computes the mean
            over its share of the global batch; ``scale = local_size / global_size`` makes the
            summed (all-reduced) gradients those of the global mean.

        Returns
        -------
        dlogits : ndarray of shape (N, K)
        """
        if self._cache is None:
            raise RuntimeError("backward called before forward: expected a forward call first")
        prob, labels = self._cache
        d = prob.copy()
        d[np.arange(labels.size), labels] -= 1.0
        d *= scale if self.reduction == "sum" else scale / max(labels.size, 1)
        return d
