"""Batch normalization for networks written in NumPy.

Pure kernels (:func:`batch_norm_train`, :func:`batch_norm_inference`,
:func:`batch_norm_backward`), the book's layer fixed (:class:`BatchNormalization`), a modern
layer (:class:`BatchNorm`) and, with mpi4py, :class:`SyncBatchNorm`; group, instance and layer
normalization on the same primitives (:func:`group_norm`, :func:`layer_norm`,
:class:`GroupNorm`, :class:`LayerNorm`); for where batch normalization fails, masks
(``BatchNorm.forward(x, mask)``), ghost batches (``virtual_batch_size``) and Batch
Renormalization (:class:`BatchRenorm`, :func:`renorm_schedule`).
"""

from .backends import available_backends, get_backend
from .fold import fold_batchnorm
from .functional import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_inference,
    batch_norm_train,
    batch_renorm_train,
    update_running_stats,
)
from .groupnorm import (
    GroupNormCache,
    group_norm,
    group_norm_backward,
    layer_norm,
    layer_norm_backward,
)
from .io import LoadError, load
from .layers import BatchNorm, BatchNormalization
from .norm_layers import GroupNorm, LayerNorm
from .renorm import BatchRenorm, Ramp, renorm_schedule
from .second_order import batch_norm_double_backward

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "BatchNormalization",
    "BatchRenorm",
    "GroupNorm",
    "GroupNormCache",
    "LayerNorm",
    "LoadError",
    "Ramp",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "available_backends",
    "batch_norm_backward",
    "batch_norm_double_backward",
    "batch_norm_inference",
    "batch_norm_train",
    "batch_renorm_train",
    "fold_batchnorm",
    "get_backend",
    "group_norm",
    "group_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "load",
    "renorm_schedule",
    "update_running_stats",
]


def __getattr__(name: str):
    # SyncBatchNorm needs mpi4py, which importing batchnorm must not.
    if name in ("SyncBatchNorm", "SyncBatchRenorm"):
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
