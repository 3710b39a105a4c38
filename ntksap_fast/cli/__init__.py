"""The ``ntksap`` command line (``app``), its model sources and the demo."""

from .app import main

__all__ = ["main"]
