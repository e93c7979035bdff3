"""``python -m bench [--quick] [--only fanout-ws,hot-ws] [--profile]``: see ``bench.run``."""

import sys

from bench.run import main

sys.exit(main())
