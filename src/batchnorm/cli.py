"""Old home of the ``batchnorm`` command, kept so that installations made before the command
moved to :mod:`batchnorm.apps.cli` (their console script imports ``batchnorm.cli:main``) and
``python -m batchnorm.cli`` keep working. New code: ``python -m batchnorm``."""

import sys

from .apps.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
