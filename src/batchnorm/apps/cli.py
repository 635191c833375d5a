"""The ``batchnorm`` command: ``demo``, ``bench``, ``gradcheck``, ``info``.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches,
so that ``batchnorm info`` does not import matplotlib and ``batchnorm demo`` does not import torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("batchnorm.apps.demo",
             "train MLPs with and without batch norm and compare (main job)"),
    "bench": ("batchnorm.apps.bench", "time the backends against PyTorch side by side"),
    "gradcheck": ("batchnorm.apps.gradcheck", "finite-difference gradient check of the layers"),
    "info": ("batchnorm.apps.info", "backend in use, versions, threads"),
}


def _usage() -> str:
    lines = ["usage: batchnorm COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "batchnorm COMMAND --help shows the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"batchnorm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
