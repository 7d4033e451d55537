"""``python -m bicot.memory -c CONFIG [...]``: see :func:`bicot.memory.cli.main`."""

import sys

from bicot.memory.cli import main

sys.exit(main())
