"""pngrow: one network that serves several image-restoration tasks, by micro-structured prune-and-grow."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_shared_model"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the API pulls in PyTorch and MLflow, which `import pngrow` should not.
    if name == "load_shared_model":
        from .pipeline.api import load_shared_model

        return load_shared_model
    raise AttributeError(f"module 'pngrow' has no attribute {name!r}")
