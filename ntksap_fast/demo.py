"""``python -m ntksap_fast.demo``: kept at this path; the demo lives in ``ntksap_fast.cli.demo``."""

from .cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
