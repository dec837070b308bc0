"""``python -m fastat`` is the ``fastat`` command."""

import sys

from fastat.app.entry import main

sys.exit(main())
