"""``python -m ntksap_fast``: the ``ntksap`` command line (see ``ntksap_fast.cli.app``)."""

from .cli import main

raise SystemExit(main())
