"""Model families under prune-and-grow, found by name in :data:`FAMILIES`."""

from __future__ import annotations

from ._family import FAMILIES, Family, get_family, load_model, register_family
from .nic import NICFamily
from .sisr import EDSR, SISRFamily

__all__ = ["EDSR", "FAMILIES", "Family", "NICFamily", "SISRFamily", "get_family", "load_model", "register_family"]
