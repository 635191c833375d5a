"""``batchnorm demo``: what batch normalization does to training, on real data, in a minute.

Two experiments, each training the same network with and without batch normalization from the
same initial weights on the same batches:

1. Weight scale (after "Deep Learning from Scratch", section 6.3): the initial weights are
   ``scale * randn`` for 16 scales from 1 to 1e-4. Without batch norm the signal vanishes (small
   scales) or explodes (large ones) through the five hidden layers and the network stays near
   chance; with it every scale learns.
2. Headline (in the spirit of Ioffe & Szegedy 2015, table 2): with He initialisation, the
   training steps each network needs to reach a target test accuracy, at the base learning
   rate and at 5 and 30 times it (the paper's BN-x5 and BN-x30), and the ratios.

Outputs under ``--out``: ``results.json`` (every curve and the settings; deterministic),
``weight_scale.png`` (a grid of test-accuracy curves) and ``headline.png``.

The training loop, :func:`train_network`, is written so that data-parallel training can reuse
it: ``shard`` picks this process's part of every global batch (and scales the loss gradient by
its share), ``grad_hook(model)`` runs between backward and the optimiser step (all-reduce the
parameter gradients there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import get_backend
from ..nn import SGD, Optimizer, Sequential, SoftmaxCrossEntropy, cnn, mlp
from ._checks import check_output_dir, finite_float, int_at_least, write_text_atomic
from .data import DATASETS, Dataset, load_dataset

__all__ = [
    "History",
    "accuracy",
    "build_model",
    "main",
    "make_batches",
    "open_progress_bar",
    "run_experiment",
    "steps_to_target",
    "train_network",
]

# Per data set: epochs of the weight-scale grid and the headline's target test accuracy.
DEFAULT_EPOCHS = {"digits": 30, "mnist": 5, "fashion-mnist": 5}
DEFAULT_EPOCHS_CNN = {"digits": 10, "mnist": 2, "fashion-mnist": 2}
DEFAULT_TARGET = {"digits": 0.90, "mnist": 0.95, "fashion-mnist": 0.82}
QUICK_SCALES = 4
QUICK_EPOCHS = 8
LR_MULTIPLIERS = (1, 5, 30)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class History:
    """What :func:`train_network` records.

    Attributes
    ----------
    train_acc, test_acc : list of float
        Accuracy after each epoch, measured in inference mode on the whole split.
    loss : list of float
        Mean training loss of each epoch (the loss of the batches as they were trained on).
    step_test_acc : list of float
        Test accuracy every ``eval_every`` steps (empty without ``eval_every``).
    eval_steps : list of int
        The step counts at which ``step_test_acc`` was measured.
    steps : int
        Optimiser steps taken.
    diverged_at_step : int or None
        The step at which the loss or a parameter became NaN or infinite; training stopped
        there and later epochs repeat the last measurement.
    """

    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    step_test_acc: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    steps: int = 0
    diverged_at_step: int | None = None


def accuracy(model: Sequential, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Fraction of `x` (N, ...) that `model` classifies as `y` (N,), in inference mode."""
    if len(x) == 0:
        return 0.0
    return float(np.count_nonzero(model.predict(x, batch_size) == y) / len(y))


def make_batches(
    n: int, batch_size: int, epochs: int, seed: int
) -> list[list[np.ndarray]]:
    """Mini-batch indices: for each epoch, a fresh shuffle of ``range(n)`` cut into batches.

    The last incomplete batch of an epoch is dropped, so every step sees `batch_size` examples
    (and the examples left out change from epoch to epoch).

    Returns
    -------
    batches : list (epochs) of lists (steps) of int64 arrays of shape (batch_size,)
    """
    if not 0 < batch_size <= n:
        raise ValueError(
            f"expected 0 < batch_size <= {n} (the training-set size), got {batch_size}"
        )
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    out = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        out.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)])
    return out


def _finite(params: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(p).all() for p in params.values())


