"""``python -m socratune``: the same as the ``socratune`` command."""

import sys

from .cli import main

sys.exit(main())
