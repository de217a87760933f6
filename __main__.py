"""``python -m xmgie``: the ``xmgie`` command line (see :mod:`xmgie.cli`)."""

from .cli import main

raise SystemExit(main())