def train_network(
    model: Sequential,
    optimizer: Optimizer,
    data: Dataset,
    batches: Sequence[Sequence[np.ndarray]],
    *,
    loss_fn: SoftmaxCrossEntropy | None = None,
    eval_every: int | None = None,
    grad_hook: Callable[[Sequential], None] | None = None,
    shard: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> History:
    """Train `model` on the given batches and record accuracy curves.

    Parameters
    ----------
    model : Sequential
        Takes ``data.x_train[idx]`` and returns logits (N, num_classes).
    optimizer : Optimizer
        Built on ``model.params``; ``optimizer.step(model.grads)`` after each backward.
    data : Dataset
        Inputs already in the model's layout ((N, D) for an MLP, (N, C, H, W) for a CNN).
    batches : sequence (epochs) of sequences (steps) of index arrays
        Global batches, as from :func:`make_batches`.
    loss_fn : SoftmaxCrossEntropy, optional
    eval_every : int, optional
        Also measure test accuracy every this many steps (for steps-to-target).
    grad_hook : callable(model), optional
        Called after backward and before the optimiser step; data-parallel training all-reduces
        ``model.grads`` (in place) here.
    shard : callable(global_idx) -> local_idx, optional
        This process's part of each global batch. The loss gradient is scaled by
        ``len(local_idx) / len(global_idx)`` so that the sum of the processes' gradients is the
        gradient of the global batch mean.
    progress : callable(steps), optional
        Called after every epoch with the number of steps taken in it.

    Returns
    -------
    History
    """
    loss_fn = SoftmaxCrossEntropy() if loss_fn is None else loss_fn
    hist = History()
    x, y = data.x_train, data.y_train
    step = 0
    alive = True

    def record_step() -> None:
        hist.eval_steps.append(step)
        hist.step_test_acc.append(accuracy(model, data.x_test, data.y_test))

    if eval_every:
        record_step()
    # A network without batch norm at a large weight scale may overflow: that is a result of
    # the experiment (it diverged), not an error, so the arithmetic stays quiet and the
    # divergence is recorded.
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in batches:
            losses = []
            if alive:
                model.train()
                for idx in epoch:
                    local = idx if shard is None else shard(idx)
                    loss = loss_fn(model.forward(x[local]), y[local])
                    model.backward(loss_fn.backward(len(local) / len(idx)))
                    if grad_hook is not None:
                        grad_hook(model)
                    optimizer.step(model.grads)
                    step += 1
                    if not (math.isfinite(loss) and _finite(model.params)):
                        hist.diverged_at_step = step
                        alive = False
                        break
                    losses.append(loss)
                    if eval_every and step % eval_every == 0:
                        record_step()
                model.eval()
                hist.train_acc.append(accuracy(model, x, y))
                hist.test_acc.append(accuracy(model, data.x_test, data.y_test))
                hist.loss.append(float(np.mean(losses)) if alive else None)
            else:
                hist.train_acc.append(hist.train_acc[-1])
                hist.test_acc.append(hist.test_acc[-1])
                hist.loss.append(None)
            if progress is not None:
                progress(len(epoch))
    hist.steps = step
    return hist


def steps_to_target(hist: History, target: float) -> int | None:
    """The first step at which the recorded test accuracy reached `target`, or None."""
    for s, acc in zip(hist.eval_steps, hist.step_test_acc, strict=True):
        if acc >= target:
            return s
    return None


# ---------------------------------------------------------------------------------------------
# the experiment


def build_model(
    kind: str,
    data: Dataset,
    *,
    batchnorm: bool,
    weight_init: float | str,
    seed: Any,
    backend: str | None = "numpy",
    dtype: Any = np.float64,
    fuse_activation: bool = True,
) -> Sequential:
    """The demo's network for `data`: ``"mlp"`` (5 hidden layers of 100) or ``"cnn"``.

    The initial weights depend only on `seed` and `weight_init`, not on `batchnorm`, so the two
    networks of a comparison start from the same weights. With `fuse_activation` each
    BatchNorm -> ReLU is one fused layer (``BatchNorm(..., activation="relu")``), which computes
    the same values.
    """
    rng = np.random.default_rng(seed)
    kw = dict(batchnorm=batchnorm, weight_init=weight_init, rng=rng, dtype=dtype, backend=backend,
              fuse_activation=fuse_activation)
    if kind == "mlp":
        return mlp(int(np.prod(data.image_shape)), data.num_classes, (100,) * 5, **kw)
    if kind == "cnn":
        return cnn(data.image_shape, data.num_classes, channels=(8, 16), hidden=(100,), **kw)
    raise ValueError(f"expected model 'mlp' or 'cnn', got {kind!r}")


def _pair(
    kind: str, data: Dataset, weight_init: float | str, seed: Any, batches: Any, lr: float,
    backend: str | None, eval_every: int | None, progress: Callable[[int], None] | None,
    parallel: Any = None,
) -> dict[str, History]:
    """Train the network with and without batch norm from the same weights on the same batches."""
    out = {}
    for key, bn in (("with_bn", True), ("without_bn", False)):
        model = build_model(kind, data, batchnorm=bn, weight_init=weight_init, seed=seed,
                            backend=backend)
        kw: dict[str, Any] = {}
        if parallel is not None:  # data-parallel: see batchnorm.distributed.DataParallel
            model = parallel.prepare(model)
            kw = dict(grad_hook=parallel.grad_hook, shard=parallel.shard,
                      loss_fn=parallel.loss_fn())
        out[key] = train_network(model, SGD(model.params, lr), data, batches,
                                 eval_every=eval_every, progress=progress, **kw)
    return out


def _one_blas_thread():
    """A context that keeps BLAS on one thread, if threadpoolctl is there (scikit-learn brings
    it). The demo's matrices are 100x100: a second thread only adds synchronisation, which
    costs 10x when the cores are busy, and a fixed thread count keeps the sums' order fixed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_experiment(
    dataset: str | Dataset = "digits",
    *,
    model: str = "mlp",
    scales: Sequence[float] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    lr: float = 0.01,
    batch_size: int = 100,
    target: float | None = None,
    headline: bool = True,
    headline_epochs: int | None = None,
    lr_multipliers: Sequence[float] = LR_MULTIPLIERS,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    backend: str | None = "numpy",
    progress: Callable[[int], None] | None = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Run both experiments and return every curve and the settings.

    Parameters
    ----------
    dataset : {"digits", "mnist", "fashion-mnist"} or Dataset
    model : {"mlp", "cnn"}
    scales : sequence of float, optional
        Standard deviations of the initial weights; default 16 log-spaced from 1 to 1e-4.
    epochs : int, optional
        Epochs of every weight-scale run; default by data set and model (``DEFAULT_EPOCHS``).
    seed : int
        Seeds the initial weights (per scale) and the batches (shared by all runs).
    lr, batch_size : float, int
        Plain SGD, as in the book.
    target : float, optional
        Test accuracy of the headline; default by data set (0.90 for digits).
    headline : bool, default True
        Also run the He-initialisation steps-to-target comparison.
    headline_epochs : int, optional
        Default: `epochs`.
    lr_multipliers : sequence of float, default (1, 5, 30)
        The headline trains both networks at ``lr * m`` for each ``m``: batch norm's speed-up
        comes from the larger learning rates it tolerates (the paper's BN-x5 and BN-x30).
    data_dir : path-like, optional
        Directory of the MNIST IDX files.
    train_size : int, optional
        Use only this many training examples (a fixed subset).
    backend : str or None, default "numpy"
        Backend of the batch-norm layers. NumPy's reductions have a fixed order, which makes
        two runs bit-identical; None uses ``$BATCHNORM_BACKEND`` or the fastest available.
    progress : callable(steps), optional
        Called with the steps done after each epoch of each network.
    parallel : batchnorm.distributed.DataParallel, optional
        Train data-parallel over its ranks: each global batch split across them,
        SyncBatchNorm, gradients all-reduced. The curves equal a single process's.

    Returns
    -------
    results : dict
        ``settings``; ``weight_scale``: one entry per scale with ``with_bn`` and ``without_bn``
        curves (``train_acc``, ``test_acc``, ``loss`` per epoch); ``headline`` (or None): per
        learning rate both histories with ``step_test_acc`` every ``eval_every`` steps and
        ``steps_to_target``, then the comparisons. Only JSON types, and nothing that changes
        from run to run (no times).
    """
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_dir)
    data = data.subset(train_size, seed=seed)
    name = data.name
    if model == "mlp":
        data = data.flat()
    scales = [float(s) for s in (np.logspace(0, -4, 16) if scales is None else scales)]
    defaults = DEFAULT_EPOCHS_CNN if model == "cnn" else DEFAULT_EPOCHS
    epochs = defaults.get(name, 5) if epochs is None else int(epochs)
    headline_epochs = epochs if headline_epochs is None else int(headline_epochs)
    target = DEFAULT_TARGET.get(name, 0.9) if target is None else float(target)
    n_train = len(data.x_train)
    steps_per_epoch = n_train // batch_size
    # At most about 50 measurements per epoch: every step on digits, every 12th on MNIST.
    eval_every = max(1, steps_per_epoch // 50)
    lrs = [float(lr * m) for m in lr_multipliers]

    settings = {
        "dataset": name,
        "model": model,
        "train_size": n_train,
        "test_size": len(data.x_test),
        "input_shape": list(data.x_train.shape[1:]),
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "optimizer": "SGD",
        "lr": lr,
        "seed": seed,
        "scales": scales,
        "weight_init": "scale * standard normal, biases zero",
        "batchnorm": "BatchNorm after every hidden affine/conv layer, before ReLU "
                     "(momentum 0.9, eps 1e-5)",
        "dtype": "float64",
        "backend": get_backend(backend).name,
        "headline": {
            "init": "he (std = sqrt(2 / fan_in))",
            "epochs": headline_epochs,
            "target_test_acc": target,
            "eval_every": eval_every,
            "lr_multipliers": [float(m) for m in lr_multipliers],
            "lrs": lrs,
        } if headline else None,
    }
    results: dict[str, Any] = {"settings": settings, "weight_scale": [], "headline": None}

    with _one_blas_thread():
        batches = make_batches(n_train, batch_size, epochs, seed)
        for i, scale in enumerate(scales):
            pair = _pair(model, data, scale, [seed, i], batches, lr, backend, None, progress,
                         parallel)
            results["weight_scale"].append(
                {"scale": scale, **{k: _grid_curves(h) for k, h in pair.items()}}
            )
        if headline:
            hb = make_batches(n_train, batch_size, headline_epochs, seed)
            runs = []
            for m, run_lr in zip(lr_multipliers, lrs, strict=True):
                # The same He weights for every learning rate: only the learning rate changes.
                pair = _pair(model, data, "he", [seed, len(scales)], hb, run_lr, backend,
                             eval_every, progress, parallel)
                runs.append({
                    "lr": run_lr,
                    "lr_multiplier": float(m),
                    **{k: {**asdict(h), "steps_to_target": steps_to_target(h, target)}
                       for k, h in pair.items()},
                })
            results["headline"] = _compare(runs, target, headline_epochs * steps_per_epoch)
    return results


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    reached = [r for r in runs if r[key]["steps_to_target"] is not None]
    if not reached:
        return None
    r = min(reached, key=lambda r: r[key]["steps_to_target"])
    return {"lr": r["lr"], "lr_multiplier": r["lr_multiplier"],
            "steps": r[key]["steps_to_target"]}


def _ratio(slow: int | None, fast: int | None, total: int) -> dict[str, Any]:
    """``slow / fast`` steps; a network that never reached the target counts as `total`
    steps, which makes the ratio a lower bound."""
    if fast is None:
        return {"ratio": None, "lower_bound": False}
    return {"ratio": (total if slow is None else slow) / max(fast, 1),
            "lower_bound": slow is None}


def _compare(runs: list[dict[str, Any]], target: float, total: int) -> dict[str, Any]:
    base = runs[0]
    best_bn, best_plain = _best(runs, "with_bn"), _best(runs, "without_bn")
    fast = None if best_bn is None else best_bn["steps"]
    return {
        "target_test_acc": target,
        "total_steps": total,
        "runs": runs,
        "best_with_bn": best_bn,
        "best_without_bn": best_plain,
        # The paper's comparison: the baseline at its learning rate against batch norm at the
        # higher learning rates it allows.
        "speedup_vs_baseline": _ratio(base["without_bn"]["steps_to_target"], fast, total),
        "speedup_same_lr": _ratio(base["without_bn"]["steps_to_target"],
                                  base["with_bn"]["steps_to_target"], total),
        "speedup_best_vs_best": _ratio(None if best_plain is None else best_plain["steps"],
                                       fast, total),
    }


def _grid_curves(h: History) -> dict[str, Any]:
    return {"train_acc": h.train_acc, "test_acc": h.test_acc, "loss": h.loss,
            "diverged_at_step": h.diverged_at_step}


def total_steps(settings: dict[str, Any]) -> int:
    """Optimiser steps of a whole run (for a progress bar)."""
    n = 2 * len(settings["scales"]) * settings["epochs"] * settings["steps_per_epoch"]
    if settings["headline"]:
        n += (2 * len(settings["headline"]["lr_multipliers"]) * settings["headline"]["epochs"]
              * settings["steps_per_epoch"])
    return n


# ---------------------------------------------------------------------------------------------
# reporting


def _steps_text(steps: int | None, total: int) -> str:
    return f">{total}" if steps is None else str(steps)


def _ratio_text(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "n/a (batch norm did not reach the target)"
    return (">" if r["lower_bound"] else "") + f"{r['ratio']:.1f}x"


def summary(results: dict[str, Any]) -> str:
    """The printed summary: final accuracies per scale, then the headline."""
    s = results["settings"]
    lines = [
        f"{s['model'].upper()} on {s['dataset']} ({s['train_size']} train / {s['test_size']} "
        f"test), SGD lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epochs "
        f"({s['epochs'] * s['steps_per_epoch']} steps), seed {s['seed']}",
        "",
        "weight-scale experiment: accuracy after the last epoch, train / test (chance 0.10)",
        f"{'weight std':>10}  {'with batch norm':>17}  {'without':>17}",
    ]
    for run in results["weight_scale"]:
        cells = []
        for key in ("with_bn", "without_bn"):
            r = run[key]
            text = f"{r['train_acc'][-1]:.3f} / {r['test_acc'][-1]:.3f}"
            if r["diverged_at_step"] is not None:
                text += " (diverged)"
            cells.append(f"{text:>17}")
        lines.append(f"{run['scale']:>10.2e}  " + "  ".join(cells))
    learns = [
        sum(r[k]["test_acc"][-1] >= 0.5 for r in results["weight_scale"])
        for k in ("with_bn", "without_bn")
    ]
    n = len(results["weight_scale"])
    lines += ["", f"scales at which the network ends above 50% test accuracy: with batch norm "
                  f"{learns[0]} of {n}, without {learns[1]} of {n}"]
    h = results["headline"]
    if h is not None:
        total = h["total_steps"]
        lines += [
            "",
            f"headline, He initialisation: training steps to {h['target_test_acc']:.0%} test "
            f"accuracy ({total} steps at most)",
            f"{'SGD lr':>14}  {'with batch norm':>15}  {'without':>8}",
        ]
        for r in h["runs"]:
            lr_text = f"{r['lr']:g} (x{r['lr_multiplier']:g})"
            w = _steps_text(r["with_bn"]["steps_to_target"], total)
            wo = _steps_text(r["without_bn"]["steps_to_target"], total)
            if r["without_bn"]["diverged_at_step"] is not None:
                wo += " (diverged)"
            lines.append(f"{lr_text:>14}  {w:>15}  {wo:>8}")
        base_lr = h["runs"][0]["lr"]
        lines += [
            f"  batch norm at its best lr vs. the baseline (no batch norm, lr {base_lr:g}): "
            f"{_ratio_text(h['speedup_vs_baseline'])} fewer steps",
            f"  at the same lr {base_lr:g}: {_ratio_text(h['speedup_same_lr'])}; each at its "
            f"best lr: {_ratio_text(h['speedup_best_vs_best'])}",
        ]
    return "\n".join(lines)


def plot_weight_scale(results: dict[str, Any], path: str | os.PathLike, dpi: int = 72) -> None:
    """A grid of test-accuracy curves, one panel per weight scale (solid: with batch norm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["weight_scale"]
    s = results["settings"]
    cols = math.ceil(math.sqrt(len(runs)))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows + 0.7), sharex=True,
                             sharey=True, squeeze=False)
    epochs = np.arange(1, s["epochs"] + 1)
    for ax, run in zip(axes.flat, runs, strict=False):
        ax.plot(epochs, run["with_bn"]["test_acc"], "-", color="C0", label="with batch norm")
        ax.plot(epochs, run["without_bn"]["test_acc"], "--", color="C1", label="without")
        ax.axhline(0.1, color="0.75", lw=0.8, ls=":")
        ax.set_title(f"w std = {run['scale']:.1e}", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{s['model'].upper()} on {s['dataset']}: test accuracy by initial weight "
                 f"std (SGD lr {s['lr']:g})", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def plot_headline(results: dict[str, Any], path: str | os.PathLike, dpi: int = 72) -> None:
    """Test accuracy against training step with He initialisation, per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = results["headline"]
    s = results["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, r in enumerate(h["runs"]):
        for key, style, label in (("with_bn", "-", "with BN"), ("without_bn", "--", "without")):
            c = r[key]
            steps = np.asarray(c["eval_steps"])
            keep = steps >= 1  # a log axis: the measurement before any step is left out
            ax.plot(steps[keep], np.asarray(c["step_test_acc"])[keep], style, color=f"C{i}",
                    lw=1.2, label=f"{label}, lr {r['lr']:g}")
    ax.axhline(h["target_test_acc"], color="k", lw=0.8, ls=":",
               label=f"target {h['target_test_acc']:.0%}")
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    best = h["best_with_bn"]
    base = h["runs"][0]["without_bn"]["steps_to_target"]
    title = f"{s['model'].upper()} on {s['dataset']}, He init: steps to {h['target_test_acc']:.0%}"
    if best is not None:
        title += (f": {best['steps']} with BN (lr {best['lr']:g}) vs "
                  f"{_steps_text(base, h['total_steps'])} without (lr {h['runs'][0]['lr']:g})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def write_results(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``weight_scale.png`` and ``headline.png`` (if any) to `out`.

    Each file is written atomically (a temporary file in `out`, then renamed): an error, a full
    disk or a killed process leaves the previous file, never a truncated one.

    Raises
    ------
    ValueError
        If `results` holds NaN or an infinity (not JSON); nothing is written then.
    """
    # Serialised first, so that results that are not JSON fail before any file is touched.
    text = json.dumps(results, indent=1, allow_nan=False) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "weight_scale": out / "weight_scale.png"}
    write_text_atomic(paths["json"], text)
    _atomic_figure(plot_weight_scale, results, paths["weight_scale"])
    if results["headline"] is not None:
        paths["headline"] = out / "headline.png"
        _atomic_figure(plot_headline, results, paths["headline"])
    return paths


def _atomic_figure(plot: Callable[..., None], results: dict[str, Any], path: Path) -> None:
    # Same directory (so that the rename is atomic), same suffix (matplotlib picks the format).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        plot(results, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The options of ``batchnorm demo`` (a separate function so that others can extend it)."""
    p = argparse.ArgumentParser(
        prog="batchnorm demo",
        description="Train the same network with and without batch normalization at 16 initial "
        "weight scales, and with He initialisation count the steps to a target test accuracy. "
        "Writes a table to the terminal and results.json, weight_scale.png and headline.png "
        "to --out.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (default, no download); "
                   "mnist, fashion-mnist: the IDX files in --data-dir")
    p.add_argument("--data-dir", default=None, help="directory with the four MNIST IDX files")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: 5 hidden layers of 100 (default); cnn: 2 conv blocks + 1 hidden")
    p.add_argument("--epochs", type=int_at_least(1), default=None,
                   help="epochs per run (default: 30 for the MLP on digits, 10 for the CNN)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of weights and batches (default 0)")
    p.add_argument("--lr", type=finite_float(0.0), default=0.01,
                   help="SGD learning rate (default 0.01)")
    p.add_argument("--batch-size", type=int_at_least(1), default=100, help="default 100")
    p.add_argument("--target", type=finite_float(0.0, 1.0), default=None,
                   help="headline test accuracy (default 0.90 digits, 0.95 mnist, 0.82 fashion)")
    p.add_argument("--train-size", type=int_at_least(1), default=None,
                   help="use a fixed subset of this many training examples")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SCALES} scales and {QUICK_EPOCHS} epochs, for a fast look")
    p.add_argument("--backend", default="numpy", choices=("auto", "numpy", "numba"),
                   help="batch-norm backend (default numpy: bit-identical reruns)")
    p.add_argument("--out", default="batchnorm-demo",
                   help="output directory (default ./batchnorm-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--experiment", choices=("batch-size",), default=None,
                   help="run another experiment instead: batch-size (BatchNorm, BatchRenorm, "
                   "GroupNorm, ghost BatchNorm and no normalization at batch sizes 2-64; writes "
                   "batch_size.json, batch_size.txt and batch_size.png)")
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help="--experiment batch-size: train with this many seeds from --seed and "
                   "average (default 2; 1 with --quick)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of mpiexec (mpiexec -n 4 batchnorm "
                   "demo --distributed): each global batch split across them, SyncBatchNorm, "
                   "gradients all-reduced; rank 0 prints and writes (needs batchnorm[mpi])")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``batchnorm demo``.

    Every argument is checked before any work, the output directory included (it must be
    creatable and writable): a bad one ends the command with argparse's usage and a one-line
    error, exit code 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    why = check_output_dir(args.out)
    if why is not None:
        parser.error(f"argument --out: {why}")
    if args.experiment == "batch-size":
        from .experiment import run_from_args

        return run_from_args(parser, args, sys.argv[1:] if argv is None else argv)
    if args.seeds is not None:
        parser.error("argument --seeds: expected it only with --experiment batch-size")
    scales = np.logspace(0, -4, QUICK_SCALES if args.quick else 16)
    epochs = args.epochs
    if args.quick and epochs is None:
        epochs = QUICK_EPOCHS
    try:
        data = load_dataset(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"batchnorm demo: {err}", file=sys.stderr)
        return 2
    n_train = len(data.subset(args.train_size, seed=args.seed).x_train)
    if args.batch_size > n_train:
        parser.error(f"argument --batch-size: expected at most the training-set size "
                     f"{n_train}, got {args.batch_size}")

    parallel = None
    if args.distributed:
        from ..distributed import DataParallel

        try:
            parallel = DataParallel()
        except ImportError as err:
            print(f"batchnorm demo: {err}", file=sys.stderr)
            return 2
    root = parallel is None or parallel.is_root  # only rank 0 prints and writes files
    bar = None
    show = root and not args.no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()
    # Settings first (cheap), so that the bar knows its total.
    probe = _settings_for(data, args, scales, epochs)
    if show:
        bar = open_progress_bar(total_steps(probe))
    # Distributed: an error on one rank must end every rank, not leave them waiting.
    guard = contextlib.nullcontext() if parallel is None else parallel.abort_on_error()
    try:
        with guard:
            results = run_experiment(
                data, model=args.model, scales=scales, epochs=epochs, seed=args.seed,
                lr=args.lr, batch_size=args.batch_size, target=args.target,
                train_size=args.train_size, backend=args.backend,
                progress=None if bar is None else bar.update, parallel=parallel,
            )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if not root:
        return 0
    paths = write_results(results, args.out)
    print(summary(results))
    print("")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"wall time {elapsed:.1f} s")
    return 0


def open_progress_bar(total: int) -> Any:
    """A tqdm bar on stderr counting `total` training steps (``bar.update(steps)``)."""
    from tqdm import tqdm

    try:
        sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
    except OSError:
        sized = False
    # tqdm hides its bar on a terminal that reports a size of 0 (some ptys): assume 80x24.
    return tqdm(total=total, unit="step", desc="training", file=sys.stderr,
                dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24)


def _settings_for(data: Dataset, args: argparse.Namespace, scales: np.ndarray,
                  epochs: int | None) -> dict[str, Any]:
    """The step counts `run_experiment` will use, without running it."""
    n = len(data.subset(args.train_size, seed=args.seed).x_train)
    defaults = DEFAULT_EPOCHS_CNN if args.model == "cnn" else DEFAULT_EPOCHS
    e = defaults.get(data.name, 5) if epochs is None else epochs
    return {"scales": list(scales), "epochs": e, "steps_per_epoch": n // args.batch_size,
            "headline": {"epochs": e, "lr_multipliers": LR_MULTIPLIERS}}


if __name__ == "__main__":
    sys.exit(main())
