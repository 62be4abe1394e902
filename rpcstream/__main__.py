"""``python -m rpcstream``: the same as the ``rpcstream`` command."""

from .cli import main

raise SystemExit(main())
