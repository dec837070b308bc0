"""``python -m fastat`` is the ``fastat`` command."""

import sys

from fastat.cli import main

sys.exit(main())
