"""``python -m bench [--quick] [--only fanout-ws,hot-ws] [--profile]``: see ``bench.run``;
``python -m bench --only soak --minutes N``: see ``bench.soak``."""

import sys

from bench.run import main

sys.exit(main())
