"""The programs built on the library: the ``batchnorm`` command and what it runs.

``cli`` dispatches ``batchnorm demo | bench | gradcheck | info`` (also ``python -m batchnorm``);
``demo`` trains networks with and without batch normalization (``experiment``: its
``--experiment batch-size``, normalizations against batch size), ``bench`` and ``bench_sync``
time the kernels, the layers and ``SyncBatchNorm``, ``gradcheck`` checks every layer's
backward, ``info`` reports the installation, ``data`` loads the demo's data sets.

These modules may use argparse, matplotlib, tqdm, scikit-learn, PyTorch and subprocesses; the
library outside this subpackage uses none of them.
"""
