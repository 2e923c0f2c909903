"""``python -m fastfa``: the same as the ``fastfa`` command (see fastfa.cli)."""

import sys

from .cli import main

sys.exit(main())
