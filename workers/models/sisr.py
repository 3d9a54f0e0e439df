"""Single-image super-resolution: an EDSR-baseline body shared by PnG, with one PixelShuffle tail per scale."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..metrics import ms_ssim, psnr_y, quantize
from ..png import SharedNetwork
from ._family import Family, Upscaler, register_family

__all__ = ["EDSR", "SISRFamily", "bicubic_downscale", "scale_of"]

_TASK = re.compile(r"x([2-8])")
# DIV2K's mean colour, subtracted at the input and added back at the output as in EDSR.
_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def scale_of(task: str) -> int:
    """The zoom factor of a SISR task name ``x2`` ... ``x8``."""
    match = _TASK.fullmatch(task)
    if match is None or int(match.group(1)) not in (2, 3, 4, 8):
        raise ValueError(f"SISR task {task!r} is not one of x2, x3, x4, x8")
    return int(match.group(1))


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downscaling (close to MATLAB's imresize), rounded to 8-bit levels."""
    return quantize(F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False))


class _ResBlock(nn.Module):
    def __init__(self, width: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x))) * self.res_scale


def _tail(width: int, scale: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(width, 9 * width, 3, padding=1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))


class EDSR(nn.Module):
    """EDSR-baseline (Lim et al. 2017): head, ``depth`` residual blocks, body conv, skip; a tail per task.

    With ``skip="bicubic"`` the tails predict the residual over bicubic upscaling (as VDSR does), which a short
    training budget learns far faster; ``skip="none"`` is EDSR as published.

    >>> EDSR({"x2": 2}, width=8, depth=1)(torch.zeros(1, 3, 5, 5), "x2").shape
    torch.Size([1, 3, 10, 10])
    """

    def __init__(
        self, scales: dict[str, int], width: int = 64, depth: int = 16, skip: str = "none", res_scale: float = 1.0
    ) -> None:
        super().__init__()
        if skip not in ("none", "bicubic"):
            raise ValueError(f"SISR skip {skip!r} is not one of none, bicubic")
        self.scales = dict(scales)
        self.skip = skip
        self.register_buffer("rgb_mean", torch.tensor(_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(width, res_scale) for _ in range(depth)], nn.Conv2d(width, width, 3, padding=1))
        self.tails = nn.ModuleDict({task: _tail(width, scale) for task, scale in scales.items()})

    def forward(self, lr: torch.Tensor, task: str) -> torch.Tensor:
        features = self.head(lr - self.rgb_mean)
        if self.skip == "bicubic":
            base = F.interpolate(lr, scale_factor=self.scales[task], mode="bicubic", align_corners=False)
        else:
            base = self.rgb_mean
        return self.tails[task](self.body(features) + features) + base


@register_family("sisr")
class SISRFamily(Family, Upscaler):
    """x2/x3/x4 super-resolution; L1 loss; PSNR and MS-SSIM on Y with the border cropped by the scale."""

    default_tasks = ("x2", "x3", "x4")
    arch_defaults: dict[str, Any] = {"width": 32, "depth": 4, "skip": "bicubic", "lr_patch": 24}
    cost_size = 64
    latency_size = 96
    train_defaults: dict[str, Any] = {"grow_steps": 400, "prune_steps": 150, "finetune_steps": 150, "batch_size": 16}
    metric_directions = {"psnr": "maximize", "ms_ssim": "maximize", "bicubic_psnr": "maximize"}
    quality_metric = "psnr"

    def __init__(self, tasks: list[str], **arch: Any) -> None:
        super().__init__(tasks, **arch)
        if self.arch["skip"] not in ("none", "bicubic"):
            raise ValueError(f"SISR skip {self.arch['skip']!r} is not one of none, bicubic")

    def check_task(self, task: str) -> None:
        scale_of(task)

    def scale(self, task: str) -> int:
        """The zoom factor of ``task``."""
        return scale_of(task)

    def patch_size(self, task: str) -> int:
        """Every scale trains on low-resolution patches of the same side, ``lr_patch``."""
        return self.arch["lr_patch"] * scale_of(task)

    def build_model(self) -> EDSR:
        return EDSR({t: scale_of(t) for t in self.tasks}, self.arch["width"], self.arch["depth"], self.arch["skip"])

    def wrap(self, model: nn.Module) -> SharedNetwork:
        """Shared body; one tail per scale. Each residual block's first convolution feeds only its second (through
        a ReLU): a channel pair, which a paired task prunes together (an inner channel neither computes nor reads)."""
        blocks = [f"body.{i}" for i, block in enumerate(model.body) if isinstance(block, _ResBlock)]
        return SharedNetwork(model, task_heads=["tails"], task_arg="task",
                             channel_pairs=[(f"{b}.conv1", f"{b}.conv2") for b in blocks])

    def loss(self, shared: SharedNetwork, task: str, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.l1_loss(shared(task, bicubic_downscale(batch, scale_of(task))), batch)
        return loss, {"l1": loss.item()}

    @torch.no_grad()
    def evaluate(self, shared: SharedNetwork, task: str, images: ImageSet) -> dict[str, float]:
        """PSNR-Y, MS-SSIM-Y and bicubic's PSNR-Y; LR inputs from the set's pairs (a paired folder), else made by
        :func:`bicubic_downscale` of the HR image cropped to a multiple of the scale."""
        scale = scale_of(task)
        given = images.low_res.get(scale)
        ours, similarity, bicubic = [], [], []
        for index, image in enumerate(images.images):
            h, w = (image.shape[1] // scale) * scale, (image.shape[2] // scale) * scale
            hr = image[None, :, :h, :w].float().div(255).to(shared.device)
            lr = given[index][None].float().div(255).to(shared.device) if given else bicubic_downscale(hr, scale)
            sr = quantize(shared(task, lr))
            ours.append(psnr_y(sr, hr, scale))
            similarity.append(ms_ssim(sr, hr, y_border=scale))
            up = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
            bicubic.append(psnr_y(quantize(up), hr, scale))
        n = len(ours)
        return {"psnr": sum(ours) / n, "ms_ssim": sum(similarity) / n, "bicubic_psnr": sum(bicubic) / n}

    @torch.no_grad()
    def restore(self, shared: SharedNetwork, task: str, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Upscale ``image`` by ``task``'s scale."""
        lr = image[None].float().div(255).to(shared.device)
        sr = quantize(shared(task, lr))[0]
        return sr.mul(255).round().to(torch.uint8).cpu(), {"scale": scale_of(task)}

    def cost_inputs(self, task: str) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 3, self.cost_size, self.cost_size),)
