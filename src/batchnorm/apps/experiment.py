"""``batchnorm demo --experiment batch-size``: normalization methods against the batch size.

In the spirit of Wu & He (2018), "Group Normalization", Figure 1 (batch normalization's
ImageNet error rises from about 24% at 32 images per GPU to about 35% at 2, group
normalization's stays flat): the demo's small CNN is trained on the bundled digits at batch
sizes 2, 4, 8, 16, 32 and 64 with five normalizations after every convolution and hidden affine
layer, and the test accuracy after training is compared:

- ``batchnorm``: :class:`~batchnorm.BatchNorm` (statistics of the batch in training, running
  averages in inference);
- ``batchrenorm``: :class:`~batchnorm.BatchRenorm` with the paper's ramp of ``rmax``/``dmax``
  (:func:`~batchnorm.renorm_schedule`) shrunk to the length of the run (:func:`renorm_bounds`);
- ``groupnorm``: :class:`~batchnorm.GroupNorm` with 4 groups (statistics per sample: the batch
  size does not enter them);
- ``ghost``: ``BatchNorm(..., virtual_batch_size=4)``, ghost batch normalization (Hoffer et al.
  2017) with virtual batches of 4: inside a batch of 64, 16 virtual batches each normalized with
  its own statistics. The virtual batch stays 4 at every batch size, so at batch sizes 2 and 4 a
  batch is a single virtual batch and ghost batch norm *is* batch norm; from 8 up it keeps the
  statistics noise of 4 samples while the gradient step averages over the whole batch;
- ``none``: no normalization.

Every run of a seed starts from the same He-initialised weights (the normalization layers draw
no random numbers) and, at a given batch size, sees the same batches. All batch sizes train for
the same number of epochs, with the learning rate scaled linearly with the batch size (Goyal et
al. 2017; Wu & He do the same): ``lr * batch_size / 64``. Small batches therefore take many more,
smaller steps.

Outputs under ``--out``: ``batch_size.json`` (every curve and the settings; deterministic),
``batch_size.txt`` (the table that is printed) and ``batch_size.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import get_backend
from ..layers import BatchNorm
from ..nn import SGD, cnn
from ..nn.builders import Norm
from ..norm_layers import GroupNorm
from ..renorm import BatchRenorm, Ramp, renorm_schedule
from ._checks import write_text_atomic
from .data import Dataset, load_dataset
from .demo import (
    _atomic_figure,
    _one_blas_thread,
    build_parser,
    make_batches,
    open_progress_bar,
    train_network,
)

__all__ = [
    "BATCH_SIZES",
    "METHODS",
    "make_norm",
    "plot_batch_size",
    "renorm_bounds",
    "run_batch_size_experiment",
    "run_from_args",
    "table",
    "total_steps",
    "write_batch_size_results",
]

BATCH_SIZES = (2, 4, 8, 16, 32, 64)
#: The methods, in the order of the table, with the label of the table and the figure.
METHODS = {
    "batchnorm": "BatchNorm",
    "batchrenorm": "BatchRenorm",
    "groupnorm": "GroupNorm",
    "ghost": "ghost BN (4)",
    "none": "no norm",
}
VIRTUAL_BATCH = 4
GROUPS = 4
REFERENCE_BATCH = 64  # the learning rate is given for this batch size and scaled linearly
DEFAULT_LR = 0.2
DEFAULT_EPOCHS = 3
DEFAULT_SEEDS = 2
QUICK = {"epochs": 1, "seeds": 1, "train_size": 96}
CHANNELS, HIDDEN = (8, 16), (100,)  # the default demo's CNN
MOMENTUM = 0.9  # the weight of the old running value, as in the default demo


def renorm_bounds(total_steps: int) -> tuple[Ramp, Ramp]:
    """Batch Renorm's ``(rmax, dmax)`` ramps for a run of `total_steps` training steps.

    The paper (Ioffe 2017, Section 4) trains with ``rmax = 1, dmax = 0`` (plain batch norm) for
    5k steps, then relaxes them to reach ``dmax = 5`` at 25k steps and ``rmax = 3`` at 40k. The
    runs here are far shorter, so the same ramp is scaled by ``total_steps / 80k``: plain batch
    norm for the first 1/16 of the steps, ``dmax = 5`` at 5/16 and ``rmax = 3`` at 1/2, full
    strength for the second half of training.
    """
    t = int(total_steps)
    return renorm_schedule(warmup=t // 16, dmax_step=5 * t // 16, rmax_step=t // 2)


def make_norm(
    method: str, total_steps: int, *, dtype: Any = np.float64, backend: str | None = "numpy"
) -> Norm:
    """The ``norm=`` argument of :func:`batchnorm.nn.cnn` for `method` (a key of ``METHODS``).

    `total_steps` is the length of the run (for Batch Renorm's ramp).
    """
    if method not in METHODS:
        raise ValueError(f"expected a method in {list(METHODS)}, got {method!r}")
    kw = dict(axis=1, eps=1e-5, dtype=dtype, backend=backend)
    if method == "none":
        return None
    if method == "groupnorm":
        return lambda shape: GroupNorm(GROUPS, shape[0], **kw)
    if method == "batchrenorm":
        rmax, dmax = renorm_bounds(total_steps)
        return lambda shape: BatchRenorm(shape[0], rmax=rmax, dmax=dmax, momentum=MOMENTUM, **kw)
    vb = VIRTUAL_BATCH if method == "ghost" else None
    return lambda shape: BatchNorm(shape[0], momentum=MOMENTUM, virtual_batch_size=vb, **kw)


def _lr(lr: float, batch_size: int) -> float:
    return float(lr) * batch_size / REFERENCE_BATCH


def _plan(n_train: int, batch_sizes: Sequence[int], epochs: int) -> dict[str, Any]:
    return {str(b): {"steps_per_epoch": n_train // b, "total_steps": epochs * (n_train // b)}
            for b in batch_sizes}


def total_steps(settings: dict[str, Any]) -> int:
    """Optimiser steps of a whole experiment (for a progress bar)."""
    per_run = sum(p["total_steps"] for p in settings["plan"].values())
    return per_run * len(settings["methods"]) * len(settings["seeds"])


def settings_for(
    data: Dataset, *, batch_sizes: Sequence[int] = BATCH_SIZES,
    methods: Sequence[str] = tuple(METHODS), epochs: int = DEFAULT_EPOCHS,
    seeds: Sequence[int] = (0,), lr: float = DEFAULT_LR, backend: str | None = "numpy",
) -> dict[str, Any]:
    """The settings (and step counts) of :func:`run_batch_size_experiment`, without running."""
    n = len(data.x_train)
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(not 2 <= b <= n for b in batch_sizes):
        raise ValueError(f"expected batch sizes between 2 and the training-set size {n}, got "
                         f"{batch_sizes}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"expected methods from {list(METHODS)}, got {m!r}")
    plan = _plan(n, batch_sizes, epochs)
    return {
        "dataset": data.name,
        "model": f"CNN: conv 3x3 {CHANNELS[0]} -> norm -> ReLU -> max pool 2, conv 3x3 "
                 f"{CHANNELS[1]} -> norm -> ReLU -> max pool 2, linear {HIDDEN[0]} -> norm -> "
                 "ReLU, linear 10",
        "train_size": n,
        "test_size": len(data.x_test),
        "batch_sizes": batch_sizes,
        "methods": {m: METHODS[m] for m in methods},
        "method_details": {
            "batchnorm": f"BatchNorm, momentum {MOMENTUM} (weight of the old running value), "
                         "eps 1e-5",
            "batchrenorm": "BatchRenorm, momentum 0.9, rmax/dmax: renorm_schedule(warmup=T//16, "
                           "dmax_step=5*T//16, rmax_step=T//2) for a run of T steps (the "
                           "paper's 5k/25k/40k steps scaled by T/80k), rmax 3, dmax 5",
            "groupnorm": f"GroupNorm with {GROUPS} groups (2, 4 and 25 channels per group)",
            "ghost": f"BatchNorm(virtual_batch_size={VIRTUAL_BATCH}): at batch sizes <= "
                     f"{VIRTUAL_BATCH} one virtual batch, the same as BatchNorm",
            "none": "no normalization",
        },
        "epochs": int(epochs),
        "seeds": [int(s) for s in seeds],
        "optimizer": "SGD",
        "lr_rule": f"lr * batch_size / {REFERENCE_BATCH}",
        "lr": float(lr),
        "lrs": {str(b): _lr(lr, b) for b in batch_sizes},
        "weight_init": "he (std = sqrt(2 / fan_in)), biases zero; the same weights for every "
                       "method and batch size of a seed",
        "plan": plan,
        "dtype": "float64",
        "backend": get_backend(backend).name,
    }


def run_batch_size_experiment(
    dataset: str | Dataset = "digits",
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    methods: Sequence[str] = tuple(METHODS),
    epochs: int = DEFAULT_EPOCHS,
    seeds: Sequence[int] = (0,),
    lr: float = DEFAULT_LR,
    train_size: int | None = None,
    backend: str | None = "numpy",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train the CNN with each normalization at each batch size and seed.

    Parameters
    ----------
    dataset : "digits" or Dataset
        Images of shape (N, C, H, W).
    batch_sizes : sequence of int, default (2, 4, 8, 16, 32, 64)
    methods : sequence of str, default every key of ``METHODS``
    epochs : int, default 3
        The same for every method and batch size.
    seeds : sequence of int, default (0,)
        Each seed gives the initial weights (shared by all methods and batch sizes) and the
        batches (shared by all methods at a batch size).
    lr : float, default 0.2
        SGD learning rate at batch size 64; batch size ``b`` trains at ``lr * b / 64``.
    train_size : int, optional
        Use a fixed subset of this many training examples (chosen with the first seed).
    backend : str or None, default "numpy"
        Backend of the normalization layers; NumPy's makes reruns bit-identical.
    progress : callable(steps), optional
        Called after every epoch of every run with its number of steps.

    Returns
    -------
    results : dict
        ``settings``; ``runs[method][str(batch_size)]``: one entry per seed with the per-epoch
        ``test_acc``, ``train_acc``, ``loss`` and ``diverged_at_step``;
        ``final_test_acc[method][str(batch_size)]``: the test accuracy after the last epoch,
        averaged over the seeds. Only JSON types, nothing that changes between runs.

    Raises
    ------
    ValueError
        For a batch size below 2 or above the training-set size, or an unknown method.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("expected at least one seed, got none")
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    data = data.subset(train_size, seed=seeds[0])
    s = settings_for(data, batch_sizes=batch_sizes, methods=methods, epochs=epochs, seeds=seeds,
                     lr=lr, backend=backend)
    n = s["train_size"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in s["methods"]}
    with _one_blas_thread():
        for b in s["batch_sizes"]:
            steps = s["plan"][str(b)]["total_steps"]
            for m in s["methods"]:
                runs[m][str(b)] = []
            for seed in seeds:
                batches = make_batches(n, b, epochs, seed)
                for m in s["methods"]:
                    net = cnn(data.image_shape, data.num_classes, channels=CHANNELS,
                              hidden=HIDDEN, norm=make_norm(m, steps, backend=backend),
                              weight_init="he", rng=np.random.default_rng([seed, 1]),
                              dtype=np.float64, backend=backend, fuse_activation=True)
                    h = train_network(net, SGD(net.params, _lr(lr, b)), data, batches,
                                      progress=progress)
                    runs[m][str(b)].append({
                        "seed": seed, "test_acc": h.test_acc, "train_acc": h.train_acc,
                        "loss": h.loss, "diverged_at_step": h.diverged_at_step,
                    })
    final = {m: {bs: sum(r["test_acc"][-1] for r in rs) / len(rs) for bs, rs in by_b.items()}
             for m, by_b in runs.items()}
    return {"settings": s, "runs": runs, "final_test_acc": final}


# ---------------------------------------------------------------------------------------------
# reporting


def table(results: dict[str, Any]) -> str:
    """The printed table: test accuracy after training, one row per method, one column per
    batch size (the mean over the seeds)."""
    s = results["settings"]
    seeds = s["seeds"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {seeds}"
    lines = [
        f"batch-size experiment: CNN on {s['dataset']} ({s['train_size']} train / "
        f"{s['test_size']} test), {s['epochs']} epochs at every batch size, SGD lr "
        f"{s['lr']:g} x batch/{REFERENCE_BATCH}, He init, {seed_text}",
        "",
        "test accuracy after training (chance 0.10)",
        f"{'batch size':<14}" + "".join(f"{b:>7}" for b in s["batch_sizes"]),
        f"{'steps':<14}" + "".join(f"{s['plan'][str(b)]['total_steps']:>7}"
                                    for b in s["batch_sizes"]),
    ]
    for m, label in s["methods"].items():
        cells = []
        for b in s["batch_sizes"]:
            text = f"{results['final_test_acc'][m][str(b)]:.3f}"
            if any(r["diverged_at_step"] is not None for r in results["runs"][m][str(b)]):
                text += "!"
            cells.append(f"{text:>7}")
        lines.append(f"{label:<14}" + "".join(cells))
    notes = []
    if len(s["seeds"]) > 1:
        spread = max(
            (max(accs) - min(accs), m, b)
            for m in s["methods"] for b in s["batch_sizes"]
            for accs in [[r["test_acc"][-1] for r in results["runs"][m][str(b)]]]
        )
        notes.append(f"largest difference between the seeds of one cell: {spread[0]:.3f} "
                     f"({s['methods'][spread[1]]} at batch size {spread[2]})")
    if any(r["diverged_at_step"] is not None for by_b in results["runs"].values()
           for rs in by_b.values() for r in rs):
        notes.append("! a run diverged (NaN or infinite loss) and kept its last accuracy")
    if "ghost" in s["methods"]:
        notes.append(f"ghost BN normalizes virtual batches of {VIRTUAL_BATCH}; at batch sizes "
                     f"<= {VIRTUAL_BATCH} that is the whole batch, i.e. BatchNorm")
    return "\n".join(lines + [""] + notes)


def plot_batch_size(results: dict[str, Any], path: str | os.PathLike, dpi: int = 72) -> None:
    """Test accuracy after training against batch size (log scale), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    bs = s["batch_sizes"]
    styles = {"batchnorm": ("C0", "o", "-"), "batchrenorm": ("C2", "s", "-"),
              "groupnorm": ("C3", "^", "-"), "ghost": ("C4", "D", "--"),
              "none": ("0.4", "x", ":")}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, label in s["methods"].items():
        color, marker, ls = styles[m]
        ax.plot(bs, [results["final_test_acc"][m][str(b)] for b in bs], ls, color=color,
                marker=marker, label=label)
        if len(s["seeds"]) > 1:  # each seed as a faint dot
            for b in bs:
                accs = [r["test_acc"][-1] for r in results["runs"][m][str(b)]]
                ax.plot([b] * len(accs), accs, marker, color=color, alpha=0.3, ms=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.minorticks_off()
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("test accuracy after training")
    ax.set_title(f"CNN on {s['dataset']}, {s['epochs']} epochs, lr {s['lr']:g} x batch/"
                 f"{REFERENCE_BATCH}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)


def write_batch_size_results(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``batch_size.json``, ``batch_size.txt`` (the table) and ``batch_size.png`` to
    `out`, each atomically.

    Raises
    ------
    ValueError
        If `results` holds NaN or an infinity (not JSON); nothing is written then.
    """
    text = json.dumps(results, indent=1, allow_nan=False) + "\n"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "batch_size.json", "table": out / "batch_size.txt",
             "figure": out / "batch_size.png"}
    write_text_atomic(paths["json"], text)
    write_text_atomic(paths["table"], table(results) + "\n")
    _atomic_figure(plot_batch_size, results, paths["figure"])
    return paths


# ---------------------------------------------------------------------------------------------
# command line

#: Options of ``batchnorm demo`` that this experiment does not use: giving one is an error.
UNUSED_OPTIONS = ("dataset", "data_dir", "model", "lr", "batch_size", "target", "distributed")


_UNSET = object()


def check_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse (exit 2, one line) the demo options this experiment does not use, also when
    given with their default value."""
    probe = build_parser()
    probe.set_defaults(**{dest: _UNSET for dest in UNUSED_OPTIONS})
    given = probe.parse_args(list(argv))
    for dest in UNUSED_OPTIONS:
        value = getattr(given, dest)
        if value is not _UNSET:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"argument {flag}: not used by --experiment batch-size (expected it "
                         f"left out, got {value!r})")


def run_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> int:
    """``batchnorm demo --experiment batch-size``; `args` parsed from `argv` by `parser`."""
    check_args(parser, argv)
    epochs = args.epochs if args.epochs is not None else (
        QUICK["epochs"] if args.quick else DEFAULT_EPOCHS)
    n_seeds = args.seeds if args.seeds is not None else (
        QUICK["seeds"] if args.quick else DEFAULT_SEEDS)
    train_size = args.train_size if args.train_size is not None else (
        QUICK["train_size"] if args.quick else None)
    seeds = list(range(args.seed, args.seed + n_seeds))
    data = load_dataset("digits").subset(train_size, seed=seeds[0])
    if len(data.x_train) < max(BATCH_SIZES):
        parser.error(f"argument --train-size: expected at least {max(BATCH_SIZES)} (the "
                     f"largest batch), got {len(data.x_train)}")
    probe = settings_for(data, epochs=epochs, seeds=seeds, backend=args.backend)
    show = not args.no_progress and sys.stderr.isatty()
    bar = open_progress_bar(total_steps(probe)) if show else None
    t0 = time.perf_counter()
    try:
        results = run_batch_size_experiment(
            data, epochs=epochs, seeds=seeds, backend=args.backend,
            progress=None if bar is None else bar.update,
        )
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    paths = write_batch_size_results(results, args.out)
    print(table(results))
    print("")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"wall time {elapsed:.1f} s")
    return 0
