"""``python -m catdog.cli``: the ``catdog`` command."""

import sys

from catdog.cli import main

sys.exit(main())
