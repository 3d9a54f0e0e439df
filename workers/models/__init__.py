"""Model families under prune-and-grow, found by name in :data:`FAMILIES`."""

from __future__ import annotations

from ._family import FAMILIES, Codec, Family, Upscaler, get_family, load_model, register_family
from .nic import NICFamily
from .sisr import EDSR, SISRFamily

__all__ = ["EDSR", "FAMILIES", "Codec", "Family", "NICFamily", "SISRFamily", "Upscaler", "get_family", "load_model",
           "register_family"]
