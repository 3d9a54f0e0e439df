"""pngrow: one network that serves several image-restoration tasks, by micro-structured prune-and-grow."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
