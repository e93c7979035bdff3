"""``python -m client``: the terminal client (``client.cli``), the same as the ``progress`` command."""

from client.cli import main

raise SystemExit(main())
