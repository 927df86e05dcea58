"""``python -m wujie_async``: the same as the ``wujie-async`` command."""

import sys

from .cli import main

sys.exit(main())
