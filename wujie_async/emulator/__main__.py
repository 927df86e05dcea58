"""``python -m wujie_async.emulator``: run the gateway emulator standalone."""

import sys

from ._server import main

sys.exit(main())
