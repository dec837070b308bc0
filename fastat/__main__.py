"""``python -m fastat`` is the ``fastat`` command."""

import sys

from fastat.app.cli import main

sys.exit(main())
