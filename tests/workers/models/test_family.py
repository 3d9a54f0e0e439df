from __future__ import annotations

from typing import Any

import pytest

from pngrow.workers.models import Codec, Upscaler, get_family


def test_families_declare_what_they_can_do() -> None:
    nic, sisr = get_family("nic"), get_family("sisr")
    assert isinstance(nic, Codec) and not isinstance(nic, Upscaler)
    assert isinstance(sisr, Upscaler) and not isinstance(sisr, Codec)
    assert [sisr.task_for_scale(s) for s in (2, 3, 4)] == ["x2", "x3", "x4"]
    with pytest.raises(ValueError, match="scale 8 is not one of this model's: 2, 3, 4"):
        sisr.task_for_scale(8)


def test_a_capability_is_a_contract() -> None:
    class HalfCodec(Codec):
        def compress(self, shared: Any, task: str, image: Any) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match="decompress"):
        HalfCodec()  # type: ignore[abstract]
