"""``python -m rexedge.runtime.cli``: the ``rexedge`` command."""

import sys

from rexedge.runtime.cli import main

sys.exit(main())
