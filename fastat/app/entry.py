"""The ``fastat`` console script (and ``python -m fastat``): :func:`fastat.app.cli.main`, loaded inside
a guard, so that Ctrl-C while the command line itself is still importing is one line and exit 130 like a
Ctrl-C anywhere else (``cli.main`` catches it from then on). Imports nothing heavy at module level."""

from __future__ import annotations

import os
import sys

from fastat.utils.errors import EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    try:
        from fastat.app.cli import main as cli_main
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it (as cli.main does)
            sys.stderr.write("fastat: interrupted\n")
        return EXIT_INTERRUPTED
    return cli_main(argv)
