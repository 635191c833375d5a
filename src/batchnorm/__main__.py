"""``python -m batchnorm COMMAND``: the same as the ``batchnorm`` console script."""

import sys

from .apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
