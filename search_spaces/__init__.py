"""Per-family search spaces (YAML files in this folder), validated on load.

>>> from pngrow.search_spaces import available_spaces
>>> "sisr" in available_spaces()
True
"""

from __future__ import annotations

from ._space import Parameter, SearchSpace, available_spaces, load_search_space

__all__ = ["Parameter", "SearchSpace", "available_spaces", "load_search_space"]
